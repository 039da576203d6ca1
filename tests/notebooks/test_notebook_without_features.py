"""Notebooks on lakes that lack what they show: no radiomics features (the `lake demo`
lake, for one), no studies at all (a new lake, or one whose files were all quarantined).
They stop at the first cell that needs the data, saying what to run, instead of an
IndexError or TypeError deep in pandas; the overview still shows the table sizes."""

from pathlib import Path

import pytest

from lakehouse import Lake

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _execute(name: str, lake: Path, monkeypatch, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LAKE_DIR", str(lake))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(NOTEBOOKS / name)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    return nb, client, nbclient.exceptions.CellExecutionError


def test_radiomics_notebook_says_what_to_run(built_lake, monkeypatch, tmp_path):
    # the session lake has no radiomics_features rows
    _nb, client, failure = _execute("07_radiomics.py", built_lake[0], monkeypatch, tmp_path)
    with pytest.raises(failure) as failed:
        client.execute()
    assert failed.value.ename == "RuntimeError"
    assert failed.value.evalue.startswith(
        "this lake has no radiomics features yet: run `lake features` on a lake that holds "
        "segmentations (DICOM SEG or RTSTRUCT)")


@pytest.fixture()
def empty_lake(tmp_path) -> Path:
    path = tmp_path / "empty"
    Lake.create(path, profile="identified")
    return path


@pytest.mark.slow  # a kernel per notebook, about 3 s each
@pytest.mark.parametrize("name", ["02_utilization.py", "05_cohorts.py"])
def test_notebooks_on_a_lake_without_studies_say_so(name, empty_lake, monkeypatch, tmp_path):
    _nb, client, failure = _execute(name, empty_lake, monkeypatch, tmp_path)
    with pytest.raises(failure) as failed:
        client.execute()
    assert failed.value.ename == "RuntimeError"
    assert failed.value.evalue == (
        f"the lake at {empty_lake} has no studies yet: ingest DICOM files first "
        "(`lake ingest FOLDER`), or try `lake demo`")


@pytest.mark.slow
def test_overview_notebook_on_a_lake_without_studies(empty_lake, monkeypatch, tmp_path):
    nb, client, _failure = _execute("01_lake_overview.py", empty_lake, monkeypatch, tmp_path)
    client.execute()
    printed = [o.get("text", "") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert printed == ["no studies yet: ingest DICOM files first (`lake ingest FOLDER`), or try "
                       "`lake demo`\n"]
