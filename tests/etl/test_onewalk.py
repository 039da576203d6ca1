"""The one walk (etl.onewalk) against the two walks it replaces (etl.safety.check, then
etl.rawjson.to_json): the same layout, the same JSON, the same rejection (reason and
message) and the same request for more bytes, over the whole test corpus, every kind of
the bad-input corpus, truncated copies, header-only (partial) buffers, a small nesting
limit and other bulk-data thresholds."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from etl import onewalk, rawjson, safety
from etl.errors import FileRejected
from tests.etl import corpus as bad_inputs
from tests.etl.test_fastpath import corpus


def two_walks(buf: bytes, max_depth: int, file_size: int | None, bulk: int):
    layout = safety.check(buf, max_depth=max_depth, file_size=file_size)
    header = rawjson.to_json(buf, layout, bulk)
    if header is not None:
        onewalk.strip_bulk(header)
    return layout, header


def outcome(fn, buf: bytes, max_depth: int = 64, file_size: int | None = None,
            bulk: int = 1024) -> tuple:
    """What a walk gives, comparable with ==: repr keeps the JSON's key order and types."""
    try:
        layout, header = fn(buf, max_depth, file_size, bulk)
    except FileRejected as exc:
        return ("rejected", exc.reason, exc.message)
    except safety.NeedMore as more:
        return ("more", more.offset)
    return ("ok", layout, repr(header))


def one_walk(buf: bytes, max_depth: int, file_size: int | None, bulk: int):
    return onewalk.walk(buf, max_depth=max_depth, file_size=file_size,
                        bulk_data_threshold=bulk)


def shared_walk(buf: bytes, max_depth: int, file_size: int | None, bulk: int):
    """The ingest's walk: it hands out what it remembers (elements, and whole items)."""
    return onewalk.walk(buf, max_depth=max_depth, file_size=file_size,
                        bulk_data_threshold=bulk, shared=True)


class Tally:
    """Counts which walk decided each case: the one walk itself, or the two walks it
    handed the file to."""

    def __init__(self, monkeypatch, shared: bool = False):
        self.counts: Counter[str] = Counter()
        self.handed = False
        self.walk = shared_walk if shared else one_walk
        real = onewalk._two_walks

        def counting(*args):
            self.handed = True
            return real(*args)

        monkeypatch.setattr(onewalk, "_two_walks", counting)

    def compare(self, buf: bytes, **kw) -> tuple | None:
        """None when both agree, else the two outcomes."""
        self.handed = False
        got = outcome(self.walk, buf, **kw)
        want = outcome(two_walks, buf, **kw)
        if not self.handed:
            self.counts[f"one walk: {got[0]}"] += 1
        else:
            self.counts[f"two walks: {got[0]}"] += 1
        return None if got == want else (got[:2], want[:2])


@pytest.fixture(scope="module")
def files(archive, tmp_path_factory) -> list[Path]:
    extra = tmp_path_factory.mktemp("bad-inputs")
    bad_inputs.build(extra)
    return corpus(archive[0]) + sorted(p for p in extra.rglob("*")
                                       if p.is_file() and not p.is_symlink())


def test_whole_files_give_what_the_two_walks_give(files, monkeypatch):
    tally = Tally(monkeypatch)
    differ = []
    for path in files:
        buf = path.read_bytes()
        if not buf:
            continue
        for kw in ({}, {"bulk": 0}, {"bulk": 16}, {"max_depth": 1}):
            d = tally.compare(buf, **kw)
            if d:
                differ.append((path.name, kw, d))
    assert differ == []
    print(dict(tally.counts))
    assert tally.counts["one walk: ok"] >= 1000  # most files are decided by the one walk
    assert tally.counts["one walk: rejected"] >= 50  # too_deep at depth 1, the bad inputs
    assert tally.counts["two walks: ok"] >= 100  # big endian, deflate, UN, ... handed over


