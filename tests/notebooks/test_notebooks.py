"""Every notebook runs top to bottom with a real kernel against a copy of the session's lake."""

import shutil
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, request, monkeypatch, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    # notebooks about image features need a lake where `lake features` has run; the others
    # get a copy of the session lake (notebooks may save cohorts into it)
    if "radiomics" in path.name:
        lake = request.getfixturevalue("features_lake")
    else:
        lake = tmp_path / "lake"
        shutil.copytree(request.getfixturevalue("built_lake")[0], lake, symlinks=True)
    monkeypatch.setenv("LAKE_DIR", str(lake))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel's temporary folder, which each notebook must leave as it found it
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert sorted(p.name for p in temporary.iterdir()) == []
