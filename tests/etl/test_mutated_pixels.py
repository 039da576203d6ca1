"""Images whose pixels, or the header values that describe them, are damaged: the
features job gives every series its rows and never a statistic of garbage.

:mod:`tests.etl.test_mutated` damages headers and runs the ingest. This module damages
what only the features read: the pixel data (truncated, bytes overwritten or zeroed,
an item length of an encapsulated frame rewritten, bytes inserted) and the values that
say how to read it (Rows, Columns, Bits Allocated and Stored, Pixel Representation,
Samples per Pixel, Number of Frames, Photometric Interpretation, Rescale Slope and
Intercept), by a seeded generator over greyscale images of every transfer syntax
pydicom ships (JPEG, JPEG-LS, JPEG 2000, RLE, native of both byte orders) and the
session's sample archive. Each damaged file is given UIDs of its own, so it is one
series. After an ingest and a features run:

- every image series the ingest kept has one ``series_geometry`` and one
  ``image_stats`` row: one bad instance never costs its series its statistics, and no
  series is lost to an unexpected error;
- a statistic is a finite number: an instance whose rescale makes infinities or NaN
  (``RescaleIntercept -inf``, which a DS may hold) is a pixel failure;
- a failure has a message that quotes no value of the file, and the features print
  nothing (pydicom's warnings about truncated items or excess frames would flood the
  console from the workers);
- small CT series with an RTSTRUCT and a SEG, one file of them damaged, give each mask's
  features or a failure row saying why;
- ``lake cohort export`` writes or skips every series with a reason code, and a NIfTI
  volume holds finite numbers only.

Exact cases found by the generator are regression tests below.
"""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from catalog import open_lake
from etl import IngestConfig, ingest
from etl.features import FeaturesConfig, compute_features
from etl.imagestats import series_stats
from etl.masks import MASK_SOP_CLASSES
from lakehouse import Lake

#: damaged images in the default suite (the slow test makes more)
FILES = 240

#: header values a damaged file may hold instead of its own, with values that stay
#: within their VR's form (a DS of "-inf" is one pydicom reads) and some that do not
ATTRIBUTES: dict[str, list] = {
    "Rows": [0, 1, 3, 65535], "Columns": [0, 1, 3, 65535],
    "BitsAllocated": [0, 1, 8, 12, 32, 64, 65535],
    "BitsStored": [0, 1, 7, 12, 17, 64, 65535],
    "HighBit": [0, 7, 31, 100],
    "PixelRepresentation": [0, 1, 2],
    "SamplesPerPixel": [0, 2, 3, 65535],
    "NumberOfFrames": ["0", "-1", "2", "1000", "2147483647"],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "XYZ", ""],
    "RescaleSlope": ["0", "-1", "1e308", "nan", "inf", ""],
    "RescaleIntercept": ["1e308", "-1e308", "nan", "-inf", ""],
}
#: what the generator does to the pixel data's bytes
PIXEL_KINDS = ("truncate", "overwrite", "zeros", "item_length", "insert")
PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # little, big endian
ITEM = b"\xfe\xff\x00\xe0"


def greyscale_seeds(archive_root: Path) -> list[Path]:
    """Single-sample images (not masks) pydicom decodes: its bundled files (every transfer syntax it
    ships) and the sample archive's, none larger than 2 MB."""
    import pydicom.data

    bundled = Path(pydicom.data.__file__).parent / "test_files"
    paths = sorted(bundled.rglob("*.dcm"))
    paths += sorted(p for p in archive_root.rglob("*") if p.is_file() and not p.is_symlink())
    out = []
    for p in paths:
        if p.stat().st_size > 2_000_000:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p)
                if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or "PixelData" not in ds \
                        or ds.get("SOPClassUID") in MASK_SOP_CLASSES:
                    continue
                ds.pixel_array  # noqa: B018 (decodable)
        except Exception:
            continue
        out.append(p)
    return out


