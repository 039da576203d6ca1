"""De-identified DICOM copies follow exactly the policy of the research tables."""

import io
import json

import pydicom
import pytest
from pydicom.data import get_testdata_file

from lakehouse import privacy
from lakehouse.deid import Policy, deidentify_dataset, private_tag
from lakehouse.privacy import Pseudonymizer
from synth import generate_archive
from synth.phi import MARKER_PREFIX, plant_phi

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("deid")
    truth = generate_archive(root / "a", seed=11, preset="test")
    phi = plant_phi(root / "a", truth)
    files = [root / "a" / rel for rel, o in sorted(truth.files.items()) if o == "ingested"]
    return files, phi


def test_copy_has_no_phi_and_keeps_pixels(planted):
    files, phi = planted
    policy = Policy(Pseudonymizer(KEY))
    images = 0
    for path in files[:60]:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue  # dose reports: no pixels to carry
        images += 1
        out = deidentify_dataset(ds, policy)
        buf = io.BytesIO()
        out.save_as(buf, enforce_file_format=True)
        raw = buf.getvalue()
        text = raw.decode("latin-1")
        assert MARKER_PREFIX not in text
        assert not [i for i in phi.identifiers if len(i) >= 4 and i in text]
        back = pydicom.dcmread(io.BytesIO(raw))
        assert back.get("PixelData") == ds.get("PixelData")  # (a dose SR has none)
        assert back.SOPInstanceUID == Pseudonymizer(KEY).uid(ds.SOPInstanceUID)
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
        assert back.PatientIdentityRemoved == "YES"
        assert "PatientName" not in back and "PatientBirthDate" not in back
        assert back.PatientID == Pseudonymizer(KEY).patient_id(ds.PatientID)
    assert images >= 30


def test_copy_matches_the_ingest_json(planted):
    """The copy's header is the research lake's dicom_json (plus the PS3.15 markers)."""
    from etl.headers import parse

    files, _ = planted
    policy = Policy(Pseudonymizer(KEY))
    path = files[0]
    record = parse(path.read_bytes(), path.name, policy=policy)
    copy = deidentify_dataset(pydicom.dcmread(path), policy)
    table_json = json.loads(record["dicom_json"])
    copy_json = copy.to_json_dict(bulk_data_threshold=1024,
                                  bulk_data_element_handler=lambda _e: "")
    added = {"00120062", "00120063", "00120064", "00280303"}
    assert {t for t in copy_json if "BulkDataURI" not in copy_json[t]} - added == set(table_json)
    assert copy_json["0020000D"] == table_json["0020000D"]
    assert copy_json["00080020"] == table_json["00080020"]


def test_private_allowlist_keeps_only_the_named_element():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "keep me")
    block.add_new(0x02, "LO", "drop me")
    policy = Policy(Pseudonymizer(KEY), [private_tag({"group": "0x0011", "creator": "ACME 1.0",
                                                      "element": "0x01"})])
    out = deidentify_dataset(ds, policy)
    values = [e.value for e in out if e.tag.is_private]
    assert "keep me" in values and "drop me" not in values
    assert not [e for e in Policy(Pseudonymizer(KEY)).apply(ds.to_json_dict()).json
                if int(e[:4], 16) % 2]


def test_bad_private_allowlist_entries_are_refused():
    with pytest.raises(ValueError, match="odd"):
        private_tag({"group": "0x0010", "creator": "X", "element": "0x01"})
    with pytest.raises(ValueError, match="needs group"):
        private_tag({"creator": "X"})


@pytest.mark.parametrize("key_bytes", [0, 1, 32, 63, 64, 65, 200])
def test_pseudonyms_are_the_standard_hmac(key_bytes):
    """The MAC continued from the key's padded states is RFC 2104's HMAC-SHA256, for
    keys shorter than, as long as and longer than a block, and the pseudonyms are
    derived from it as documented."""
    import hashlib
    import hmac
    import random

    rng = random.Random(key_bytes)
    key = bytes(rng.randrange(256) for _ in range(key_bytes))
    p = Pseudonymizer(key)
    for n in (0, 1, 55, 56, 64, 119, 1000):
        msg = bytes(rng.randrange(256) for _ in range(n))
        assert privacy._hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()
    mac = hmac.new(key, b"UID\x1f1.2.3.4", hashlib.sha256).digest()
    assert p.uid("1.2.3.4") == "2.25." + str(int.from_bytes(mac[:16], "big"))
    mac = hmac.new(key, "PatientID\x1f\x1eP\u00e91".encode(), hashlib.sha256).digest()
    assert p.patient_id("P\u00e91") == mac.hex()[:16].upper()
    mac = hmac.new(key, b"file-sha256\x1f" + b"ab" * 32, hashlib.sha256).hexdigest()
    assert p.file_digest("ab" * 32) == mac


