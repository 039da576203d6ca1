"""The batch reader (:mod:`etl.batchread`) against the per-file path, its reference.

``extract_batch`` with ``IngestConfig(columnar=True)`` must return the very table the
per-file path (``columnar=False``) returns for the same files: the same schema, the
same rows in the same order, every value equal by ``repr`` (so 0.0 and -0.0, 1 and
1.0 differ), the same DICOM JSON texts, quarantine reasons and messages. These tests
run both over the session's sample archive, the bad-input corpus, pydicom's files,
its character-set files and those of pydicom-data, for an identified lake, a research
lake and a research lake with a private allow-list, in both checksum modes; over
crafted files for each reason the element walk (:mod:`etl.batchwalk`) gives a file to
the per-file path; over clean files with values at the edges (character sets, dates,
numbers, identifiers, sequences, private attributes); and with the batch reader's memos
warm, cold, shared by two keys one after the other and by two threads side by side.
Each difference these tests found was fixed in the batch path; their tests stay, as
regression tests (an issuer kept in research lakes; a DICOMDIR told only by its name and
class; the bulk threshold, the character-set classes and the empty batch of the memos).
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from etl import batchread, batchwalk, extract
from etl.batchread import _PIXEL_TAG, head_of, read_batch
from etl.config import IngestConfig
from etl.discover import FoundFile, walk
from etl.extract import extract_batch
from etl.headers import HEAD_BYTES, FileResult
from etl.rawjson import ISO2022
from lakehouse import deid
from lakehouse.deid import Policy, private_tag
from lakehouse.privacy import Pseudonymizer
from tests.etl import corpus as bad_corpus
from tests.etl.corpus import PIXEL_TAG, _dataset_bytes, _nested, _Uids, base, part10

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
#: a private allow-list entry (GE's acquisition group, present in pydicom's files)
PRIVATE = {"group": "0x0019", "creator": "GEMS_ACQU_01", "element": "0x1e"}
POLICIES = ("identified", "research", "research-private")
CHECKSUMS = ("header", "full")


def make_policy(name: str, key: bytes = KEY_A) -> Policy | None:
    if name == "identified":
        return None
    return Policy(Pseudonymizer(key),
                  [private_tag(PRIVATE)] if name == "research-private" else [])


def found(paths: Sequence[Path | str]) -> list[FoundFile]:
    """The files as discovery gives them (a path that cannot be stat'ed: an error)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            out.append(FoundFile(str(p), 0, 0, error=str(exc)))
            continue
        out.append(FoundFile(str(p), st.st_size, st.st_mtime_ns))
    return out


def clear_batch_memos() -> None:
    """The batch reader's memos empty (a worker thread's first batch)."""
    batchread.clear_memos()
    assert not batchread._MEMOS.units and not batchread._MEMOS.filtered


def run(files: Sequence[FoundFile], policy: Policy | None, *, columnar: bool,
        batch: int = 128, **config) -> pa.Table:
    """``extract_batch`` over ``files`` in batches of ``batch``, as workers read them."""
    assert files, "an empty batch: see test_empty_batch"
    cfg = IngestConfig(columnar=columnar, **config)
    return pa.concat_tables([extract_batch(files[i:i + batch], cfg, "run-batchread", policy)
                             for i in range(0, len(files), batch)])


def table_differences(got: pa.Table, ref: pa.Table) -> list[str]:
    """Where ``got`` differs from ``ref``: [] when equal; else the first differing row
    (its path, column and both values' ``repr``) and the differing values per column."""
    if got.schema != ref.schema:
        return [f"schemas differ:\n{got.schema}\n--- reference ---\n{ref.schema}"]
    if got.num_rows != ref.num_rows:
        return [f"{got.num_rows} rows, the reference has {ref.num_rows}"]
    per_column: Counter[str] = Counter()
    first: tuple[int, str, str, str] | None = None
    for name in ref.column_names:
        a, b = got.column(name).to_pylist(), ref.column(name).to_pylist()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            rx, ry = repr(x), repr(y)
            if rx != ry:
                per_column[name] += 1
                if first is None or i < first[0]:
                    first = (i, name, rx, ry)
    if first is None:
        return []
    i, name, rx, ry = first
    paths = ref.column("path").to_pylist()
    # long values (DICOM JSON texts): from a little before where they first differ
    at = next((k for k, (cx, cy) in enumerate(zip(rx, ry, strict=False)) if cx != cy),
              min(len(rx), len(ry)))
    start = max(0, at - 200)
    cut = "..." if start else ""
    return [f"row {i} ({paths[i]}), column {name}, from character {start}:\n"
            f"  batch path: {cut}{rx[start:start + 500]}\n"
            f"  per-file:   {cut}{ry[start:start + 500]}",
            f"differing values per column: {dict(per_column)}"]


def assert_same_rows(files: Sequence[FoundFile], policy: Policy | None, *,
                     batch: int = 128, **config) -> pa.Table:
    """The batch path's table equals the per-file path's; returns it."""
    got = run(files, policy, columnar=True, batch=batch, **config)
    ref = run(files, policy, columnar=False, batch=batch, **config)
    diff = table_differences(got, ref)
    assert not diff, "\n".join(diff)
    return got


def statuses(paths: Sequence[Path], *, whole: bool = False) -> list[int]:
    """The element walk's status of each file, from the first bytes the batch path walks
    (``head_of``: a header-only read) or from all of it (``whole``)."""
    bufs, sizes = [], []
    for p in paths:
        data = p.read_bytes()
        bufs.append(data if whole else head_of(data))
        sizes.append(len(data))
    return batchwalk.walk(bufs, sizes).status.tolist()


# --- the corpora --------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive_files(archive) -> list[FoundFile]:
    """The session's sample archive, as discovery finds it, in path order."""
    return sorted(walk(archive[0]), key=lambda f: f.path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> list[FoundFile]:
    """The bad-input corpus as discovery finds it (its broken link: an ``io_error`` row;
    its link loop: skipped)."""
    root = tmp_path_factory.mktemp("bad-corpus")
    bad_corpus.build(root)
    return sorted(walk(root), key=lambda f: f.path)


@pytest.fixture(scope="module")
def pydicom_files() -> list[FoundFile]:
    """pydicom's bundled test files, its character-set files and pydicom-data's, listed
    from disk (``get_testdata_files`` would try to download missing ones)."""
    import pydicom.data
    from pydicom.data import get_charset_files
    from pydicom.data.data_manager import external_data_sources

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    roots += [Path(src.data_path) for src in external_data_sources().values()
              if hasattr(src, "data_path")]
    paths = {p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()}
    paths |= {Path(f) for f in get_charset_files("*")}
    return found(sorted(paths))


@pytest.fixture(scope="module")
def all_files(archive_files, bad_files, pydicom_files) -> list[FoundFile]:
    return archive_files + bad_files + pydicom_files


def test_the_corpus_is_the_one_the_counts_below_are_for(archive_files, bad_files,
                                                        pydicom_files):
    assert len(archive_files) == 306
    assert len(bad_files) == 64
    assert [f.error for f in bad_files if f.error] == ["No such file or directory"]
    # pydicom's own files (their number depends on the installed versions) and
    # pydicom-data's (a test dependency: never downloaded)
    assert sum("data_store" in f.path for f in pydicom_files) >= 60
    assert sum("charset_files" in f.path for f in pydicom_files) >= 15
    assert len(pydicom_files) >= 250


# --- 2. the whole corpus, every policy, both checksum modes, two batch sizes --------

@pytest.mark.parametrize("batch", [128, 37])
@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_batch_path_gives_the_rows_of_the_per_file_path(all_files, policy_name, checksum,
                                                        batch):
    got = assert_same_rows(all_files, make_policy(policy_name), batch=batch,
                           checksum=checksum)
    status = Counter(got.column("status").to_pylist())
    assert sum(status.values()) == len(all_files)
    assert status["ok"] > 300


@pytest.mark.parametrize("policy_name", POLICIES)
def test_shuffled_order_gives_the_rows_of_the_per_file_path(all_files, policy_name):
    files = list(all_files)
    random.Random(9).shuffle(files)
    got = assert_same_rows(files, make_policy(policy_name), checksum="full")
    assert got.column("path").to_pylist() == [f.path for f in files]


def _binary_elements_file(root: Path) -> FoundFile:
    """A file with short binary values (OW, OB) that a small bulk data threshold leaves
    out of the DICOM JSON and the default one keeps."""
    root.mkdir(parents=True, exist_ok=True)
    ds = base(_Uids())
    ds.add_new(0x00281201, "OW", bytes(range(100)))  # RedPaletteColorLookupTableData
    ds.add_new(0x00181010, "LO", "ST-1")  # SecondaryCaptureDeviceID
    ds.add_new(0x00189361, "OB", b"abcdef")  # within a threshold of 8: kept
    path = root / "binary_values.dcm"
    path.write_bytes(part10(ds))
    return found([path])[0]


@pytest.mark.parametrize("policy_name", ["identified", "research"])
def test_small_bulk_data_threshold(archive_files, pydicom_files, tmp_path, policy_name):
    clear_batch_memos()
    files = [_binary_elements_file(tmp_path)] + archive_files[:100] + [
        f for f in pydicom_files if "charset_files" in f.path]
    got = assert_same_rows(files, make_policy(policy_name), bulk_data_threshold=8,
                           checksum="header")
    text = got.column("dicom_json")[0].as_py()
    assert '"00281201"' not in text  # 100 bytes: bulk data
    assert '"00189361"' in text or policy_name == "research"  # not allowed in research


def test_memos_do_not_carry_one_bulk_data_threshold_into_another(tmp_path):
    """A memo class is keyed by the threshold (the 100-byte OW element decoded under 1024
    is kept in the JSON; under 8 it is bulk data)."""
    clear_batch_memos()
    files = [_binary_elements_file(tmp_path)]
    assert_same_rows(files, None, bulk_data_threshold=1024)
    assert_same_rows(files, None, bulk_data_threshold=8)


# --- 3. exact counts: the sample archive's files on each path ------------------------

def test_sample_archive_walk_statuses(archive, archive_files):
    paths = [Path(f.path) for f in archive_files]
    walked = statuses(paths)
    assert Counter(walked) == {
        batchwalk.CLEAN: 301,
        # misc/empty.dcm (0 bytes), misc/screenshot.png (a PNG), readme.txt (text): no
        # preamble and DICM
        batchwalk.NOT_PART10: 3,
        # misc/CT_cut_in_header.dcm: cut inside an element
        batchwalk.STRUCTURE: 1,
        # misc/CT_cut_in_pixels.dcm: Pixel Data longer than what is left of the file
        batchwalk.PIXELS: 1,
    }
    by_name = {str(p.relative_to(archive[0])): s for p, s in zip(paths, walked, strict=True)}
    assert {Path(n).name for n, s in by_name.items() if s} == {
        "empty.dcm", "screenshot.png", "readme.txt", "CT_cut_in_header.dcm",
        "CT_cut_in_pixels.dcm"}
    # explicit VR sequences are walked over (their bytes decoded by the per-file walk):
    # the 10 PET slices (RadiopharmaceuticalInformationSequence), the 4 CT radiation dose
    # SRs (ContentSequence, ...) and media/DICOMDIR (DirectoryRecordSequence) are clean
    assert sum(s == batchwalk.CLEAN for n, s in by_name.items() if "_PT/" in n) == 10
    assert by_name["media/DICOMDIR"] == batchwalk.CLEAN


def _per_file_paths(files: Sequence[FoundFile], policy: Policy | None,
                    **config) -> tuple[pa.Table, list[str]]:
    """``extract_batch``'s table (the batch path's) and the paths the batch path left to
    the per-file path (``read_batch`` does not return their rows)."""
    cfg = IngestConfig(**config)
    sent: list[str] = []
    for i in range(0, len(files), 128):
        batch = files[i:i + 128]
        read, table = read_batch(batch, cfg, "run-batchread", policy, extract.BATCH_SCHEMA)
        assert table.num_rows == len(read)
        done = set(read)
        sent += [f.path for j, f in enumerate(batch) if j not in done]
    return run(files, policy, columnar=True, **config), sent


@pytest.mark.parametrize("policy_name", POLICIES)
def test_sample_archive_files_on_each_path(archive_files, policy_name):
    table, sent = _per_file_paths(archive_files, make_policy(policy_name), checksum="header")
    names = sorted(os.path.basename(p) for p in sent)
    # the 5 files the walk does not call clean; media/DICOMDIR (by its name); three clean
    # files without a required UID (the per-file path quarantines them); the other 297
    # files are read column by column
    assert names == sorted(["empty.dcm", "screenshot.png", "readme.txt",
                            "CT_cut_in_header.dcm", "CT_cut_in_pixels.dcm", "DICOMDIR",
                            "no_study_uid.dcm", "no_series_uid", "no_sop_uid.dcm"])
    assert Counter(table.column("status").to_pylist()) == {"ok": 297, "quarantined": 8,
                                                          "skipped": 1}


# --- 4. crafted files for each status of the walk ------------------------------------

def _replace_vr(data: bytes, tag: bytes, vr: bytes) -> bytes:
    i = data.index(tag)
    return data[:i + 4] + vr + data[i + 6:]


def _crafted(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """{name: (bytes, walk status of a header-only read, of a whole-file read)}."""
    uid = _Uids()
    w = batchwalk
    out: dict[str, tuple[bytes, int, int]] = {}
    good = part10(base(uid))
    out["clean.dcm"] = (good, w.CLEAN, w.CLEAN)
    out["raw_explicit"] = (_dataset_bytes(base(uid), implicit=False), w.NOT_PART10,
                           w.NOT_PART10)
    out["raw_implicit"] = (_dataset_bytes(base(uid), implicit=True), w.NOT_PART10,
                           w.NOT_PART10)
    # the transfer syntax UID (0002,0010) with a VR that is no VR
    meta_bad = _replace_vr(part10(base(uid)), b"\x02\x00\x10\x00UI", b"Q!")
    out["meta_bad_vr.dcm"] = (meta_bad, w.META, w.META)
    ds = base(uid)
    ds.PixelData = bytes(64)
    out["big_endian.dcm"] = (part10(ds, ExplicitVRBigEndian), w.SYNTAX, w.SYNTAX)
    out["deflated.dcm"] = (part10(base(uid), DeflatedExplicitVRLittleEndian), w.SYNTAX,
                           w.SYNTAX)
    unknown = part10(base(uid)).replace(ExplicitVRLittleEndian.encode() + b"\x00",
                                        b"1.2.3.4.5.6.7.8.9.1\x00")
    out["unknown_syntax.dcm"] = (unknown, w.SYNTAX, w.SYNTAX)
    # a header of 40 KB: a header-only read of 32 KB must read on; a whole read is clean
    ds = base(uid)
    ds.ImageComments = "long comment " * 3000
    out["header_40k.dcm"] = (part10(ds), w.MORE, w.CLEAN)
    # a header of 12 KB: the first read (8 KB) does not see Pixel Data and reads on
    ds = base(uid)
    ds.ImageComments = "long comment " * 900
    ds.PixelData = bytes(40000)
    out["header_12k.dcm"] = (part10(ds), w.CLEAN, w.CLEAN)
    # Pixel Data's tag by chance in a value of the first 8 KB, the header 12 KB long:
    # the first read stops there, the walk needs more, the per-file path reads on
    ds.private_block(0x0009, "LAKE TEST", create=True).add_new(0x01, "OB", _PIXEL_TAG * 2)
    out["pixel_tag_in_value.dcm"] = (part10(ds), w.MORE, w.CLEAN)
    desc = good.index(b"Axial 1.25")
    out["cut_in_element.dcm"] = (good[:desc + 4], w.STRUCTURE, w.STRUCTURE)
    # SeriesDescription (0008,103E) rewritten with VR UN (a 4-byte length)
    data = part10(base(uid))
    i = data.index(b"\x08\x00\x3e\x10LO")
    n = struct.unpack_from("<H", data, i + 6)[0]
    un = data[i:i + 4] + b"UN\x00\x00" + struct.pack("<I", n) + data[i + 8:i + 8 + n]
    out["un_element.dcm"] = (data[:i] + un + data[i + 8 + n:], w.VR, w.VR)
    ds = base(uid)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D1100", "SRT", "Head"
    ds.AnatomicRegionSequence = DicomSequence([item])
    out["sequence.dcm"] = (part10(ds), w.CLEAN, w.CLEAN)  # explicit VR: walked over
    out["sequence_implicit.dcm"] = (part10(ds, ImplicitVRLittleEndian), w.SEQUENCE,
                                    w.SEQUENCE)
    data = part10(base(uid))
    i = data.index(PIXEL_TAG)
    out["sequence_nested_40.dcm"] = (data[:i] + _nested(40) + data[i:], w.SEQUENCE,
                                     w.SEQUENCE)  # deeper than the walk follows
    # the Modality element twice in a row
    data = part10(base(uid))
    i = data.index(b"\x08\x00\x60\x00CS")
    n = 8 + struct.unpack_from("<H", data, i + 6)[0]
    out["repeated_tag.dcm"] = (data[:i + n] + data[i:], w.ORDER, w.ORDER)
    ds = base(uid)
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9" * 3])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = "YBR_FULL_422"
    out["encapsulated.dcm"] = (part10(ds, JPEGBaseline8Bit), w.PIXELS, w.PIXELS)
    out["implicit.dcm"] = (part10(base(uid), ImplicitVRLittleEndian), w.CLEAN, w.CLEAN)
    # Pixel Data declared longer than the file
    data = part10(base(uid))
    out["pixels_cut.dcm"] = (data[:len(data) - 10], w.PIXELS, w.PIXELS)
    # Pixel Data beyond the first read (a header-only read stops before it), explicit
    # and implicit; empty Pixel Data; a TIFF preamble: all clean
    ds = base(uid)
    ds.PixelData = bytes(40000)
    out["pixels_40k.dcm"] = (part10(ds), w.CLEAN, w.CLEAN)
    out["pixels_40k_implicit.dcm"] = (part10(ds, ImplicitVRLittleEndian), w.CLEAN, w.CLEAN)
    ds = base(uid)
    ds.PixelData = b""
    out["pixels_empty.dcm"] = (part10(ds), w.CLEAN, w.CLEAN)
    data = part10(base(uid))
    out["tiff_preamble.dcm"] = (b"II*\x00" + bytes(range(124)) + data[128:], w.CLEAN,
                                w.CLEAN)
    # bytes after Pixel Data; Pixel Data with VR UN
    out["after_pixels.dcm"] = (data + bytes(2), w.PIXELS, w.PIXELS)
    i = data.index(PIXEL_TAG)
    out["pixels_un.dcm"] = (data[:i + 4] + b"UN" + data[i + 6:], w.PIXELS, w.PIXELS)
    # a file meta and no data set: clean, without the required UIDs
    out["meta_only.dcm"] = (data[:data.index(b"\x08\x00\x05\x00")], w.CLEAN, w.CLEAN)
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _, _) in out.items():
        (root / name).write_bytes(data)
    return out


#: what the per-file path makes of each crafted file (status, reason)
CRAFTED_OUTCOMES = {
    "clean.dcm": ("ok", None),
    "raw_explicit": ("ok", None),
    "raw_implicit": ("ok", None),
    "meta_bad_vr.dcm": ("quarantined", "not_dicom"),
    "big_endian.dcm": ("ok", None),
    "deflated.dcm": ("ok", None),
    "unknown_syntax.dcm": ("quarantined", "unsupported_transfer_syntax"),
    "header_40k.dcm": ("ok", None),
    "header_12k.dcm": ("ok", None),
    "pixel_tag_in_value.dcm": ("ok", None),
    "cut_in_element.dcm": ("quarantined", "truncated"),
    "un_element.dcm": ("ok", None),
    "sequence.dcm": ("ok", None),
    "sequence_implicit.dcm": ("ok", None),
    "sequence_nested_40.dcm": ("ok", None),
    "repeated_tag.dcm": ("ok", None),
    "encapsulated.dcm": ("ok", None),
    "implicit.dcm": ("ok", None),
    "pixels_cut.dcm": ("quarantined", "truncated"),
    "pixels_40k.dcm": ("ok", None),
    "pixels_40k_implicit.dcm": ("ok", None),
    "pixels_empty.dcm": ("ok", None),
    "tiff_preamble.dcm": ("ok", None),
    "after_pixels.dcm": ("ok", None),
    "pixels_un.dcm": ("ok", None),
    "meta_only.dcm": ("quarantined", "truncated"),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> tuple[Path, dict[str, tuple[bytes, int, int]]]:
    root = tmp_path_factory.mktemp("crafted")
    return root, _crafted(root)


@pytest.mark.parametrize("name", list(CRAFTED_OUTCOMES))
def test_crafted_file_status_and_fallback(crafted, name):
    root, files = crafted
    _, head_status, whole_status = files[name]
    path = root / name
    assert statuses([path]) == [head_status]
    assert statuses([path], whole=True) == [whole_status]
    for policy_name, checksum in itertools.product(POLICIES, CHECKSUMS):
        got = assert_same_rows(found([path]), make_policy(policy_name), checksum=checksum)
        row = got.to_pylist()[0]
        assert (row["status"], row["reason"]) == CRAFTED_OUTCOMES[name], \
            (policy_name, checksum)


def test_crafted_files_in_one_batch(crafted):
    """All of them at once, between clean files: the rows come back in order."""
    root, files = crafted
    paths = sorted(root / n for n in files)
    for policy_name, checksum in itertools.product(POLICIES, CHECKSUMS):
        got = assert_same_rows(found(paths), make_policy(policy_name), checksum=checksum)
        assert got.column("path").to_pylist() == [str(p) for p in paths]


@pytest.mark.parametrize("checksum", CHECKSUMS)
def test_crafted_files_on_each_path(crafted, checksum):
    """Exactly the files the walk does not call clean, and the clean one without its
    required UIDs, go to the per-file path; the rest are read column by column. The
    batch path walks the same first bytes of a file whatever the checksum mode
    (``head_of``), so header_40k.dcm goes to the per-file path even when the whole file
    was read."""
    root, files = crafted
    paths = sorted(root / n for n in files)
    _, sent = _per_file_paths(found(paths), None, checksum=checksum)
    expected = sorted(str(root / n) for n, (_, head, _) in files.items()
                      if head != batchwalk.CLEAN or n == "meta_only.dcm")
    assert sorted(sent) == expected
    assert len(sent) == 18


@pytest.mark.parametrize("checksum", CHECKSUMS)
def test_the_batch_path_walks_the_first_bytes_it_needs(crafted, checksum, monkeypatch):
    """A header-only read takes a file's first 8 KB, and reads on to 32 KB only when
    Pixel Data is not seen in them; a whole-file read walks the same bytes
    (``head_of``)."""
    from etl import batchread

    root, files = crafted
    paths = sorted(root / n for n in files)
    walked: list[bytes] = []
    real = batchread._fast_rows

    def spy(files, index, bufs, *rest, **kw):
        walked.extend(bufs)
        return real(files, index, bufs, *rest, **kw)

    monkeypatch.setattr(batchread, "_fast_rows", spy)
    read_batch(found(paths), IngestConfig(checksum=checksum), "run", None,
               extract.BATCH_SCHEMA)
    whole = [p.read_bytes() for p in paths]
    assert walked == [head_of(d) for d in whole]
    lengths = {p.name: len(b) for p, b in zip(paths, walked, strict=True)}
    assert lengths["pixels_40k.dcm"] == batchread.FIRST_BYTES == 8192
    assert lengths["header_12k.dcm"] == lengths["header_40k.dcm"] == HEAD_BYTES == 32768
    assert lengths["pixel_tag_in_value.dcm"] == 8192  # the tag seen: the walk asks for more
    assert lengths["clean.dcm"] == len(files["clean.dcm"][0]) < 8192  # the whole file


# --- sequences (explicit VR: on the batch path, decoded by the per-file walk) ---------

def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SRT", meaning
    return item


def _sequence_files(root: Path) -> list[Path]:
    uid = _Uids()
    files: dict[str, bytes] = {}

    def seq(ds: Dataset, keyword: str, items: list[Dataset], undefined: bool) -> None:
        setattr(ds, keyword, DicomSequence(items))
        ds[keyword].is_undefined_length = undefined
        for item in items:
            item.is_undefined_length_sequence_item = undefined

    for undefined in (False, True):
        tag = "undefined" if undefined else "defined"
        ds = base(uid)
        refs = []
        for n in (9, 10):
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = f"1.2.3.{n}"
            refs.append(item)
        seq(ds, "ReferencedImageSequence", refs, undefined)
        files[f"references_{tag}.dcm"] = part10(ds)
        ds = base(uid)
        request = Dataset()
        request.AccessionNumber = "A1"
        request.RequestedProcedureID = "R1"
        request.ScheduledProcedureStepStartDate = "20230104"
        request.ScheduledProcedureStepID = "Doe step"
        study = Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        seq(request, "ReferencedStudySequence", [study], undefined)
        seq(ds, "RequestAttributesSequence", [request], undefined)
        files[f"request_{tag}.dcm"] = part10(ds)
    ds = base(uid)
    ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    item = _code("T-D1100", "Head")
    item.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    item.add_new(0x0019101E, "DS", "3.5")  # allowed by the private allow-list
    item.add_new(0x00191001, "LO", "not allowed")
    ds.AnatomicRegionSequence = DicomSequence([item])
    files["private_in_item.dcm"] = part10(ds)
    del ds[0x00190010]  # private attributes in the item only: on the batch path
    files["private_only_in_item.dcm"] = part10(ds)
    ds = base(uid)
    ds.ReferencedImageSequence = DicomSequence([])
    ds.AnatomicRegionSequence = DicomSequence([Dataset()])
    files["empty_sequence_and_item.dcm"] = part10(ds)
    ds = base(uid)
    other = Dataset()
    other.PatientID = "P1-OLD"
    other.IssuerOfPatientID = "HOSPITAL B"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    files["other_patient_ids.dcm"] = part10(ds)
    ds = base(uid)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.AnatomicRegionSequence = DicomSequence([_code("T-D1100", "Tête, Müller")])
    files["utf8_in_item.dcm"] = part10(ds)
    ds = base(uid)
    inner = _code("T-1", "Head")
    for _ in range(4):  # five levels of sequences
        outer = _code("T-2", "Outer")
        outer.ConceptNameCodeSequence = DicomSequence([inner])
        inner = outer
    ds.ConceptNameCodeSequence = DicomSequence([inner])
    files["five_levels.dcm"] = part10(ds)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return [root / name for name in files]


@pytest.mark.parametrize("max_depth", [64, 3])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_sequences_give_the_rows_of_the_per_file_path(tmp_path, policy_name, max_depth):
    paths = _sequence_files(tmp_path)
    assert statuses(paths) == [batchwalk.CLEAN] * 10
    got = assert_same_rows(found(paths), make_policy(policy_name), max_depth=max_depth)
    reasons = got.column("reason").to_pylist()
    assert reasons == [None] * 9 + ["too_deep" if max_depth == 3 else None]
    texts = dict(zip(got.column("path").to_pylist(), got.column("dicom_json").to_pylist(),
                     strict=True))
    item_only = texts[str(tmp_path / "private_only_in_item.dcm")]
    # the allow-list applies inside items too: (0019,101E) kept, (0019,1001) dropped
    assert ('"0019101E"' in item_only) == (policy_name != "research")
    assert ('"00191001"' in item_only) == (policy_name == "identified")
    _, sent = _per_file_paths(found(paths), make_policy(policy_name), max_depth=max_depth)
    # on the batch path, but the private allow-list needs the creators, and the depth
    # limit is the per-file walk's to decide
    expected = {"private_in_item.dcm"} if policy_name == "research-private" else set()
    if max_depth == 3:
        expected.add("five_levels.dcm")
    assert {Path(p).name for p in sent} == expected


# --- values at the edges: files the walk calls clean, with values that are not plain --

def _edge_files(root: Path) -> list[Path]:
    """Clean files (every one on the batch path's walk) whose values test the decoding,
    the typed columns and the research filter element by element."""
    uid = _Uids()
    files: dict[str, bytes] = {}

    def put(name: str, ds: Dataset) -> None:
        files[name] = part10(ds)

    ds = base(uid)
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.add_new(0x00041130, "LO", "Z\u0439")  # text before the character set element
    put("text_before_charset.dcm", ds)
    ds = base(uid)
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.PatientName = "Иванов^Иван"
    ds.add_new(0x00080001, "UL", 5)
    put("cyrillic.dcm", ds)
    # DICOMDIR as the media storage SOP class (same length as the CT class, padded)
    data = part10(base(uid)).replace(b"1.2.840.10008.5.1.4.1.1.2\x00",
                                     b"1.2.840.10008.1.3.10" + bytes(6), 1)
    files["dicomdir_media.dcm"] = data
    files["dicomdir"] = part10(base(uid))  # a DICOMDIR by its name (any case)
    files["DicomDir"] = part10(base(uid))
    data = part10(base(uid))
    files["syntax_space_padded.dcm"] = data.replace(b"1.2.840.10008.1.2.1\x00",
                                                    b"1.2.840.10008.1.2.1 ")
    for charset in ("", ["ISO_IR 100", "ISO_IR 144"], "ISO_IR 999", "ISO_IR 100 ",
                    "iso_ir 100"):
        ds = base(uid)
        ds.SpecificCharacterSet = charset
        put(f"charset_{len(files):02d}.dcm", ds)
    ds = base(uid)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ünïcode^Name"
    ds.SeriesDescription = "Äxial"
    put("utf8.dcm", ds)
    ds = base(uid)
    del ds.SpecificCharacterSet
    ds.PatientName = "M\xfcller"
    put("no_charset.dcm", ds)
    ds = base(uid)
    ds.PatientName = ds.PatientID = ds.StudyDate = ""
    ds.SliceThickness = None
    put("empty_values.dcm", ds)
    ds = base(uid)
    ds.PatientID = "  "
    put("patient_id_spaces.dcm", ds)
    ds = base(uid)
    ds.PatientID = ["A", "B"]
    put("patient_id_two_values.dcm", ds)
    ds = base(uid)
    ds.OtherPatientIDs = ["P1", "X2"]
    ds.AccessionNumber, ds.StudyID = "ACC1", "S1"
    put("identifiers.dcm", ds)
    for n, (age, birth, study) in enumerate([("045Y", "19700101", "20230105"),
                                             ("120Y", None, "20230105"),
                                             ("45", "19700101", "20230105"),
                                             (None, "19700101", "19600101"),
                                             (None, "19700230", "20230105"),
                                             (None, "19700101", "20230105-20230107")]):
        ds = base(uid)
        if age:
            ds.PatientAge = age
        ds.PatientBirthDate = birth
        ds.StudyDate = study
        put(f"age_{n}.dcm", ds)
    ds = base(uid)
    ds.AcquisitionDateTime = "20230105101500.123456+0100"
    ds.ContentDate = "20230105"
    ds.add_new(0x00080021, "DA", "2023")
    ds.add_new(0x00080012, "DA", "20230105 ")
    put("dates.dcm", ds)
    ds = base(uid)
    ds.SliceThickness = "-0.0"
    ds.add_new(0x00280030, "DS", ["0.5", "-0"])
    ds.add_new(0x00180088, "DS", "1e3")
    ds.add_new(0x00181050, "DS", " 1.5 ")
    put("decimal_strings.dcm", ds)
    data = part10(base(uid))
    files["ds_nan.dcm"] = data.replace(b"1.25", b"nan ")
    files["ds_inf.dcm"] = data.replace(b"1.25", b"-inf")
    for value in ("+5", "99999999999", "-0"):
        ds = base(uid)
        ds.InstanceNumber = value
        put(f"is_{len(files):02d}.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00181000, "LO", "SN\x00")
    ds.SeriesDescription = "a\\b\\c"
    ds.add_new(0x00081030, "LO", "null")
    put("texts.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00081030, "LO", "brain MRI for P1 Doe")
    ds.add_new(0x00204000, "LT", "patient Doe P1 comment")
    put("free_text.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00280106, "US", 0)
    ds.add_new(0x00280107, "US", 65535)
    ds.add_new(0x00189327, "FD", -0.0)
    ds.add_new(0x00189345, "FD", float("nan"))
    ds.add_new(0x00209157, "UL", [1, 2])
    ds.add_new(0x00280009, "AT", [0x00181063])
    put("binary_numbers.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00090010, "LO", "GEMS_ACQU_01")
    ds.add_new(0x0009101E, "DS", "3.5")
    ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
    ds.add_new(0x0019101E, "DS", "3.5")
    put("private.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00081010, "SH", "X" * 300)
    ds.add_new(0x00102160, "SH", "étrange")
    put("long_and_latin.dcm", ds)
    ds = base(uid)
    ds.StudyInstanceUID = "1.2.3 "
    put("uid_padded.dcm", ds)
    ds = base(uid)
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    put("uid_two_values.dcm", ds)
    ds = base(uid)
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    put("sop_class_dicomdir.dcm", ds)
    ds = base(uid)
    ds.FrameOfReferenceUID = "1.2.840.10008.1.2"  # a UID of the dictionary: not remapped
    ds.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2")
    put("dictionary_uids.dcm", ds)
    ds = base(uid)
    ds.ReferringPhysicianName = "Dr^X"
    ds.OperatorsName = "Op"
    put("names.dcm", ds)
    ds = base(uid)
    del ds.PixelData
    put("no_pixel_data.dcm", ds)
    ds = base(uid)
    del ds.PixelData
    ds.add_new(0xFFFCFFFC, "OB", bytes(8))
    put("trailing_padding.dcm", ds)
    # odd groups before the first public element, group lengths, repeating groups
    ds = base(uid)
    ds.add_new(0x00010010, "LO", "X")
    ds.add_new(0x00030010, "LO", "CREATOR")
    ds.add_new(0x00031001, "LO", "v")
    put("low_odd_groups.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00080000, "UL", 100)
    ds.add_new(0x00180000, "UL", 10)
    put("group_lengths.dcm", ds)
    ds = base(uid)
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", bytes(8))
    put("curve_and_overlay.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00280034, "IS", ["1", "1"])
    ds.add_new(0x00181310, "US", [0, 8, 8, 0])
    ds.add_new(0x00283002, "US", [256, 0, 16])
    ds.add_new(0x00181150, "IS", "0012")
    ds.add_new(0x00200032, "DS", ["-0.0", "1.0", "1.00000000000000001"])
    ds.add_new(0x00200037, "DS", ["1", "0", "0", "0", "1", "0"])
    put("multi_valued_numbers.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00181030, "LO", "\\")
    ds.add_new(0x00080070, "LO", "ACME\\")
    ds.add_new(0x00080090, "PN", "a=b=c")
    ds.PatientName = "Doe^Jane\\Roe^R"
    ds.add_new(0x00080008, "CS", ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.add_new(0x00180015, "CS", "head")
    ds.add_new(0x00100040, "CS", "X")
    put("strings_and_names.dcm", ds)
    ds = base(uid)
    ds.add_new(0x00080023, "DA", "19000101")
    ds.add_new(0x00080033, "TM", "2400")
    ds.add_new(0x00080022, "DA", "00010101")
    put("old_dates.dcm", ds)
    ds = base(uid)
    ds.StudyDate = ds.PatientBirthDate = "00010101"
    put("year_1.dcm", ds)
    ds = base(uid)
    ds.StudyDate = "99991231"
    ds.PatientAge = "000D"
    put("year_9999.dcm", ds)
    ds = base(uid)
    ds.PatientAge = "999Y"
    put("age_999.dcm", ds)
    ds = base(uid)
    ds.StudyInstanceUID = "1.2.840.10008.5.1.4.1.1.2"  # a dictionary UID as a study's
    put("study_uid_in_dictionary.dcm", ds)
    # UIDs the batch path takes whole (one value of digits and dots: etl.batchread's
    # _uid_unit), valid or not, and UIDs it decodes as any other element
    for n, value in enumerate(["1.02.3", "1." + "9" * 68, "1.2.3.", ".", "1.2.840.10008.1.2",
                               "1.2.3\\1.2.4", "1.2.x3", " 1.2.3", "1.2.345"]):
        ds = base(uid)
        ds.add_new(0x00200052, "UI", value)  # FrameOfReferenceUID: a column, remapped
        put(f"frame_uid_{n}.dcm", ds)
    # padded with a space, not a NUL; a required UID with a leading zero
    files["frame_uid_space.dcm"] = files["frame_uid_8.dcm"].replace(b"1.2.345\x00", b"1.2.345 ")
    ds = base(uid)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.01"
    put("sop_instance_uid_leading_zero.dcm", ds)
    # dates and times the batch path writes at once too (one value of digits and dots),
    # valid or not, beside those it decodes as any other element
    for n, (date, time) in enumerate([("20200101", "101010.123456"), ("2020.01.01", "1010"),
                                      ("1", "."), ("20200101\\20200102", "10:10:10")]):
        ds = base(uid)
        ds.add_new(0x00080020, "DA", date)  # StudyDate and StudyTime: columns
        ds.add_new(0x00080030, "TM", time)
        ds.add_new(0x00080033, "TM", time)  # ContentTime: not a column
        put(f"date_time_{n}.dcm", ds)
    files["date_time_nul.dcm"] = files["date_time_0.dcm"].replace(b"20200101", b"2020010\x00")
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return [root / name for name in files]


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory) -> list[Path]:
    return _edge_files(tmp_path_factory.mktemp("edges"))


def test_edge_files_are_clean(edge_files):
    assert len(edge_files) == 68
    assert statuses(edge_files) == [batchwalk.CLEAN] * len(edge_files)


@pytest.mark.parametrize("checksum", CHECKSUMS)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_edge_values_give_the_rows_of_the_per_file_path(edge_files, policy_name, checksum):
    got = assert_same_rows(found(edge_files), make_policy(policy_name), checksum=checksum)
    # and each file alone in its batch (no other file's elements)
    for path in edge_files[::3]:
        assert_same_rows(found([path]), make_policy(policy_name), checksum=checksum)
    status = Counter(zip(got.column("status").to_pylist(), got.column("reason").to_pylist(),
                         strict=True))
    # dicomdir, DicomDir, dicomdir_media.dcm and sop_class_dicomdir.dcm are skipped
    assert status == {("ok", None): 63, ("skipped", "dicomdir"): 4,
                      ("quarantined", "invalid_uid:SOPInstanceUID"): 1}


@pytest.mark.parametrize(("policy_name", "expected"), [
    ("identified", 12), ("research", 19), ("research-private", 21)])
def test_edge_files_on_each_path(edge_files, policy_name, expected):
    _, sent = _per_file_paths(found(edge_files), make_policy(policy_name), checksum="header")
    names = sorted(Path(p).name for p in sent)
    # DICOMDIRs by name, media class or SOP class; values whose JSON holds a null (NaN
    # and infinite DS and FD, the word "null"); character sets the batch path leaves to
    # pydicom (two single-byte sets, an unknown one, one in lower case); a required UID
    # that is not valid
    common = ["DicomDir", "binary_numbers.dcm", "charset_07.dcm", "charset_08.dcm",
              "charset_10.dcm", "dicomdir", "dicomdir_media.dcm", "ds_inf.dcm", "ds_nan.dcm",
              "sop_class_dicomdir.dcm", "sop_instance_uid_leading_zero.dcm", "texts.dcm"]
    if policy_name != "identified":
        # dates the filter cannot shift (an impossible birth date, a range, "2023",
        # year 1 shifted to before year 1, "1", "2020010")
        common += ["age_2.dcm", "age_5.dcm", "date_time_2.dcm", "date_time_nul.dcm",
                   "dates.dcm", "old_dates.dcm", "year_1.dcm"]
    if policy_name == "research-private":
        # the private allow-list needs the file's private creators
        common += ["low_odd_groups.dcm", "private.dcm"]
    assert names == sorted(common)
    assert len(sent) == expected


def test_directory_record_sequence_without_dicomdir_name_or_class(tmp_path):
    ds = base(_Uids())
    item = Dataset()
    item.DirectoryRecordType = "PATIENT"
    ds.add_new(0x00041220, "SQ", DicomSequence([item]))
    (tmp_path / "records.dcm").write_bytes(part10(ds))
    assert statuses([tmp_path / "records.dcm"]) == [batchwalk.CLEAN]
    got = assert_same_rows(found([tmp_path / "records.dcm"]), None)
    assert got.column("reason").to_pylist() == ["dicomdir"]


def _issuer_file(root: Path) -> list[FoundFile]:
    uid = _Uids()
    ds = base(uid)
    ds.IssuerOfPatientID = "HOSPITAL A"
    (root / "issuer.dcm").write_bytes(part10(ds))
    return found([root / "issuer.dcm"])


def test_issuer_of_patient_id_identified(tmp_path):
    got = assert_same_rows(_issuer_file(tmp_path), None)
    assert got.column("IssuerOfPatientID").to_pylist() == ["HOSPITAL A"]


@pytest.mark.parametrize("policy_name", ["research", "research-private"])
def test_issuer_of_patient_id_research(tmp_path, policy_name):
    got = assert_same_rows(_issuer_file(tmp_path), make_policy(policy_name))
    assert got.column("IssuerOfPatientID").to_pylist() == [None]


def test_thousands_of_elements_in_one_file(tmp_path):
    """More elements than the walk's first element arrays hold (about 160 a file): they
    grow, and the file is still read column by column."""
    ds = base(_Uids())
    for group in range(0x0009, 0x0009 + 2 * 11, 2):  # 11 private blocks of 255 elements
        ds.add_new((group << 16) | 0x0010, "LO", "ACME")
        for element in range(0x1000, 0x10FF):
            ds.add_new((group << 16) | element, "LO", "x")
    (tmp_path / "many.dcm").write_bytes(part10(ds))
    files = found([tmp_path / "many.dcm"])
    assert statuses([tmp_path / "many.dcm"]) == [batchwalk.CLEAN]
    texts = {}
    for policy_name in ("identified", "research"):
        got = assert_same_rows(files, make_policy(policy_name))
        assert got.column("status").to_pylist() == ["ok"]
        assert _per_file_paths(files, make_policy(policy_name))[1] == []
        texts[policy_name] = got.column("dicom_json")[0].as_py()
    assert texts["identified"].count('{"vr":"LO","Value":["x"]}') == 11 * 255
    assert '"0009' not in texts["research"]  # no private attribute in a research lake


# --- 5. files the batch path must not read -------------------------------------------

def test_crash_marked_file_goes_to_the_per_file_path(crafted, monkeypatch):
    """A file marked by the crash test hook is never read by the batch path: the per-file
    path reads it (and in a worker, exits)."""
    root, files = crafted
    marked = root / "clean_poison_crash.dcm"
    marked.write_bytes(files["clean.dcm"][0])
    batch = found([root / "clean.dcm", marked, root / "implicit.dcm"])
    monkeypatch.setattr(extract, "_CRASH_MARKER", "poison_crash")
    sent: list[str] = []

    def read_one(f: FoundFile, config: IngestConfig, policy: Policy | None) -> FileResult:
        sent.append(f.path)  # stands in for the worker's exit
        return FileResult(f.path, f.size, f.mtime_ns, status="quarantined",
                          reason="worker_crash", message="read by the per-file path")

    monkeypatch.setattr(extract, "_read_one", read_one)
    table = extract_batch(batch, IngestConfig(), "run-batchread", None)
    assert sent == [str(marked)]
    assert table.column("path").to_pylist() == [f.path for f in batch]
    assert table.column("reason").to_pylist() == [None, "worker_crash", None]
    monkeypatch.undo()
    ref = run(batch, None, columnar=False)
    clean = [0, 2]
    diff = table_differences(table.take(clean), ref.take(clean))
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("policy_name", ["identified", "research"])
def test_vanished_and_unreadable_files(crafted, tmp_path, policy_name):
    root, files = crafted
    gone = tmp_path / "gone.dcm"
    gone.write_bytes(files["clean.dcm"][0])
    batch = found([root / "clean.dcm", gone, root / "implicit.dcm"])
    gone.unlink()  # vanished between discovery and reading
    batch.append(FoundFile(str(tmp_path / "denied.dcm"), 10, 1, error="Permission denied"))
    batch.append(found([root / "sequence.dcm"])[0])
    # changed since discovery: the size and time discovery saw are not the file's
    stale = found([root / "clean.dcm"])[0]
    batch.append(FoundFile(stale.path, stale.size - 100, stale.mtime_ns - 1))
    got = assert_same_rows(batch, make_policy(policy_name))
    assert got.column("reason").to_pylist() == [None, "io_error", None, "io_error", None,
                                                None]
    assert got.column("message").to_pylist()[1] == "No such file or directory"
    assert got.column("message").to_pylist()[3] == "Permission denied"
    assert got.column("file_size").to_pylist()[5] == stale.size  # what was read
    assert got.column("mtime_ns").to_pylist()[5] == stale.mtime_ns - 1  # as discovered


def test_same_file_twice_in_a_batch(crafted):
    root, _ = crafted
    batch = found([root / "clean.dcm", root / "sequence.dcm", root / "clean.dcm",
                   root / "sequence.dcm"])
    got = assert_same_rows(batch, make_policy("research"))
    assert got.column("status").to_pylist() == ["ok"] * 4


def test_empty_batch():
    """No files, no rows (the runners never submit an empty batch; a direct caller may)."""
    ref = extract_batch([], IngestConfig(columnar=False), "run", None)
    got = extract_batch([], IngestConfig(columnar=True), "run", None)
    assert not table_differences(got, ref)
    assert got.num_rows == 0


# --- 6. memos across batches and keys ------------------------------------------------

@pytest.fixture(scope="module")
def memo_files(archive_files, pydicom_files) -> list[FoundFile]:
    return archive_files + [f for f in pydicom_files if "charset_files" in f.path]


@pytest.mark.parametrize("policy_name", POLICIES)
def test_warm_and_cleared_memos_give_the_same_rows(memo_files, policy_name):
    policy = make_policy(policy_name)
    ref = run(memo_files, policy, columnar=False)
    clear_batch_memos()
    deid.clear_memos()
    runs: list[Callable[[], None]] = [
        lambda: None,  # cold
        lambda: None,  # warm: the memos of the run before
        deid.clear_memos,  # the policy's memos cleared, the batch reader's warm
        clear_batch_memos,  # the batch reader's cleared, the policy's warm
    ]
    for i, before in enumerate(runs):
        before()
        got = run(memo_files, make_policy(policy_name), columnar=True)
        diff = table_differences(got, ref)
        assert not diff, f"run {i}:\n" + "\n".join(diff)
    assert len(batchread._MEMOS.units) > 0
    if policy is not None:
        assert len(batchread._MEMOS.filtered) > 0


def test_two_keys_one_after_the_other(memo_files):
    """A memo never carries a pseudonym of key A into a lake with key B."""
    clear_batch_memos()
    deid.clear_memos()
    got_a = run(memo_files, make_policy("research", KEY_A), columnar=True)
    got_b = run(memo_files, make_policy("research", KEY_B), columnar=True)
    got_a2 = run(memo_files, make_policy("research", KEY_A), columnar=True)
    deid.clear_memos()
    ref_a = run(memo_files, make_policy("research", KEY_A), columnar=False)
    ref_b = run(memo_files, make_policy("research", KEY_B), columnar=False)
    for name, got, ref in (("A", got_a, ref_a), ("B", got_b, ref_b), ("A again", got_a2,
                                                                       ref_a)):
        diff = table_differences(got, ref)
        assert not diff, f"key {name}:\n" + "\n".join(diff)
    # the keys give different pseudonyms: had B reused A's, it would differ from ref_b
    a_uids = set(got_a.column("SOPInstanceUID").drop_null().to_pylist())
    b_uids = set(got_b.column("SOPInstanceUID").drop_null().to_pylist())
    assert len(a_uids) > 250 and not a_uids & b_uids


def test_class_bytes_starting_over_do_not_reuse_filtered_elements(tmp_path):
    """After more than 128 memo classes every memo starts over, the filtered elements
    too: an AccessionNumber read in ISO_IR 144 must not get the pseudonym (and the
    vault's original text) of the same bytes read in ISO_IR 101 under the same class
    byte before."""
    clear_batch_memos()
    deid.clear_memos()
    uid = _Uids()

    def put(name: str, charset, accession: bytes = b"") -> FoundFile:
        ds = base(uid)
        ds.SpecificCharacterSet = charset
        data = part10(ds)
        if accession:
            ds.AccessionNumber = "XBC"
            data = part10(ds).replace(b"XBC", accession)
        (tmp_path / name).write_bytes(data)
        return found([tmp_path / name])[0]

    # one batch with more than 128 classes: 130 distinct pairs of ISO 2022 sets
    terms = sorted(t for t in ISO2022 if t.startswith("ISO 2022 IR") and t != "ISO 2022 IR 6")
    pairs = list(itertools.permutations(terms, 2))[:130]
    first = [put("a.dcm", "ISO_IR 101", b"\xb1BC")]  # Latin-2: "ąBC"
    first += [put(f"c{i:03d}.dcm", list(p)) for i, p in enumerate(pairs)]
    second = [put("b.dcm", "ISO_IR 144", b"\xb1BC")]  # Cyrillic: "БBC"
    policy = make_policy("research")
    assert_same_rows(first, policy, batch=len(first))
    assert len(batchread._MEMOS.by_byte) > 128
    assert_same_rows(second, policy)


def test_threads_with_two_keys_side_by_side(memo_files):
    """The ``threads`` scheduler runs batches side by side in one process: each thread
    has its own memos, and two keys at once never mix."""
    from concurrent.futures import ThreadPoolExecutor

    files = memo_files[:200]
    batches = [files[i:i + 25] for i in range(0, len(files), 25)]
    keys = [KEY_A, KEY_B] * (len(batches) // 2)
    config = IngestConfig(columnar=True)

    def one(args: tuple[list[FoundFile], bytes]) -> pa.Table:
        batch, key = args
        return extract_batch(batch, config, "run-batchread", make_policy("research", key))

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, zip(batches, keys, strict=True)))
    for batch, key, table in zip(batches, keys, got, strict=True):
        ref = extract_batch(batch, IngestConfig(columnar=False), "run-batchread",
                            make_policy("research", key))
        diff = table_differences(table, ref)
        assert not diff, "\n".join(diff)


def test_a_failing_batch_path_reads_the_batch_file_by_file(tmp_path, monkeypatch, caplog):
    """Whatever goes wrong in the batch path (here: it raises), no file is lost: the batch
    is read file by file, with a warning that names the error's type only."""
    uid = _Uids()
    paths = []
    for i in range(3):
        ds = base(uid)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        paths.append(tmp_path / f"f{i}.dcm")
        paths[-1].write_bytes(part10(ds))
    files = found(paths)
    reference = extract_batch(files, IngestConfig(checksum="header", columnar=False), "run")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the batch path")

    monkeypatch.setattr(batchread, "read_batch", broken)
    with caplog.at_level("WARNING", logger="etl.extract"):
        got = extract_batch(files, IngestConfig(checksum="header"), "run")
    assert got.equals(reference)
    assert got.column("status").to_pylist() == ["ok", "ok", "ok"]
    assert [r.getMessage() for r in caplog.records] == [
        "the batch path failed (RuntimeError); this batch is read file by file"]


def _patients_files(root: Path) -> list[FoundFile]:
    """Studies of four patients whose dates, free text and PatientID filter differently
    by patient: A (P1, Doe^Jane) three studies, B (P2, Roe^Rick), C (P1 from another
    issuer), D (no identifiers at all: no words to clean)."""
    uid = _Uids()
    patients = {"A": ("P1", "Doe^Jane", None), "B": ("P2", "Roe^Rick", None),
                "C": ("P1", "Doe^Jane", "HOSPITAL B"), "D": (None, None, None)}
    paths = []
    for study, who in enumerate("AABACDAD"):
        pid, name, issuer = patients[who]
        study_uid = uid()
        for k in range(2):
            ds = base(uid)
            ds.StudyInstanceUID = study_uid
            del ds.PatientID, ds.PatientName
            if pid:
                ds.PatientID = pid
                ds.PatientName = name
            if issuer:
                ds.IssuerOfPatientID = issuer
            ds.StudyDescription = "CT Doe follow-up" if study in (1, 2, 5) else \
                "Chest  routine "
            ds.SeriesDescription = "Jane  axial"
            ds.ProtocolName = "Roe protocol\\plain"
            ds.SeriesDate = ds.ContentDate = "20230106"
            ds.AcquisitionDateTime = "20230106101500.5"
            p = root / f"s{study}_{k}.dcm"
            p.write_bytes(part10(ds))
            paths.append(p)
    return found(paths)


@pytest.mark.parametrize("batch", [2, 5, 64])
def test_patient_dependent_elements_filtered_once_per_what_they_depend_on(
        tmp_path, monkeypatch, batch):
    """A date is filtered once per date offset, cleaned free text once per set of the
    patient's words it contains, the PatientID once per issuer, across contexts and
    batches; the rows are the per-file path's."""
    files = _patients_files(tmp_path)
    policy = make_policy("research")
    calls: Counter = Counter()
    real = batchread._filter_one

    def counting(unit, *args):
        calls[unit.key] += 1
        return real(unit, *args)

    monkeypatch.setattr(batchread, "_filter_one", counting)
    real_context = policy.context

    def context(header):
        calls["context"] += 1
        return real_context(header)

    monkeypatch.setattr(policy, "context", context)
    clear_batch_memos()
    deid.clear_memos()
    got = assert_same_rows(files, policy, batch=batch)
    # each study's context made once, though batches of 5 split studies
    assert calls["context"] == 8 + 16  # the batch path's, then the per-file path's (a file each)
    # warm memos, shuffled order: the same rows, no context made again by the batch path
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    assert_same_rows(shuffled, policy, batch=batch)
    assert calls["context"] == 8 + 16 + 0 + 16
    rows = got.to_pylist()
    desc = [r["StudyDescription"] for r in rows]
    # A's "Doe" is removed, B's kept; D, with no identifiers, keeps the text as it was
    # (two spaces); the others get it with its spaces tidied
    assert desc[0:4] == ["Chest routine"] * 2 + ["CT follow-up"] * 2
    assert desc[4:6] == desc[10:12] == ["CT Doe follow-up"] * 2
    assert desc[8:10] == ["Chest routine"] * 2 and desc[14:16] == ["Chest  routine"] * 2
    assert [r["SeriesDescription"] for r in rows][::2] == \
        ["axial", "axial", "Jane axial", "axial", "axial", "Jane  axial", "axial",
         "Jane  axial"]
    assert {r["ProtocolName"] for r in rows} == {"protocol\\plain", "Roe protocol\\plain"}
    # eight studies (patient contexts), four PatientIDs (D has none) ...
    assert len({r["PatientID"] for r in rows}) == 4
    # ... and the filter saw each date element once per date offset, not once per
    # study (in the first run: the shuffled one found everything in the memos), the
    # PatientID once per (value, issuer)
    n_offsets = len({r["SeriesDate"] for r in rows})
    assert 2 <= n_offsets <= 5  # A, B, C and D's two studies (offsets may coincide)
    assert calls[deid._tag("SeriesDate")] == n_offsets
    assert calls[deid._tag("AcquisitionDateTime")] == n_offsets
    assert calls[deid._PID_TAG] == 3  # P1, P2, P1 of HOSPITAL B


def test_uid_edge_values(edge_files):
    """The FrameOfReferenceUID of the UID edge files, as the batch path gives it: the
    text of a valid UID, else null and named invalid (a leading zero, more than 64
    characters, an empty component, a letter); two values joined; in research lakes a
    keyed 2.25 UID for any value but a dictionary UID, the same for the same value."""
    files = found(sorted(p for p in edge_files if p.name.startswith("frame_uid")))
    names = [Path(f.path).name for f in files]
    rows = run(files, None, columnar=True).to_pylist()
    got = {n: (r["FrameOfReferenceUID"], r["invalid_attributes"])
           for n, r in zip(names, rows, strict=True)}
    bad = (None, ["FrameOfReferenceUID"])
    assert got == {"frame_uid_0.dcm": bad, "frame_uid_1.dcm": bad, "frame_uid_2.dcm": bad,
                   "frame_uid_3.dcm": bad, "frame_uid_4.dcm": ("1.2.840.10008.1.2", None),
                   "frame_uid_5.dcm": ("1.2.3\\1.2.4", None), "frame_uid_6.dcm": bad,
                   "frame_uid_7.dcm": ("1.2.3", None), "frame_uid_8.dcm": ("1.2.345", None),
                   "frame_uid_space.dcm": ("1.2.345", None)}
    research = run(files, make_policy("research"), columnar=True).to_pylist()
    frame = {n: r["FrameOfReferenceUID"] for n, r in zip(names, research, strict=True)}
    assert frame.pop("frame_uid_4.dcm") == "1.2.840.10008.1.2"
    assert frame["frame_uid_8.dcm"] == frame["frame_uid_space.dcm"]
    assert len({frame[n] for n in frame if n != "frame_uid_space.dcm"}) == 8
    assert all(v.startswith("2.25.") for n, v in frame.items() if n != "frame_uid_5.dcm")
    pairs = {(p["original"], p["pseudonym"]) for r in research for p in r["id_map"]}
    assert ("1.2.345", frame["frame_uid_8.dcm"]) in pairs
    assert ("1.02.3", frame["frame_uid_0.dcm"]) in pairs


def test_id_pairs_per_file_in_element_order_each_once():
    """Each file's id pairs: those of its filtered elements in element order, a pair met
    again (in the file, or in an element shared by files) listed once, files left to the
    per-file path left out."""
    a, b, c = ("UID", "1.1", "2.25.1"), ("UID", "1.2", "2.25.2"), ("PatientID", "P", "Q")
    # the filter's results (filtered unit, pairs): result 2 has none
    results = [(0, (a,)), (1, (b, a)), (2, ()), (3, (c,))]
    # the filtered elements, file by file: file 0 has results 1, 0, 3, 0; file 1 has 2;
    # file 2 has 3, 1; file 3 has 0
    result_of = np.array([1, 0, 3, 0, 2, 3, 1, 0])
    file_of = np.array([0, 0, 0, 0, 1, 2, 2, 3])
    pairs = batchread._IdPairs.of(results, result_of, file_of)
    typ = extract.ID_MAP
    names = [f.name for f in typ.value_type]

    def listed(ok):
        return [[tuple(p[n] for n in names) for p in row]
                for row in pairs.column(np.array(ok), typ).to_pylist()]

    assert listed([True, True, True, True]) == [[b, a, c], [], [c, b, a], [a]]
    assert listed([False, True, True, False]) == [[], [c, b, a]]
    none = batchread._IdPairs.of([(0, ())], np.array([0, 0]), np.array([0, 1]))
    assert none.column(np.array([True, True]), typ).to_pylist() == [[], []]