def _cuts(n: int, header_end: int) -> list[int]:
    """Cut points: the start, the file meta, around the data set, and the end."""
    points = {1, 8, 131, 132, 140, 200, n - 1, n - 2, n - 9, n - 13, header_end,
              header_end + 4, header_end + 8, header_end + 12}
    points |= {header_end * k // 7 for k in range(1, 7)}
    return sorted(p for p in points if 0 < p < n)


def test_truncated_and_partial_buffers_give_what_the_two_walks_give(files, monkeypatch):
    """A truncated copy is a whole (short) file; a partial buffer is the start of the
    file with the file's size given (a header-only read): the one walk asks for the same
    bytes, or rejects for the same reason with the same message."""
    tally = Tally(monkeypatch)
    differ = []
    for path in files[::7]:
        buf = path.read_bytes()
        try:
            header_end = safety.check(buf).header_end
        except FileRejected:
            header_end = len(buf)
        for cut in _cuts(len(buf), header_end):
            for file_size in (None, len(buf)):
                d = tally.compare(buf[:cut], file_size=file_size)
                if d:
                    differ.append((path.name, cut, file_size, d))
    assert differ == []
    print(dict(tally.counts))
    assert tally.counts["one walk: rejected"] >= 300
    assert tally.counts["one walk: more"] >= 300


#: (sequences of defined length, items of defined length)
LENGTHS = {"undefined": (False, False), "defined": (True, True),
           "defined-seq-undefined-items": (True, False),
           "undefined-seq-defined-items": (False, True)}


def _nested_dataset(lengths: str) -> Dataset:
    """Sequences three deep, with empty and bulk values, sequences and items of defined
    or undefined length."""
    defined, items_defined = LENGTHS[lengths]
    ds = bad_inputs.base(bad_inputs._Uids())
    leaf = Dataset()
    leaf.CodeValue = "T-D4000"
    leaf.CodeMeaning = "Abdomen"
    leaf.add_new(0x00420011, "OB", bytes(range(200)) * 10)  # bulk data inside an item
    middle = Dataset()
    middle.ConceptNameCodeSequence = Sequence([leaf, Dataset()])
    middle.TextValue = "two items, one empty"
    top = Dataset()
    top.ContentSequence = Sequence([middle])
    top.ValueType = "CONTAINER"
    ds.ContentSequence = Sequence([top, Dataset()])
    ds.ReferencedImageSequence = Sequence([])
    for elem in (ds["ContentSequence"], top["ContentSequence"],
                 middle["ConceptNameCodeSequence"], ds["ReferencedImageSequence"]):
        elem.is_undefined_length = not defined
        for item in elem.value:
            item.is_undefined_length_sequence_item = not items_defined
    return ds


def _file(ds: Dataset, ts: str) -> bytes:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _raw_implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, None],
                         ids=["explicit", "implicit", "no-meta-implicit"])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("shared", [False, True], ids=["copies", "shared"])
def test_every_cut_of_a_nested_file_gives_what_the_two_walks_give(ts, lengths, shared,
                                                                  monkeypatch):
    """Sequences of both length kinds cut at every byte of the header, as a truncated
    file and as a partial buffer, and the whole file under nesting limits 0 to 4. A
    shared walk first reads the whole file, so that the cuts meet its items again
    (``onewalk._ITEMS``)."""
    ds = _nested_dataset(lengths)
    buf = _raw_implicit(ds) if ts is None else _file(ds, ts)
    header_end = safety.check(buf).header_end
    tally = Tally(monkeypatch, shared)
    differ = []
    onewalk._ITEMS.clear()
    if shared:
        assert tally.compare(buf) is None
        # items of defined length, read by the one walk: not in an implicit VR data
        # set's defined-length sequences (the raw JSON walk's alone), nor without file
        # meta (the two walks')
        seq_defined, items_defined = LENGTHS[lengths]
        walked = ts == ExplicitVRLittleEndian or (ts is not None and not seq_defined)
        assert bool(onewalk._ITEMS) == (items_defined and walked)
    for cut in range(1, min(len(buf), header_end + 16)):
        for file_size in (None, len(buf)):
            d = tally.compare(buf[:cut], file_size=file_size)
            if d:
                differ.append((cut, file_size, d))
    for depth in range(5):
        for bulk in (0, 1024, 4096):
            d = tally.compare(buf, max_depth=depth, bulk=bulk)
            if d:
                differ.append((depth, bulk, d))
    assert differ == []
    if ts is not None:  # a bare data set without file meta is always the two walks'
        assert tally.counts["one walk: ok"] >= 10
        assert tally.counts["one walk: more"] >= 100
        assert tally.counts["one walk: rejected"] >= 100


def test_the_json_of_a_nested_file_leaves_bulk_data_out():
    buf = _file(_nested_dataset("defined"), ExplicitVRLittleEndian)
    layout, header = onewalk.walk(buf)
    assert layout == safety.check(buf)
    item = header["0040A730"]["Value"][0]["0040A730"]["Value"][0]
    leaf, empty = item["0040A043"]["Value"]
    assert leaf == {"00080100": {"vr": "SH", "Value": ["T-D4000"]},
                    "00080104": {"vr": "LO", "Value": ["Abdomen"]}}  # the OB is bulk data
    assert empty == {}
    assert header["00081140"] == {"vr": "SQ", "Value": []}
    assert onewalk.walk(buf, bulk_data_threshold=4096)[1]["0040A730"]["Value"][0][
        "0040A730"]["Value"][0]["0040A043"]["Value"][0]["00420011"]["vr"] == "OB"


