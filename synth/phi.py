"""Plant unique PHI markers in every identifying place of a generated archive.

Used to prove that nothing identifying reaches a research lake: after
``plant_phi(root, truth)`` every ingestible file carries, besides its real
identifiers (names in several character sets, patient IDs, accession numbers,
birth dates, UIDs), marker strings starting with ``MARKER_PREFIX`` in:
other names and IDs, addresses, telephone numbers, free-text comments and
history, request/scheduling sequences (nested two levels deep), physicians and
operators, institution address, overlay descriptions and a private block.
Descriptions get the patient's ID and family name appended (they must be
cleaned, not dropped).

The rewrite is a pure function of each file's content, so byte-identical
copies stay identical and the archive's ground truth (outcomes, counts) holds.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from synth.truth import GroundTruth

MARKER_PREFIX = "ZZPHI"
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "ACME PHI 1.0"


@dataclass
class PlantedPHI:
    """What must never appear in a research lake."""

    #: every marker string planted
    markers: set[str] = field(default_factory=set)
    #: original identifiers: PatientIDs, accession numbers, UIDs, birth dates
    identifiers: set[str] = field(default_factory=set)
    #: parts of patient names (to be matched as whole words)
    name_parts: set[str] = field(default_factory=set)


def marker(patient_id: str, kind: str) -> str:
    """A unique 15-character marker (fits the shortest string VR, SH)."""
    h = hashlib.sha256(f"{patient_id}|{kind}".encode()).hexdigest()[:10].upper()
    return f"{MARKER_PREFIX}{h}"


def plant_phi(root: Path | str, truth: GroundTruth) -> PlantedPHI:
    root = Path(root)
    planted = PlantedPHI()
    for rel, outcome in sorted(truth.files.items()):
        if outcome not in ("ingested", "duplicate", "conflict"):
            continue
        path = root / rel
        ds = pydicom.dcmread(path)
        _plant(ds, planted)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path.write_bytes(buf.getvalue())
    return planted


def _plant(ds: Dataset, planted: PlantedPHI) -> None:
    pid = str(ds.get("PatientID", ""))
    m = {k: marker(pid, k) for k in (
        "other", "otherid", "address", "phone", "comment", "history", "reqid", "spsid",
        "reqdesc", "referrer", "performer", "operator", "instaddr", "overlay", "private",
        "mother", "imagecomment", "nested")}
    planted.markers.update(m.values())
    name = str(ds.get("PatientName", ""))
    for part in name.replace("=", "^").split("^"):
        if len(part.strip()) >= 2:
            planted.name_parts.add(part.strip())
    for kw in ("PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "FrameOfReferenceUID"):
        v = str(ds.get(kw, "")).strip()
        if v:
            planted.identifiers.add(v)
    birth = str(ds.get("PatientBirthDate", "")).strip()
    if birth:
        planted.identifiers.add(birth)
        planted.identifiers.add(f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}")

    ds.OtherPatientNames = m["other"]
    ds.OtherPatientIDs = m["otherid"]
    ds.PatientMotherBirthName = m["mother"]
    ds.PatientAddress = m["address"]
    ds.PatientTelephoneNumbers = m["phone"]
    ds.PatientComments = m["comment"]
    ds.AdditionalPatientHistory = m["history"]
    ds.ImageComments = m["imagecomment"]
    ds.ReferringPhysicianName = m["referrer"]
    ds.PerformingPhysicianName = m["performer"]
    ds.OperatorsName = m["operator"]
    ds.InstitutionAddress = m["instaddr"]
    ds.add_new(0x60000022, "LO", m["overlay"])  # OverlayDescription
    sps = Dataset()
    sps.ScheduledProcedureStepID = m["spsid"]
    sps.ScheduledPerformingPhysicianName = m["nested"]
    req = Dataset()
    req.RequestedProcedureID = m["reqid"]
    req.RequestedProcedureDescription = m["reqdesc"]
    req.ScheduledProtocolCodeSequence = Sequence([sps])
    ds.RequestAttributesSequence = Sequence([req])
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", m["private"])
    family = name.split("^")[0].split("=")[0].strip()
    extra = " ".join(t for t in (pid, family) if t)
    if "StudyDescription" in ds:
        ds.StudyDescription = f"{ds.StudyDescription} {extra}"[:64]
    if "SeriesDescription" in ds:
        ds.SeriesDescription = f"{ds.SeriesDescription} {pid}"[:64]
