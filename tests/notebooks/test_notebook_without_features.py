"""The radiomics notebook on a lake where no radiomics features were computed (the
`lake demo` lake, for one): it stops at the first cell that needs them, saying what to
run, instead of an IndexError deep in pandas."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "07_radiomics.py"


def test_radiomics_notebook_says_what_to_run(built_lake, monkeypatch, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LAKE_DIR", str(built_lake[0]))  # no radiomics_features rows
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(NOTEBOOK)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failed:
        client.execute()
    assert failed.value.ename == "RuntimeError"
    assert failed.value.evalue.startswith(
        "this lake has no radiomics features yet: run `lake features` on a lake that holds "
        "segmentations (DICOM SEG or RTSTRUCT)")