def test_what_the_filter_reads_of_the_patient():
    """``Policy.patient_part``: the date offset for dates, the issuer for the PatientID,
    the patient's words found in cleaned text (and whether there are any), nothing for
    the rest, everything (None) for a sequence."""
    from lakehouse.deid import PatientContext, text_words

    ctx = PatientContext("k", -14, {"doe", "jane"})
    bare = PatientContext("", -21, set())

    def part(keyword, elem, c=ctx, issuer=None):
        tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
        return Policy.patient_part(tag, elem, c, issuer, lambda: text_words(elem))

    date = {"vr": "DA", "Value": ["20230105"]}
    assert part("StudyDate", date) == (1, -14) and part("StudyDate", date, bare) == (1, -21)
    assert part("StudyDate", {"vr": "DA"}) == ()
    assert part("PatientID", {"vr": "LO", "Value": ["P1"]}, issuer="A") == (0, "A")
    text = {"vr": "LO", "Value": ["CT Doe follow-up", "Jane"]}
    assert part("StudyDescription", text) == (2, True, frozenset({"doe", "jane"}))
    assert part("StudyDescription", {"vr": "LO", "Value": ["Chest"]}) == (2, True, frozenset())
    assert part("StudyDescription", text, bare) == (2, False, frozenset())
    assert part("StudyDescription", {"vr": "PN", "Value": [{"Alphabetic": "Doe"}]}) == ()
    assert part("SliceThickness", {"vr": "DS", "Value": [1.25]}) == ()
    assert part("ReferencedStudySequence", {"vr": "SQ", "Value": [{}]}) is None


@pytest.mark.parametrize(("value", "kept"), [
    ("CT01", True),
    ("CT01\x00", True),  # NUL as padding at the end
    ("line one\r\nline two\tand\x0c\x1b$B", True),  # the controls text VRs allow
    ("1501\x00\x08\x00P\x00SH\n\x00ACC98765", False),  # elements run on as raw bytes
    ("CT\x0101", False),
    ("CT01\x7f", False),
])
def test_a_value_that_is_not_text_is_dropped(value, kept):
    """A text value holding a character no text VR allows (PS3.5 6.1) is kept by no
    action of the research policy (as is, cleaned, shifted); the element stays, empty."""
    policy = Policy(Pseudonymizer(KEY))
    header = {"00100020": {"vr": "LO", "Value": ["PAT1"]},
              "00081010": {"vr": "SH", "Value": [value]},  # StationName: kept as it is
              "0008103E": {"vr": "LO", "Value": [value]},  # SeriesDescription: cleaned
              "00080021": {"vr": "DA", "Value": ["20200102"]},
              "0008002A": {"vr": "DT", "Value": ["20200102" + value]}}  # shifted
    out = policy.apply(header).json
    if kept:
        assert out["00081010"] == {"vr": "SH", "Value": [value]}
        assert out["0008103E"]["Value"]  # cleaning may fold its spaces
        assert out["0008002A"]["Value"][0].endswith(value)
    else:
        assert (out["00081010"], out["0008103E"], out["0008002A"]) == \
            ({"vr": "SH"}, {"vr": "LO"}, {"vr": "DT"})
    assert out["00080021"]["Value"] != ["20200102"]  # shifted either way


def test_what_the_text_check_reads():
    """Text values only, and a value list holds one type: numbers end the search (a
    ContourData of thousands of numbers is not read), empty values do not."""
    from lakehouse.deid import _garbled

    assert _garbled([None, "", "CT\x0101"])
    assert not _garbled(["CT01", "HEAD\x00"])
    assert not _garbled([1.5, 2.5] * 10_000)
    assert not _garbled([{"Alphabetic": "Doe^Jane\x01"}])  # names are dropped anyway


def test_the_tags_the_policy_names_are_pydicoms():
    """The policy's own tags, written out so that making a policy loads no pydicom, are
    those of pydicom's data dictionary; the actions cover exactly the allow-list."""
    from pydicom.datadict import tag_for_keyword

    from lakehouse import deid
    from lakehouse.schemas import header_allowlist

    def tag(keyword):
        return f"{tag_for_keyword(keyword):08X}"

    written = {"PatientID": deid._PID_TAG, "IssuerOfPatientID": deid._ISSUER_TAG,
               "PatientName": deid._NAME_TAG, "PatientBirthDate": deid._BIRTH_TAG,
               "PatientAge": deid._AGE_TAG, "StudyInstanceUID": deid._STUDY_UID_TAG}
    for keyword, written_tag in written.items():
        assert written_tag == tag(keyword), keyword
    identifiers = {tag(k): k for k in deid.PSEUDONYMIZED}
    assert identifiers == deid._IDENTIFIER_TAGS
    tokens = tuple(map(tag, ("PatientID", "AccessionNumber", "StudyID", "OtherPatientIDs",
                             "IssuerOfPatientID")))
    assert tokens == deid._ID_TOKEN_TAGS
    actions = deid.tag_actions()
    assert set(actions) == {tag(k) for k in header_allowlist()}
    assert actions[tag("AccessionNumber")] == deid._PSEUDONYM
    assert actions[tag("SOPClassUID")] == deid._CLASS
    assert actions[tag("SeriesDescription")] == deid._CLEAN
    assert actions[tag("PatientAge")] == deid._AGE
    assert actions[tag("Modality")] == deid._KEEP
    assert "1.2.840.10008.1.2.1" in deid.well_known_uids()  # explicit VR little endian
