"""Session fixtures: one generated archive and one lake built from it, reused by all tests.

Tests that change a lake copy it first (``lake_copy``) so the shared one stays
as built. ``features_lake`` is a copy with image features computed (threshold
label maps on its CT volumes run through the features job).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from catalog import open_lake
from etl import IngestConfig, ingest
from etl.features import FeaturesConfig, compute_features, plan
from etl.volumes import load_volume, series_geometry
from lakehouse import Lake
from synth import generate_archive


@pytest.fixture(scope="session", autouse=True)
def _keys_in_a_temporary_config_home(tmp_path_factory):
    """Research lakes created without --key-file put their key under XDG_CONFIG_HOME:
    never the real home folder in tests."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("archive") / "pacs"
    truth = generate_archive(root, seed=0, preset="test")
    return root, truth


@pytest.fixture(scope="session")
def truth(archive):
    return archive[1]


@pytest.fixture(scope="session")
def built_lake(archive, tmp_path_factory):
    """(lake path, run summary) of the sample archive ingested with Dask processes into an
    identified lake (names and identifiers kept, so tests can check them against the
    ground truth; tests/privacy covers research lakes)."""
    path = tmp_path_factory.mktemp("lakes") / "lake"
    lake = Lake.create(path, profile="identified")
    summary = ingest(lake, archive[0], IngestConfig(scheduler="processes", workers=2,
                                                    batch_files=64))
    return path, summary


@pytest.fixture()
def lake_copy(built_lake, tmp_path) -> Path:
    dest = tmp_path / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def cat(built_lake):
    with open_lake(built_lake[0]) as c:
        yield c


def fast_config(**kw) -> IngestConfig:
    """In-process Dask scheduler for tests that run many small ingests."""
    kw.setdefault("scheduler", "synchronous")
    return IngestConfig(**kw)


#: label values of the threshold masks: soft tissue and dense (bone, contrast)
SOFT, DENSE = 1, 2


def threshold_masks(lake: Lake, folder: Path) -> list[tuple[str, str]]:
    """One NRRD label map per regular CT volume: soft tissue (-100..100 HU) and > 300 HU."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task in plan(lake, FeaturesConfig()):
        if task.rows[0].get("Modality") != "CT" or len(task.rows) < 3:
            continue
        geo = series_geometry(task.rows, task.series_uid)
        if not geo.volume_ok:
            continue
        image = load_volume(geo, task.paths)
        hu = sitk.GetArrayFromImage(image)
        label = np.zeros(hu.shape, dtype=np.uint8)
        label[(hu > -100) & (hu < 100)] = SOFT
        label[hu > 300] = DENSE
        mask = sitk.GetImageFromArray(label)
        mask.CopyInformation(image)
        path = folder / f"{task.series_uid}.nrrd"
        sitk.WriteImage(mask, str(path), True)
        out.append((task.series_uid, str(path)))
    return out


@pytest.fixture(scope="session")
def features_lake(built_lake, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features-lake")
    dest = root / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    masks = threshold_masks(lake, root / "masks")
    compute_features(lake, FeaturesConfig(series=tuple(uid for uid, _ in masks),
                                          mask_files=tuple(masks), scheduler="processes",
                                          workers=2))
    return dest
