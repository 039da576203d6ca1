"""The fast raw parser against pydicom, the reference: same DICOM JSON, same typed values."""

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files

from etl import rawjson, safety
from etl.errors import FileRejected
from etl.headers import _strip_bulk, parse, to_json_dict
from lakehouse.deid import Policy
from lakehouse.privacy import Pseudonymizer


def local_test_files() -> set[Path]:
    """pydicom's bundled files and those of the pydicom-data package, listed from disk:
    ``get_testdata_files`` would try to download the ones that are not installed."""
    import pydicom.data
    from pydicom.data.data_manager import external_data_sources

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    roots += [Path(src.data_path) for src in external_data_sources().values()
              if hasattr(src, "data_path")]
    return {p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()}


def corpus(extra: Path | None = None) -> list[Path]:
    files = local_test_files() | {Path(f) for f in get_charset_files("*")}
    if extra is not None:
        files |= {p for p in extra.rglob("*") if p.is_file()}
    return sorted(p for p in files if p.is_file())


def pydicom_json(path: Path, layout) -> dict | None:
    """pydicom's JSON of the header, or None when pydicom itself cannot serialise it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=layout.kind == "raw")
            data = ds.to_json_dict(bulk_data_threshold=1024,
                                   bulk_data_element_handler=lambda _e: "",
                                   suppress_invalid_tags=False)
        except Exception:
            return None
    _strip_bulk(data)
    return data


@pytest.fixture(scope="module")
def files(archive):
    return corpus(archive[0])


def test_fast_json_equals_pydicom_json(files):
    fast = fallback = 0
    mismatches = []
    for path in files:
        buf = path.read_bytes()
        try:
            layout = safety.check(buf)
        except FileRejected:
            continue
        ref = pydicom_json(path, layout)
        got = rawjson.to_json(buf, layout)
        if got is None:
            fallback += 1
            continue
        if ref is None:
            continue  # pydicom cannot serialise this header (e.g. an invalid UI value)
        _strip_bulk(got)
        if got != ref or list(got) != list(ref):
            mismatches.append(path.name)
        fast += 1
    assert mismatches == []
    assert fast >= 350  # the generated archive and most of pydicom's files take the fast path
    assert fallback >= 20  # big endian, deflate, ISO 2022, ... go to pydicom


def test_records_are_equal_on_both_paths(files):
    policy = Policy(Pseudonymizer(bytes(32)))
    compared = 0
    for path in files:
        buf = path.read_bytes()
        for pol in (None, policy):
            try:
                fast = parse(buf, path.name, policy=pol, fast=True)
                slow = parse(buf, path.name, policy=pol, fast=False)
            except FileRejected as exc:
                with pytest.raises(FileRejected) as again:
                    parse(buf, path.name, policy=pol, fast=False)
                assert again.value.reason == exc.reason, path.name
                continue
            if fast["dicom_json"] != slow["dicom_json"] and \
                    pydicom_json(path, safety.check(buf)) is None:
                continue  # pydicom drops attributes it cannot serialise: not a reference
            assert fast == slow, (path.name, pol is not None,
                                  {k for k in fast if fast[k] != slow.get(k)})
            compared += 1
    assert compared >= 700


def test_code_extensions_are_decoded_with_pydicoms_decoder_and_odd_files_fall_back():
    from pydicom.data import get_testdata_file

    path = next(Path(f) for f in get_charset_files("*") if f.endswith("chrH31.dcm"))
    buf = path.read_bytes()  # ISO 2022 IR 87: on the fast path, decoded as pydicom does
    pn = rawjson.to_json(buf, safety.check(buf))["00100010"]["Value"][0]
    assert (pn["Alphabetic"], pn["Ideographic"], pn["Phonetic"]) == (
        "Yamada^Tarou", "山田^太郎", "やまだ^たろう")
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):  # big endian, deflate
        buf = Path(get_testdata_file(name)).read_bytes()
        assert rawjson.to_json(buf, safety.check(buf)) is None, name


def test_to_json_dict_reference_is_pydicom():
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert to_json_dict(ds, 1024)["00180050"] == {"vr": "DS", "Value": [5.0]}


def test_header_only_reads_equal_whole_file_reads(files):
    """Over the whole corpus (pydicom's files, the character sets, the generated archive):
    reading only up to the pixel data gives the same outcome and the same row as reading
    every byte; only the checksum's coverage differs, and only for files with pixel data."""
    from etl.headers import read_file

    differ, partial = [], 0
    for path in files:
        h = read_file(str(path), checksum="header")
        f = read_file(str(path), checksum="full")
        if (h.status, h.reason, h.record) != (f.status, f.reason, f.record):
            differ.append((path.name, h.status, h.reason, f.status, f.reason))
        if f.checksum_bytes != f.size:
            differ.append((path.name, "full checksum does not cover the file"))
        if h.checksum_bytes != f.checksum_bytes:
            partial += 1
            assert h.status == "ok" and h.checksum_bytes < f.checksum_bytes
    assert differ == []
    assert partial > len(files) // 2  # most files have pixel data that was not read
