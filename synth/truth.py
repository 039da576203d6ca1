"""The expected ingest result of a generated archive."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: every file of an archive ends in exactly one of these
OUTCOMES = ("ingested", "duplicate", "conflict", "skipped", "quarantined")


@dataclass
class GroundTruth:
    """What an ingest of the archive must report. Plain JSON types only.

    Paths are relative to the archive root, POSIX style.
    """

    seed: int
    preset: str
    #: the ArchiveConfig used, as a dict
    config: dict[str, Any]
    files_total: int
    #: {outcome: file count}, sums to files_total
    outcomes: dict[str, int]
    #: {reason code: count} for quarantined files
    quarantine_reasons: dict[str, int]
    #: {reason: count} for skipped files ({"dicomdir": 1})
    skipped_reasons: dict[str, int]
    #: expected row counts: instances, series, studies, patients, conflicts, quarantine
    tables: dict[str, int]
    studies_by_modality: dict[str, int]
    #: [[Modality, study year, study count], ...] sorted
    studies_by_modality_year: list[list[Any]]
    instances_by_modality: dict[str, int]
    #: {SeriesInstanceUID: ingested instance count}
    series_instance_counts: dict[str, int]
    #: {SeriesInstanceUID: total bytes of its ingested instance files}
    series_size_bytes: dict[str, int]
    #: {PatientID: unicode PatientName} for patients with a non-ASCII name
    names: dict[str, str]
    #: {PatientID: SpecificCharacterSet as in the header} for those patients
    charsets: dict[str, str]
    #: PatientIDs of patients older than 89 at some study
    patients_over_89: list[str]
    #: [{patient_id, study_uid, prior_study_uid, days, protocol, prior_protocol}]
    #: same Modality and BodyPartExamined; days 0, 30 and 31 (the 31-day pair is
    #: outside the default 30-day window); the protocols (ProtocolName of every
    #: image series) differ for the 30-day pair only
    repeats: list[dict[str, Any]]
    #: relative paths of byte-identical copies (placed after their originals)
    duplicates: list[str]
    #: {"sop_instance_uid", "kept_path", "rejected_path"}
    conflict: dict[str, str]
    #: {relative path: reason code} for quarantined and skipped files
    bad_files: dict[str, str]
    #: {relative path: outcome} for every file
    files: dict[str, str] = field(default_factory=dict)
    #: {StudyInstanceUID: retaken images} for CR, DX and MG studies with retakes:
    #: images beyond the first of one (ViewPosition, ImageLaterality,
    #: BodyPartExamined) within the study
    retakes: dict[str, int] = field(default_factory=dict)
    #: {StudyInstanceUID: {"accumulated_dlp": mGy.cm, "events": [{event_uid,
    #: acquisition_type, protocol, target_region, phantom, ctdivol (mGy),
    #: dlp (mGy.cm)}, ...]}} for CT studies sent with a CT Radiation Dose SR,
    #: the events in report order
    dose_reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: {StudyInstanceUID: largest image-header CTDIvol (mGy)} for CT studies
    #: without a dose report
    ct_header_ctdivol: dict[str, float] = field(default_factory=dict)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(
            dataclasses.asdict(self), indent=indent, sort_keys=True, ensure_ascii=False
        )

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