def with_own_uids(ds: pydicom.Dataset, rng: random.Random) -> None:
    """New study, series, instance and frame of reference UIDs (seeded)."""
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                 "FrameOfReferenceUID"):
        setattr(ds, name, generate_uid(entropy_srcs=[str(rng.random())]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def damage_pixels(data: bytes, rng: random.Random) -> tuple[bytes, str] | None:
    """``data`` with its pixel data's bytes damaged once; None if it has none."""
    at = max(data.rfind(tag) for tag in PIXEL_TAGS)
    if at < 0:
        return None
    buf = bytearray(data)
    kind = rng.choice(PIXEL_KINDS)
    pos = rng.randrange(at + 12, len(buf)) if len(buf) > at + 12 else len(buf) - 1
    if kind == "truncate":
        return bytes(buf[:pos]), kind
    if kind == "overwrite":
        for _ in range(rng.randint(1, 32)):
            buf[rng.randrange(at + 12, len(buf))] = rng.randrange(256)
    elif kind == "zeros":
        n = rng.randint(1, 512)
        buf[pos:pos + n] = bytes(len(buf[pos:pos + n]))
    elif kind == "item_length":  # of an encapsulated fragment, or the element's own
        items = [i for i in range(at, len(buf) - 8) if buf[i:i + 4] == ITEM][:64] or [at + 4]
        i = rng.choice(items) + 4
        value = rng.choice([0xFFFFFFFF, 0, 1, rng.randrange(1 << 32), rng.randrange(1 << 16)])
        buf[i:i + 4] = value.to_bytes(4, "little")
    else:
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(buf), kind


def damaged_images(root: Path, seeds: list[Path], n: int, seed: int) -> Counter[str]:
    """``n`` damaged images in ``root``, each with UIDs of its own; the damage made
    (a pixel kind, or the attribute rewritten)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    made: Counter[str] = Counter()
    while sum(made.values()) < n:
        kind = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(rng.choice(seeds))
            with_own_uids(ds, rng)
            if rng.random() < 0.5:
                name = rng.choice(list(ATTRIBUTES))
                value = rng.choice(ATTRIBUTES[name])
                setattr(ds, name, value)
                kind = f"{name}={value}"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=False)
        data = buf.getvalue()
        if kind is None:
            hurt = damage_pixels(data, rng)
            if hurt is None:
                continue
            data, kind = hurt
        (root / f"p{sum(made.values()):05d}.dcm").write_bytes(data)
        made[kind.split("=")[0]] += 1
    return made


@pytest.fixture(scope="module")
def seeds(archive) -> list[Path]:
    return greyscale_seeds(archive[0])


def features_of(root: Path, lake_dir: Path):
    """Ingest ``root`` into a research lake and run the features (worker processes)."""
    lake = Lake.create(lake_dir)
    s = ingest(lake, root, IngestConfig(scheduler="processes", workers=2))
    f = compute_features(Lake.open(lake_dir), FeaturesConfig(scheduler="processes", workers=2))
    return s, f


def check_features(lake_dir: Path, summary, masks: bool = False) -> dict:
    """Every image series of the lake has its rows; every statistic is finite; every
    failure has a message (with no ``masks``, there is none). Returns the image_stats
    rows by status."""
    with open_lake(lake_dir) as c:
        series = {r[0]: r[1] for r in c.con.execute(
            "SELECT SeriesInstanceUID, count(*) FROM instances WHERE Rows > 0 "
            f"AND SOPClassUID NOT IN {tuple(MASK_SOP_CLASSES)} GROUP BY ALL").fetchall()}
        geometry = c.con.execute("SELECT SeriesInstanceUID FROM series_geometry").fetchall()
        stats = c.con.sql("SELECT * FROM image_stats").to_arrow_table().to_pylist()
        failures = c.con.execute("SELECT reason, message FROM feature_failures").fetchall()
    assert sorted(g[0] for g in geometry) == sorted(series)
    assert sorted(r["SeriesInstanceUID"] for r in stats) == sorted(series)
    assert summary.series == len(series)
    assert masks or not failures  # no masks: nothing else fails
    by_status: dict[str, list[dict]] = {}
    for r in stats:
        by_status.setdefault(r["status"], []).append(r)
        assert r["instances_read"] + r["pixel_failures"] == series[r["SeriesInstanceUID"]]
        if r["status"] == "failed":
            assert r["voxel_count"] == 0 and r["failure_message"], r
            continue
        numbers = [r[k] for k in ("p01", "p05", "p25", "p50", "p75", "p95", "p99", "mean",
                                  "std", "min", "max", "saturated_fraction")]
        assert all(math.isfinite(v) for v in numbers), r
        assert r["noise_sigma"] is None or math.isfinite(r["noise_sigma"]), r
        assert r["min"] <= r["p50"] <= r["max"], r
    return by_status


def test_damaged_images_get_their_rows_and_finite_statistics(seeds, tmp_path):
    assert len(seeds) >= 40
    made = damaged_images(tmp_path / "files", seeds, FILES, seed=20261130)
    assert set(PIXEL_KINDS) <= set(made) and len(set(made) & set(ATTRIBUTES)) >= 8
    s, f = features_of(tmp_path / "files", tmp_path / "lake")
    assert s.files_seen == FILES
    by_status = check_features(tmp_path / "lake", f)
    assert len(by_status["ok"]) >= FILES // 5 and len(by_status["failed"]) >= FILES // 5


def image(path: Path, series: str, *, slope: str | None = "1", intercept: str = "-1024",
          pixels: np.ndarray | None = None) -> Path:
    """A 16 x 16 CT image of series ``series`` (native, little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.1", series
    ds.PatientID, ds.Modality, ds.StudyDate = "P1", "CT", "20240101"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    arr = np.arange(256, dtype=np.uint16).reshape(16, 16) if pixels is None else pixels
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_failed_first_series_leaves_the_others_their_statistics(tmp_path):
    """The rows of a run became a table through ``pa.Table.from_pylist``, which takes its
    columns from the first row: when the first series' statistics had failed (a row
    without them), every series of the run was written with null statistics and status
    ``ok``. Found by the damaged images."""
    src = tmp_path / "src"
    src.mkdir()
    image(src / "a.dcm", "1.2.826.0.1.3680043.10.9.2.1", slope="")  # first, and failing
    image(src / "b.dcm", "1.2.826.0.1.3680043.10.9.2.2")
    lake = Lake.create(tmp_path / "lake", profile="identified")  # the UIDs as written
    ingest(lake, src, IngestConfig(scheduler="synchronous"))
    compute_features(lake, FeaturesConfig(scheduler="synchronous"))
    with open_lake(tmp_path / "lake") as c:
        rows = c.con.sql("SELECT SeriesInstanceUID, status, mean, min, max, failure_message "
                         "FROM image_stats ORDER BY 1").fetchall()
    assert rows[1] == ("1.2.826.0.1.3680043.10.9.2.2", "ok", 127.5 - 1024, -1024.0, -769.0,
                       None)
    assert rows[0][1:5] == ("failed", None, None, None)
    assert "Rescale Slope or Rescale Intercept is empty" in rows[0][5]


@pytest.mark.parametrize(("slope", "intercept", "message"), [
    ("", "-1024", "Rescale Slope or Rescale Intercept is empty"),
    ("1", "-inf", "give values that are not finite"),
    ("nan", "0", "give values that are not finite"),
])
def test_an_instance_whose_rescale_gives_no_number_is_a_pixel_failure(
        tmp_path, slope, intercept, message):
    """One instance of three: the series keeps the statistics of the other two (an
    empty Rescale Slope raised out of the statistics, and cost the series all of its
    rows; an infinite intercept gave a mean of -inf and an ``ok``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's on the invalid DS values
        paths = [image(tmp_path / f"{i}.dcm", "1.2.3", slope=s, intercept=i_) for i, (s, i_)
                 in enumerate([("1", "-1024"), (slope, intercept), ("1", "-1024")])]
        row = series_stats("1.2.3", [(f"sop{i}", str(p)) for i, p in enumerate(paths)], "CT")
    assert (row["status"], row["instances_read"], row["pixel_failures"]) == ("partial", 2, 1)
    assert row["failure_message"].startswith("sop1 ") and message in row["failure_message"]
    assert (row["voxel_count"], row["mean"], row["min"]) == (512, 127.5 - 1024, -1024.0)


def test_statistics_of_values_near_the_float_range_are_finite(tmp_path):
    """A Rescale Intercept of 1e308 is a valid DS: the mean and standard deviation are
    computed without a sum that overflows, a percentile between -1e308 and 1e308 too."""
    from etl.imagestats import ValueCounts

    path = image(tmp_path / "big.dcm", "1.2.3", slope="1", intercept="1e308")
    row = series_stats("1.2.3", [("sop", str(path))], "CT")
    assert row["status"] == "ok" and row["mean"] == pytest.approx(1e308)
    assert all(math.isfinite(row[k]) for k in ("mean", "std", "p50", "max"))
    hist = ValueCounts()
    hist.add(np.array([-1e308, 1e308]), np.array([1, 1]))
    assert hist.percentiles([50]) == [0.0] and hist.mean_std() == (0.0, 1e308)


def test_features_print_nothing_for_damaged_images(seeds, tmp_path):
    """``lake features`` as a user runs it: its summary on stdout, nothing on stderr
    (pydicom warns about truncated items, excess frames and invalid values in the
    workers, where the command's own filter does not reach)."""
    damaged_images(tmp_path / "files", seeds, 60, seed=11)
    exe = shutil.which("lake") or str(Path(sys.executable).parent / "lake")
    lake = tmp_path / "lake"
    subprocess.run([exe, "init", str(lake)], check=True, capture_output=True)
    subprocess.run([exe, "ingest", str(tmp_path / "files"), "--lake", str(lake),
                    "--no-progress"], check=True, capture_output=True)
    r = subprocess.run([exe, "features", "--lake", str(lake)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("features run ") and r.stderr == "", r.stderr[:2000]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_more_damaged_images(seeds, tmp_path, seed):
    """2 x 1,500 more damaged images, ingested and their features computed."""
    made = damaged_images(tmp_path / "files", seeds, 1500, seed)
    assert set(PIXEL_KINDS) | set(ATTRIBUTES) == set(made)
    s, f = features_of(tmp_path / "files", tmp_path / "lake")
    assert s.files_seen == 1500
    check_features(tmp_path / "lake", f)


def ct_series(folder: Path, rng: random.Random, slices: int = 4, size: int = 24
              ) -> list[pydicom.Dataset]:
    """A small axial CT series (noise in 0..2000, rescaled to HU), UIDs of its own, written
    to ``folder``; its datasets."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    uids = {n: generate_uid(entropy_srcs=[str(rng.random())])
            for n in ("study", "series", "frame")}
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.PatientID, ds.PatientName, ds.Modality = "P7", "Doe^Jane", "CT"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyTime, ds.AccessionNumber = "120000", "A1"
        ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber = "", "1", 1
        ds.StudyDate, ds.BodyPartExamined = "20240101", "CHEST"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 2000, (size, size))
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(folder / f"ct{k}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


#: what a damaged SEG of :func:`damaged_volumes` may say of its frames
SEG_ATTRIBUTES: dict[str, list] = {
    "Rows": [0, 1, 25, 65535], "Columns": [0, 23, 65535],
    "NumberOfFrames": ["0", "3", "5", "100000", "2147483647"],
    "BitsAllocated": [0, 8, 16], "SegmentationType": ["FRACTIONAL", "LABELMAP", "X"],
}
#: the box both masks of :func:`damaged_volumes` cover: rows, columns (first, one past)
BOX = ((5, 19), (4, 20))


def write_seg(path: Path, folder: Path, slices: int) -> None:
    """A binary DICOM SEG (highdicom) of the box on the CT slices in ``folder``."""
    import highdicom as hd

    sources = [pydicom.dcmread(folder / f"ct{k}.dcm") for k in range(slices)]
    mask = np.zeros((slices, sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[:, slice(*BOX[0]), slice(*BOX[1])] = True
    box = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Box",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("39607008", "SCT", "Lung"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[box],
        series_instance_uid=generate_uid(), series_number=99, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")
    seg.save_as(path)


def damaged_volumes(root: Path, n: int, seed: int) -> dict[str, str]:
    """``n`` small CT series, each with an RTSTRUCT and a SEG of one box on it, one file of
    five damaged in four series of five: a slice's pixels or pixel description, or a
    mask anywhere. Returns each series folder's damage ("" when none)."""
    from tests.etl.features_data import write_rtstruct
    from tests.etl.test_mutated import mutate

    rng = random.Random(seed)
    made = {}
    for i in range(n):
        folder = root / f"s{i:04d}"
        headers = ct_series(folder, rng)
        write_rtstruct(folder / "rt.dcm", headers, cols=BOX[1], rows=BOX[0])
        write_seg(folder / "seg.dcm", folder, len(headers))
        what = rng.choice(["", "slice", "slice", "rt", "seg"])
        if what == "slice":
            path = folder / f"ct{rng.randrange(len(headers))}.dcm"
            if rng.random() < 0.5:
                ds = pydicom.dcmread(path)
                name = rng.choice(list(ATTRIBUTES))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(ds, name, rng.choice(ATTRIBUTES[name]))
                    ds.save_as(path, enforce_file_format=False)
                what = f"slice {name}"
            else:
                hurt = damage_pixels(path.read_bytes(), rng)
                assert hurt is not None
                path.write_bytes(hurt[0])
                what = f"slice {hurt[1]}"
        elif what == "seg" and rng.random() < 0.5:  # what describes its frames
            ds = pydicom.dcmread(folder / "seg.dcm")
            name = rng.choice(list(SEG_ATTRIBUTES))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(ds, name, rng.choice(SEG_ATTRIBUTES[name]))
                ds.save_as(folder / "seg.dcm", enforce_file_format=False)
            what = f"seg {name}"
        elif what:
            data, kind = mutate((folder / f"{what}.dcm").read_bytes(), rng, head=1 << 20)
            (folder / f"{what}.dcm").write_bytes(data)
            what = f"{what} {kind}"
        made[folder.name] = what
    return made


def test_damaged_volumes_and_masks_give_features_or_failures(tmp_path):
    """Radiomics over damaged series and structure sets: every mask the lake holds on a
    series gives its box's features or a failure row saying why; an undamaged series
    gives the features of the whole box."""
    made = damaged_volumes(tmp_path / "files", 30, seed=3)
    assert sum(1 for v in made.values() if not v) >= 3
    s, f = features_of(tmp_path / "files", tmp_path / "lake")
    assert s.files_seen == 30 * 6
    check_volumes(tmp_path / "lake", made, f)


def check_volumes(lake_dir: Path, made: dict[str, str], summary) -> None:
    check_features(lake_dir, summary, masks=True)
    with open_lake(lake_dir, vault=True) as c:
        rows = c.con.execute(
            "SELECT f.path, i.SeriesInstanceUID, i.SOPInstanceUID, i.SOPClassUID "
            "FROM files f JOIN instances i USING (SOPInstanceUID)").fetchall()
        features = dict(c.con.execute(  # a damaged mask may cover other voxels
            "SELECT mask_SOPInstanceUID, max(voxel_count) FROM radiomics_features "
            "WHERE segment_number IN (1, 7) GROUP BY ALL").fetchall())
        failures = c.con.execute(
            "SELECT SeriesInstanceUID, mask_SOPInstanceUID, reason, message "
            "FROM feature_failures").fetchall()
    failed = {m: (reason, message) for _, m, reason, message in failures}
    # a mask placed on no series (its reference damaged) has a row of no series
    assert all((s is None) == (r == "no_image_series" or (r == "unsupported_mask" and
                                                         "header" in message))
               for s, _, r, message in failures), failures
    assert all(message for _, message in failed.values())
    assert not {r for r, _ in failed.values()} & {"feature_error"}, failures
    series = {Path(p).parent.name: s for p, s, _, c in rows if c == CTImageStorage}
    # a mask whose SOP class was damaged is no mask (nor an image): it gives nothing
    masks = [(Path(p).parent.name, sop) for p, _, sop, c in rows if c in MASK_SOP_CLASSES]
    assert len(masks) > len(made)
    for name, sop in masks:
        assert (sop in features) != (sop in failed), (name, made[name])
        if not made[name]:  # the whole box
            assert features.get(sop) == 16 * 14 * 4 and name in series
    assert all(message.isprintable() for _, message in failed.values())


@pytest.mark.slow
def test_more_damaged_volumes_and_masks(tmp_path):
    """200 more series with their masks, one file of six damaged in four series of five."""
    made = damaged_volumes(tmp_path / "files", 200, seed=4)
    s, f = features_of(tmp_path / "files", tmp_path / "lake")
    assert s.files_seen == 200 * 6
    check_volumes(tmp_path / "lake", made, f)


def test_a_failure_row_quotes_no_value_of_the_file(tmp_path):
    """A structure set whose contour points were overwritten by a name: the reader's error
    quoted the value it could not read as a number, and the research lake's
    ``feature_failures`` held the name. Now a failure names the error and leaves out the
    values it quotes (:func:`lakehouse.errors.error_text`)."""
    from tests.etl.features_data import write_rtstruct

    headers = ct_series(tmp_path / "files" / "s", random.Random(5))
    write_rtstruct(tmp_path / "files" / "s" / "rt.dcm", headers, cols=(4, 20), rows=(5, 19))
    data = (tmp_path / "files" / "s" / "rt.dcm").read_bytes()
    at = data.index(b"\x06\x30\x50\x00DS") + 8  # the first ContourData's value
    (tmp_path / "files" / "s" / "rt.dcm").write_bytes(data[:at] + b"Kildare^Rita" + data[at + 12:])
    s, f = features_of(tmp_path / "files", tmp_path / "lake")
    assert (s.outcomes["ingested"], f.failure_reasons) == (5, {"unsupported_mask": 1})
    with open_lake(tmp_path / "lake") as c:
        (message,) = c.con.execute("SELECT message FROM feature_failures").fetchone()
    assert message == ("the rtstruct mask cannot be placed on the image: ValueError: could "
                       "not convert string to float: '…'")


def test_error_text_keeps_numbers_keywords_and_types():
    from lakehouse.errors import error_text

    assert error_text(ValueError("A (0028,0103) 'Pixel Representation' value of '2' is "
                                 "invalid")) == \
        "ValueError: A (0028,0103) 'Pixel Representation' value of '2' is invalid"
    assert error_text(AttributeError("'Dataset' object has no attribute 'ContourData'")) \
        == "AttributeError: 'Dataset' object has no attribute 'ContourData'"
    assert error_text(ValueError("bad 'Doe^Jane' \"A1234\" '-inf' '1e308'")) == \
        "ValueError: bad '…' '…' '-inf' '1e308'"
    assert error_text(RuntimeError("raw \x00\x01 bytes")) == "RuntimeError: raw ?? bytes"
    assert error_text(KeyError()) == "KeyError"


def test_a_mask_of_no_series_of_the_lake_is_a_failure_row(tmp_path):
    """A structure set whose referenced series is not in the lake (damaged, or not
    ingested yet) gave nothing at all, silently. Now a run over the whole lake records it
    (``no_image_series``, with no series), and the next such run replaces that row; a run
    over some series cannot tell whose it is and records nothing."""
    from tests.etl.features_data import write_rtstruct

    src = tmp_path / "files"
    headers = ct_series(src / "a", random.Random(6))
    other = ct_series(tmp_path / "elsewhere", random.Random(7))  # never ingested
    write_rtstruct(src / "a" / "rt.dcm", other, cols=BOX[1], rows=BOX[0])
    write_rtstruct(src / "a" / "rt_ok.dcm", headers, cols=BOX[1], rows=BOX[0])
    lake = Lake.create(tmp_path / "lake")
    ingest(lake, src, IngestConfig(scheduler="synchronous"))

    def failures() -> list[tuple]:
        with open_lake(tmp_path / "lake") as c:
            return c.con.execute("SELECT SeriesInstanceUID, stage, reason FROM "
                                 "feature_failures").fetchall()

    for _ in range(2):
        f = compute_features(Lake.open(tmp_path / "lake"), FeaturesConfig(scheduler="synchronous"))
        assert (f.series, f.masks, f.segments, f.failure_reasons) == \
            (1, 1, 1, {"no_image_series": 1})
        assert failures() == [(None, "mask", "no_image_series")]
    with open_lake(tmp_path / "lake") as c:
        (series,) = c.con.execute("SELECT DISTINCT SeriesInstanceUID FROM instances "
                                  "WHERE Modality = 'CT'").fetchone()
    f = compute_features(Lake.open(tmp_path / "lake"),
                         FeaturesConfig(scheduler="synchronous", series=(series,)))
    assert f.failure_reasons == {} and failures() == [(None, "mask", "no_image_series")]


def test_exports_of_damaged_images_skip_what_is_not_one_faithful_volume(seeds, tmp_path):
    """``lake cohort export`` of a research lake of damaged images and volumes, as DICOM
    and as NIfTI: every series is written or skipped with a reason code; a written
    volume holds finite numbers only (a NaN Rescale Slope wrote a volume of NaN; a row
    count of 65,535, beyond NIfTI-1's dimensions, stopped the whole export with a
    traceback); nothing is printed but the summary and one line per skipped series."""
    import SimpleITK as sitk

    from catalog.nifti import REASONS

    damaged_images(tmp_path / "files" / "images", seeds, 120, seed=12)
    damaged_volumes(tmp_path / "files" / "volumes", 10, seed=13)
    exe = shutil.which("lake") or str(Path(sys.executable).parent / "lake")
    lake = tmp_path / "lake"
    for args in (["init", str(lake)],
                 ["ingest", str(tmp_path / "files"), "--lake", str(lake), "--no-progress"],
                 ["cohort", "save", "all", "--lake", str(lake), "--sql",
                  "SELECT SeriesInstanceUID FROM series"]):
        subprocess.run([exe, *args], check=True, capture_output=True)
    with open_lake(lake) as c:
        series = c.con.execute("SELECT count(*) FROM series").fetchone()[0]
    for kind in ("dicom", "nifti"):
        r = subprocess.run([exe, "cohort", "export", "all", "--lake", str(lake), "--to",
                            str(tmp_path / kind), "--as", kind, "--no-progress"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith(f"exported cohort all (snapshot 2) as {kind} ")
        lines = r.stderr.splitlines()
        assert all(line.startswith("lake cohort export: not exported ") for line in lines), \
            [line for line in lines if not line.startswith("lake cohort export: not exported")]
    with open(tmp_path / "nifti" / "manifest" / "nifti.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == series
    assert {r["reason"] for r in rows if r["status"] == "skipped"} <= set(REASONS)
    written = [r["file"] for r in rows if r["status"] == "written"]
    assert len(written) >= 10
    for name in written:
        assert np.isfinite(sitk.GetArrayViewFromImage(
            sitk.ReadImage(str(tmp_path / "nifti" / name)))).all(), name


@pytest.mark.parametrize(("change", "reason", "message"), [
    ({"RescaleSlope": "nan"}, "invalid_header", "give values that are not finite"),
    ({"RescaleIntercept": ""}, "invalid_header", "Rescale Slope or Rescale Intercept is empty"),
    ({"Rows": 32768, "Columns": 1}, "too_large", "NIfTI-1 holds at most 32,767"),
])
def test_a_volume_nifti_cannot_hold_faithfully_is_skipped(tmp_path, change, reason, message):
    from catalog import cohorts
    from catalog.export import export

    headers = ct_series(tmp_path / "files", random.Random(14), slices=2, size=8)
    for k, ds in enumerate(headers):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, value in change.items():
                setattr(ds, name, value)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
        ds.save_as(tmp_path / "files" / f"ct{k}.dcm", enforce_file_format=True)
    lake = Lake.create(tmp_path / "lake")
    ingest(lake, tmp_path / "files", IngestConfig(scheduler="synchronous"))
    cohorts.save(lake, "all", sql="SELECT SeriesInstanceUID FROM series")
    summary = export(lake, "all", tmp_path / "out", "nifti")
    assert summary.written == 0 and list(summary.reasons.values()) == [reason]
    assert message in next(iter(summary.not_exported.values()))


def test_a_series_that_kills_its_worker_is_a_failure_row_and_the_run_goes_on(
        tmp_path, monkeypatch):
    """A decoder that segfaults, or a file that takes all the memory, kills its worker
    process: the pool broke, and the whole features run ended with a traceback and
    committed nothing (a SEG whose Number of Frames was damaged to 2,147,483,647 did
    so, before highdicom was spared it). Now the batches are computed again, a crashing
    one in halves, and only the series that kills its worker is a ``worker_crash`` row."""
    from tests.etl.features_data import write_rtstruct

    rng = random.Random(15)
    for name in "abcd":
        headers = ct_series(tmp_path / "files" / name, rng)
        write_rtstruct(tmp_path / "files" / name / "rt.dcm", headers, cols=BOX[1], rows=BOX[0])
    (tmp_path / "files" / "c" / "ct2.dcm").rename(tmp_path / "files" / "c" / "ct2_poison.dcm")
    lake = Lake.create(tmp_path / "lake")
    ingest(lake, tmp_path / "files", IngestConfig(scheduler="synchronous"))
    # spawned workers inherit the environment: reading that file exits the worker
    monkeypatch.setenv("LAKE_TEST_CRASH_MARKER", "_poison")
    f = compute_features(Lake.open(tmp_path / "lake"),
                         FeaturesConfig(scheduler="processes", workers=2, batch_series=2))
    assert (f.series, f.image_stats, f.segments) == (4, 3, 3)
    assert f.failure_reasons == {"worker_crash": 1}
    with open_lake(tmp_path / "lake", vault=True) as c:
        crashed = c.con.execute(
            "SELECT count(*) FROM feature_failures x JOIN instances i USING (SeriesInstanceUID) "
            "JOIN files f USING (SOPInstanceUID) WHERE x.reason = 'worker_crash' "
            "AND f.path LIKE '%/c/ct2_poison.dcm'").fetchone()[0]
        assert crashed == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"NumberOfFrames": "2147483647"}, "Number of Frames (2147483647) is not the number of "
                                       "per-frame functional groups (4)"),
    ({"ReferencedSegmentNumber": 2}, "SEG frame 1 references segment 2, which its "
                                     "SegmentSequence does not define"),
])
def test_a_damaged_seg_is_a_failure_not_all_the_memory(tmp_path, change, message):
    """A SEG whose Number of Frames was damaged to 2,147,483,647: highdicom sized its
    frame index by it, took 13 GB and more, and the kernel killed the worker. Read in
    a child limited to 3 GB of address space, so that a regression fails here instead
    of taking the machine's memory."""
    folder = tmp_path / "s"
    ct_series(folder, random.Random(16))
    write_seg(folder / "seg.dcm", folder, 4)
    ds = pydicom.dcmread(folder / "seg.dcm")
    if "NumberOfFrames" in change:
        ds.NumberOfFrames = change["NumberOfFrames"]
    else:
        groups = [ds.PerFrameFunctionalGroupsSequence[0], ds.SharedFunctionalGroupsSequence[0]]
        (item,) = [g.SegmentIdentificationSequence[0] for g in groups
                   if "SegmentIdentificationSequence" in g][:1]
        item.ReferencedSegmentNumber = change["ReferencedSegmentNumber"]
    ds.save_as(folder / "seg.dcm")
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
import pydicom
from etl.errors import FeatureError
from etl.masks import read_seg
from etl.volumes import series_geometry
rows = []
for k in range(4):
    h = pydicom.dcmread(Path({str(folder)!r}) / f"ct{{k}}.dcm", stop_before_pixels=True)
    rows.append(dict(SOPInstanceUID=h.SOPInstanceUID, SeriesInstanceUID=h.SeriesInstanceUID,
                     ImagePositionPatient=[float(v) for v in h.ImagePositionPatient],
                     ImageOrientationPatient=[float(v) for v in h.ImageOrientationPatient],
                     PixelSpacing=[float(v) for v in h.PixelSpacing], Rows=h.Rows,
                     Columns=h.Columns))
try:
    read_seg(str(Path({str(folder)!r}) / "seg.dcm"), series_geometry(rows))
except FeatureError as err:
    print(err.reason, err.message)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    reason, _, text = r.stdout.strip().partition(" ")
    assert reason == "unsupported_mask" and message in text, r.stdout


def test_a_volume_beyond_float32_and_a_span_of_too_many_bins_are_failures(tmp_path):
    """One slice of four with a Rescale Intercept of 1e308: finite, so its statistics are
    computed, but infinite as the volume's float32, and the radiomics' bin edges (width
    25 from -1024 to 1e308) exceeded numpy's largest array. Found by the damaged volumes:
    a ``feature_error``. Now the volume is a pixel failure, and a span of more bins than
    ``MAX_BINS`` says what to set."""
    from etl.errors import FeatureError
    from etl.radiomics.firstorder import MAX_BINS, bin_edges
    from etl.volumes import load_volume, series_geometry

    headers = ct_series(tmp_path / "s", random.Random(17))
    headers[1].RescaleIntercept = "1e308"
    headers[1].save_as(tmp_path / "s" / "ct1.dcm", enforce_file_format=True)
    rows = [{"SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
             "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
             "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
             "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
             "Columns": h.Columns} for h in headers]
    paths = {h.SOPInstanceUID: str(tmp_path / "s" / f"ct{k}.dcm")
             for k, h in enumerate(headers)}
    with pytest.raises(FeatureError) as err:
        load_volume(series_geometry(rows), paths)
    assert err.value.reason == "pixel_decode"
    assert "beyond float32's range" in err.value.message
    assert len(bin_edges(np.array([-1024.0, 3071.0]))) == 166  # CT: 165 bins, and one
    with pytest.raises(ValueError, match=f"more than {MAX_BINS:,}"):
        bin_edges(np.array([-1024.0, 3e38]))


def test_pixel_bytes_beyond_the_declared_frames_are_not_read_as_frames(tmp_path):
    """A single-frame image whose pixel data holds twice its frame: pydicom returns the
    bytes beyond as a second frame (and warns), so its statistics counted 512 pixels of a
    16 x 16 image, and a volume of such slices could not be stacked (an unexpected
    ``feature_error``). Now the frames the header declares are read, as the lake's row
    and the NIfTI export count them."""
    from etl.volumes import load_volume, series_geometry

    headers = ct_series(tmp_path / "s", random.Random(18), size=16)
    for k, ds in enumerate(headers):
        ds.PixelData = ds.PixelData * 2
        ds.save_as(tmp_path / "s" / f"ct{k}.dcm", enforce_file_format=True)
    files = [(h.SOPInstanceUID, str(tmp_path / "s" / f"ct{k}.dcm"))
             for k, h in enumerate(headers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's: excess padding removed
        row = series_stats("1.2.3", files, "CT")
    assert (row["status"], row["voxel_count"]) == ("ok", 4 * 16 * 16)
    rows = [{"SOPInstanceUID": h.SOPInstanceUID, "SeriesInstanceUID": h.SeriesInstanceUID,
             "ImagePositionPatient": [float(v) for v in h.ImagePositionPatient],
             "ImageOrientationPatient": [float(v) for v in h.ImageOrientationPatient],
             "PixelSpacing": [float(v) for v in h.PixelSpacing], "Rows": h.Rows,
             "Columns": h.Columns} for h in headers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = load_volume(series_geometry(rows), dict(files))
    assert image.GetSize() == (16, 16, 4)
