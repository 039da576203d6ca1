"""The worker's memos (decoded elements, typed values, pseudonyms, dates, patient
contexts) are pure caches: with them warm, cold or constantly cleared, every file
gives the same row, and no value of one patient's file reaches another's."""

import datetime as dt
import pickle
from pathlib import Path

import pytest
from pydicom.data import get_charset_files

from etl import onewalk, rawjson, record, safety
from etl.config import IngestConfig
from etl.discover import FoundFile
from etl.errors import FileRejected
from etl.extract import extract_batch
from etl.headers import parse
from lakehouse import deid
from lakehouse.deid import Policy
from lakehouse.privacy import Pseudonymizer
from tests.etl.corpus import _Uids, base, part10

KEY = bytes(range(32))


def _clear_module_memos() -> None:
    rawjson._MEMO.clear()
    onewalk._ELEMENTS.clear()
    onewalk._ITEMS.clear()
    record._MEMO.clear()
    deid.clear_memos()


def _parse_all(files: list[Path], policy: Policy | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in files:
        try:
            out[path.name + str(path.parent)] = parse(path.read_bytes(), path.name,
                                                      policy=policy)
        except FileRejected as exc:
            out[path.name + str(path.parent)] = exc.reason
    return out


@pytest.fixture(scope="module")
def files(archive) -> list[Path]:
    generated = sorted(p for p in archive[0].rglob("*") if p.is_file())
    return generated + sorted(Path(f) for f in get_charset_files("*"))


@pytest.mark.parametrize("research", [False, True], ids=["identified", "research"])
def test_warm_cold_and_cleared_memos_give_the_same_rows(files, research, monkeypatch):
    # warm: one policy and the module memos shared by every file, in walk order
    _clear_module_memos()
    warm = _parse_all(files, Policy(Pseudonymizer(KEY)) if research else None)
    assert onewalk._ITEMS  # the structured reports' items, remembered whole
    # cold: every memo empty before each file (a fresh policy per file, memos cleared)
    cold = {}
    for path in files:
        _clear_module_memos()
        cold.update(_parse_all([path], Policy(Pseudonymizer(KEY)) if research else None))
    # cleared: the memos start over after every second entry
    for module in (rawjson, record, deid):
        monkeypatch.setattr(module, "MEMO_ENTRIES", 2)
    policy = Policy(Pseudonymizer(KEY)) if research else None
    cleared = _parse_all(files, policy)
    assert len(rawjson._MEMO) <= 2 and len(record._MEMO) <= 2 and len(onewalk._ITEMS) <= 2
    assert onewalk._ITEMS.held == sum(len(key[0]) for key in onewalk._ITEMS)
    assert onewalk._ELEMENTS and all(len(t) <= 2 for t in onewalk._ELEMENTS.values())
    if policy is not None:
        assert max(len(policy._uids), len(policy._ids), len(policy._dates),
                   len(policy._contexts)) <= 2
    assert sum(1 for v in warm.values() if isinstance(v, dict)) >= 300
    assert warm == cold
    assert warm == cleared


def test_the_walks_element_tables_are_bounded(files, monkeypatch):
    """One table of whole elements per encoding and codec, at most MEMO_TABLES of them
    (the corpus has more codecs than that)."""
    _clear_module_memos()
    _parse_all(files, None)
    bound = onewalk.MEMO_TABLES
    assert 1 <= len(onewalk._ELEMENTS) <= bound
    monkeypatch.setattr(onewalk, "MEMO_TABLES", 100)  # unbounded: the corpus needs more
    _clear_module_memos()
    _parse_all(files, None)
    assert len(onewalk._ELEMENTS) > bound


def _patient_file(tmp_path: Path, uid: _Uids, name: str, pid: str, person: str) -> FoundFile:
    ds = base(uid)
    ds.PatientID = pid
    ds.PatientName = person
    ds.AccessionNumber = "ACC1"  # the same accession number in both files
    ds.StudyDescription = "HEAD Smith 12345"
    path = tmp_path / name
    path.write_bytes(part10(ds))
    return FoundFile(str(path), path.stat().st_size, path.stat().st_mtime_ns)


def test_two_patients_in_one_batch_do_not_share_state(tmp_path):
    """Same study date, description and accession bytes, different patients: each file
    gets its own patient's pseudonym, date offset and cleaned description."""
    uid = _Uids()
    smith = _patient_file(tmp_path, uid, "a.dcm", "12345", "Smith^John")
    jones = _patient_file(tmp_path, uid, "b.dcm", "777", "Jones^Ann")
    smith2 = _patient_file(tmp_path, uid, "c.dcm", "12345", "Smith^John")
    p = Pseudonymizer(KEY)
    policy = Policy(p)
    config = IngestConfig(checksum="header")
    rows = extract_batch([smith, jones, smith2], config, "r", policy).to_pylist()
    a, b, c = rows
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert a["PatientID"] == c["PatientID"] == p.patient_id("12345")
    assert b["PatientID"] == p.patient_id("777")
    offset_a, offset_b = p.date_offset_days("\x1e12345"), p.date_offset_days("\x1e777")
    assert offset_a != offset_b
    assert a["StudyDate"] == dt.date(2023, 1, 5) + dt.timedelta(days=offset_a)
    assert b["StudyDate"] == dt.date(2023, 1, 5) + dt.timedelta(days=offset_b)
    # Smith's own name and ID are removed from his description; Jones' keeps them
    assert a["StudyDescription"] == c["StudyDescription"] == "HEAD"
    assert b["StudyDescription"] == "HEAD Smith 12345"
    assert a["AccessionNumber"] == b["AccessionNumber"] == p.identifier("AccessionNumber",
                                                                        "ACC1")
    # the same rows as each file in a batch of its own, with a fresh policy
    for found, row in zip([smith, jones, smith2], rows, strict=True):
        _clear_module_memos()
        alone = extract_batch([found], config, "r", Policy(p)).to_pylist()[0]
        assert alone == row


def test_memoized_elements_are_handed_out_as_copies(tmp_path):
    uid = _Uids()
    buf = part10(base(uid))
    layout = safety.check(buf)
    first = rawjson.to_json(buf, layout)
    assert first is not None
    expected = rawjson.to_json(buf, layout)
    first["00080060"]["Value"].append("MR")  # a caller changing its header in place
    first["00080060"]["vr"] = "LO"
    again = rawjson.to_json(buf, layout)
    assert again == expected
    assert again["00080060"] == {"vr": "CS", "Value": ["CT"]}


def test_policy_memos_stay_in_the_process_and_are_shared_by_its_copies(files):
    """A Dask task carries its own unpickled copy of the policy: the copy finds the memos
    the policies with the same key filled in this process; another key has its own."""
    _clear_module_memos()
    policy = Policy(Pseudonymizer(KEY))
    rows = _parse_all(files[:20], policy)
    assert policy._uids and policy._contexts
    state = pickle.dumps(policy)
    assert next(iter(policy._uids.values())).encode() not in state  # memos are not pickled
    copy = pickle.loads(state)
    assert copy.p == policy.p and copy.private == policy.private
    assert copy._uids is policy._uids and copy._contexts is policy._contexts
    assert copy._ids is policy._ids and copy._dates is policy._dates
    uids = dict(policy._uids)
    assert _parse_all(files[:20], copy) == rows
    assert policy._uids == uids  # every UID was found in the shared memo
    other = Policy(Pseudonymizer(bytes(32)))
    assert other._uids is not policy._uids and other._uids == {}
    assert _parse_all(files[:20], other) != rows
    assert not set(other._uids.values()) & set(uids.values())
    # a cold start forgets them all
    deid.clear_memos()
    assert Policy(Pseudonymizer(KEY))._uids == {} and policy._uids == {}
    # a process keeps the memos of MEMO_KEYS keys at most
    for i in range(deid.MEMO_KEYS + 1):
        Policy(Pseudonymizer(bytes([i + 1]) * 32))
    assert len(deid._MEMOS) <= deid.MEMO_KEYS


@pytest.mark.filterwarnings("ignore:The value length")
def test_long_values_are_never_memoized():
    """Long values (rarely repeated) bypass every memo, which bounds their memory."""
    uid = _Uids()
    ds = base(uid)
    ds.StudyDescription = "Smith " * 60  # 360 characters: invalid for LO, kept in the JSON
    ds.PatientID = "P" * 300
    ds.ImageComments = "long comment " * 40
    buf = part10(ds)
    _clear_module_memos()
    policy = Policy(Pseudonymizer(KEY))
    warm = [parse(buf, "a.dcm", policy=policy) for _ in range(2)]
    assert warm[0] == warm[1]
    assert warm[0]["StudyDescription"] is None
    assert warm[0]["invalid_attributes"] == ["StudyDescription"]
    assert warm[0]["PatientID"] == Pseudonymizer(KEY).patient_id("P" * 300)
    assert rawjson._MEMO and record._MEMO and policy._uids  # the short values are memoized
    assert max(len(k[1]) for k in rawjson._MEMO) <= rawjson.MEMO_VALUE_BYTES
    # whole elements: an 8-byte header and a value of at most MEMO_VALUE_BYTES
    assert max(len(k) for t in onewalk._ELEMENTS.values() for k in t) <= \
        rawjson.MEMO_VALUE_BYTES + 8
    assert max(len(str(v)) for k in record._MEMO for v in k[2:]) <= record.MEMO_VALUE_CHARS
    assert all(len(k[1]) <= deid.MEMO_VALUE_CHARS for k in policy._ids)
    assert policy._contexts == {}  # the long PatientID is part of the context's key
    _clear_module_memos()
    assert parse(buf, "a.dcm", policy=Policy(Pseudonymizer(KEY))) == warm[0]


def test_numbers_are_memoized_by_class_and_never_at_zero():
    """0.0 and -0.0 (and 1, 1.0) are equal keys but different values: a memoized number
    is one of its own class and not zero, so each gives its own typed value."""
    import math

    def rec(vr: str, values: list) -> dict:
        return record.record_from_json({"00201041": {"vr": vr, "Value": values},   # F64
                                        "00200032": {"vr": vr, "Value": values * 3},  # list
                                        "00280010": {"vr": "US", "Value": [512]}})[0]

    record._MEMO.clear()
    for _ in range(2):  # cold, then warm
        for zero in (0.0, -0.0, 0.0):
            r = rec("DS", [zero])
            assert math.copysign(1, r["SliceLocation"]) == math.copysign(1, zero)
            assert [math.copysign(1, v) for v in r["ImagePositionPatient"]] == \
                [math.copysign(1, zero)] * 3
        r = rec("DS", [-12.5])
        assert (r["SliceLocation"], r["ImagePositionPatient"], r["Rows"]) == (
            -12.5, [-12.5] * 3, 512)
        r["ImagePositionPatient"].append(1.0)  # a caller changing its record in place
    assert rec("DS", [-12.5])["ImagePositionPatient"] == [-12.5] * 3
    keys = set(record._MEMO)
    assert ("00201041", "DS", float, -12.5) in keys and ("00280010", "US", int, 512) in keys
    assert ("00200032", "DS", float, -12.5, -12.5, -12.5) in keys
    assert not any(0.0 in k[3:] for k in keys if k[2] in (int, float))


def test_the_walks_item_memo_is_bounded_in_bytes(files, monkeypatch):
    """The remembered sequence items start over before they hold ITEM_MEMO_TOTAL bytes,
    and the rows are the same."""
    _clear_module_memos()
    want = _parse_all(files, None)
    held = onewalk._ITEMS.held
    assert held == sum(len(key[0]) for key in onewalk._ITEMS) > 0
    monkeypatch.setattr(onewalk, "ITEM_MEMO_TOTAL", 1000)
    _clear_module_memos()
    assert _parse_all(files, None) == want
    assert 0 < onewalk._ITEMS.held <= 1000 < held