def test_limits_are_the_safety_walks():
    """Each limit raised by the one walk itself, with the safety walk's reason code."""
    good = bad_inputs.part10(bad_inputs.base(bad_inputs._Uids()))
    pix = good.index(bad_inputs.PIXEL_TAG)
    nested = good[:pix] + bad_inputs._nested(100) + good[pix:]
    with pytest.raises(FileRejected) as exc:
        onewalk.walk(nested, max_depth=64)
    assert (exc.value.reason, exc.value.message) == ("too_deep",
                                                     "sequences nested deeper than 64")
    huge = bytearray(good)
    i = huge.index(b"\x08\x00\x3e\x10")  # SeriesDescription: LO, 2-byte length
    huge[i + 4:i + 8] = b"UT\x00\x00"  # as a UT it gets a 4-byte length ...
    huge[i + 8:i + 8] = (0xFFFFFFF0).to_bytes(4, "little")  # ... of almost 4 GiB
    with pytest.raises(FileRejected) as exc:
        onewalk.walk(bytes(huge))
    assert exc.value.reason == "element_too_large"
    start = safety.check(good).dataset_offset
    with pytest.raises(safety.NeedMore) as more:  # a header-only read asks for more
        onewalk.walk(good[:start + 10], file_size=len(good))
    assert more.value.offset == start + 12


#: 4-byte patterns written over a header: delimiters, undefined and huge lengths, a
#: private group, an unknown VR, zeros
PATTERNS = [b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0",
            b"\xff\xff\xff\xff", b"\xf0\xff\xff\xff", b"\x09\x00\x10\x10", b"ZZ\x00\x01",
            bytes(4)]


@pytest.mark.parametrize("stride", [7, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["every-7th-offset", "every-offset"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit", "implicit"])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("shared", [False, True], ids=["copies", "shared"])
def test_corrupted_headers_give_what_the_two_walks_give(ts, lengths, stride, shared,
                                                        monkeypatch):
    """Every 4-byte pattern above written at every offset (every 7th offset, a different
    phase per case, outside the slow suite) of the data set's header, and the file with
    trailing zero padding instead of its pixel data: the one walk rejects, hands over or
    decodes exactly as the two walks do. A shared walk has read the intact file first,
    and remembers the items of each corrupted one (``onewalk._ITEMS``)."""
    buf = _file(_nested_dataset(lengths), ts)
    layout = safety.check(buf)
    tally = Tally(monkeypatch, shared)
    differ = []
    onewalk._ITEMS.clear()
    if shared:
        assert tally.compare(buf) is None
    phase = (len(lengths) + len(ts)) % stride
    for pos in range(layout.dataset_offset + phase, layout.header_end + 8, stride):
        for pattern in PATTERNS:
            bad = buf[:pos] + pattern + buf[pos + 4:]
            d = tally.compare(bad)
            if d:
                differ.append((pos, pattern, d))
    padded = buf[:layout.header_end] + bytes(7)
    assert outcome(one_walk, padded)[0] == "ok"
    d = tally.compare(padded)
    assert d is None and differ == []
    assert tally.counts["one walk: rejected"] >= 600 // stride
    assert tally.counts["one walk: ok"] >= 100 // stride


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit", "implicit"])
def test_elements_met_before_decide_as_the_first_time(ts, monkeypatch):
    """The walk's memo of whole elements (``onewalk._ELEMENTS``): a Pixel Data element
    with a short VR inside an item (an ordinary element there) ends the data set at the
    top level; a repeated Specific Character Set still switches the codec; a repeated
    element in a header-only buffer that ends inside it asks for more bytes. Walked
    cold, then warm, then with the memo starting over at every second entry."""
    def with_charset(charset: str) -> bytes:
        ds = bad_inputs.base(bad_inputs._Uids())
        ds.SpecificCharacterSet = charset
        item = Dataset()
        item.add_new(0x7FE00010, "US", 7)  # Pixel Data: an ordinary element in an item
        item.CodeValue = "T-D4000"
        ds.ReferencedImageSequence = Sequence([item])
        ds.PatientName = "Müller^Jürgen"
        return _file(ds, ts)

    latin, utf8 = with_charset("ISO_IR 100"), with_charset("ISO_IR 192")
    top = bad_inputs.base(bad_inputs._Uids())
    top.CodeValue = "T-D4000"
    top.add_new(0x7FE00010, "US", 7)  # Pixel Data, the same bytes as in the item
    pixel_at_top = _file(top, ExplicitVRLittleEndian)
    tally = Tally(monkeypatch)
    cases = [(latin, {}), (utf8, {}), (pixel_at_top, {})]
    cases += [(buf[:cut], {"file_size": len(buf)}) for buf in (latin, utf8)
              for cut in range(len(buf) - 40, len(buf), 3)]
    differ = []
    onewalk._ELEMENTS.clear()
    for _ in range(2):  # cold, then warm
        for buf, kw in cases:
            if d := tally.compare(buf, **kw):
                differ.append(d)
    monkeypatch.setattr(rawjson, "MEMO_ENTRIES", 2)
    onewalk._ELEMENTS.clear()
    for buf, kw in cases:
        if d := tally.compare(buf, **kw):
            differ.append(d)
    assert differ == []
    assert all(len(t) <= 2 for t in onewalk._ELEMENTS.values())
    if ts == ImplicitVRLittleEndian:  # Pixel Data has no VR there: the two walks decide
        assert tally.counts["two walks: ok"] >= 3
        return
    header = onewalk.walk(utf8)[1]
    assert header["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert header["00081140"]["Value"][0]["7FE00010"] == {"vr": "US", "Value": [7]}


def test_shared_elements_are_the_memos_own_and_copies_are_not(files):
    """``walk(shared=True)`` (the ingest's read, which never changes the header) hands
    out remembered elements themselves; the default hands out copies, so a caller that
    changes its header changes nothing the next walk gives. Both give the same JSON."""
    bufs = [p.read_bytes() for p in files[:60]]

    def walks(shared: bool) -> list[tuple]:
        return [outcome(lambda b, d, f, k: onewalk.walk(b, shared=shared), buf)
                for buf in bufs]

    onewalk._ELEMENTS.clear()
    want = walks(False)
    assert sum(1 for o in want if o[0] == "ok") >= 40
    onewalk._ELEMENTS.clear()
    assert walks(True) == want  # cold
    assert walks(True) == want  # warm
    assert walks(False) == want
    ok = next(b for b, o in zip(bufs, want, strict=True) if o[0] == "ok")
    first, again = onewalk.walk(ok, shared=True)[1], onewalk.walk(ok, shared=True)[1]
    assert first is not again
    shared = [t for t in first if first[t] is again[t]]
    assert len(shared) >= 20
    copied = onewalk.walk(ok)[1]
    assert not any(copied[t] is first[t] for t in copied)
    for elem in copied.values():  # a caller changing its (copied) header in place
        if "Value" in elem:
            elem["Value"].append("changed")
        elem["vr"] = "XX"
    assert repr(onewalk.walk(ok, shared=True)[1]) == repr(first)
    assert repr(onewalk.walk(ok)[1]) == repr(first)


def _overrunning_item(meaning: str) -> bytes:
    """A defined-length sequence of two items whose first item's element declares more
    bytes than the item holds: its value runs on over the second item, as both walks
    read it."""
    ds = bad_inputs.base(bad_inputs._Uids())
    first, second = Dataset(), Dataset()
    first.CodeValue = "AB"
    second.CodeMeaning = meaning
    ds.ConceptNameCodeSequence = Sequence([first, second])
    elem = ds["ConceptNameCodeSequence"]
    elem.is_undefined_length = False
    for item in elem.value:
        item.is_undefined_length_sequence_item = False
    buf = _file(ds, ExplicitVRLittleEndian)
    at = buf.index(b"\x08\x00\x00\x01SH\x02\x00AB")
    # over the second item's header (8 bytes), its element's header (8) and value (2)
    return buf[:at + 6] + (2 + 8 + 8 + 2).to_bytes(2, "little") + buf[at + 8:]


def test_an_item_read_past_its_end_is_not_remembered():
    """Two files whose first items are the same bytes, but whose element runs on into
    what follows the item (different in each): the second file's JSON is its own, not
    the first file's remembered item."""
    first, second = _overrunning_item("XY"), _overrunning_item("ZW")
    onewalk._ITEMS.clear()
    assert outcome(shared_walk, first) == outcome(two_walks, first)
    assert outcome(shared_walk, first)[0] == "ok"
    # only the second item, which ends where it says, is remembered
    assert [item for item, _ in onewalk._ITEMS.values()] == [{"00080104": {
        "vr": "LO", "Value": ["XY"]}}]
    got = outcome(shared_walk, second)
    assert got == outcome(two_walks, second)
    assert got != outcome(shared_walk, first)
