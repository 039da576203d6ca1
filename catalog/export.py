"""Export a saved cohort: a manifest, DICOM copies, or NIfTI volumes.

Everything is read at the cohort's saved snapshot. The output folder::

    DIR/cohort.json               the saved cohort (definition, snapshot, hashes)
    DIR/manifest/series.parquet   one row per series (and .csv)
    DIR/manifest/instances.parquet  one row per instance with file_sha256 (and .csv)
    DIR/dicom/<study>/<series>/<sop>.dcm      --as dicom
    DIR/nifti/<series>.nii.gz + <series>.json --as nifti (sidecar of key attributes)
    DIR/manifest/nifti.parquet    --as nifti: one row per series, written or skipped and why
    DIR/SHA256SUMS                checksums of every file above, written last

Every file is written to a temporary name and renamed, so an interrupted export
leaves only whole files; running it again skips what is already there (a DICOM
copy whose checksum matches, a NIfTI volume whose sidecar exists) and finishes
the rest.

DICOM copies come from the source files listed in the vault (``files``); each
source is checked against the checksum recorded at ingest first. From an
identified lake the copy is the source file, byte for byte. From a research
lake it is the de-identified copy of ``lakehouse.deid.deidentify_dataset``: the
same policy as the tables (pseudonyms, ``2.25.`` UID map, per-patient date
shift, allow-list), with the lake's key, so the copies' identifiers are those of
the research tables; originals never leave the vault. The manifest and NIfTI
exports work for both profiles: NIfTI keeps only pixels and geometry, its
sidecar only values of the research tables, and series flagged
``BurnedInAnnotation = YES`` are left out of a research lake's NIfTI export.

NIfTI volumes are built by ``catalog.nifti`` (pixels decoded by pydicom,
geometry from the headers, multi-frame objects included); a series that is not
one faithful volume is skipped with a reason code (``catalog.nifti.REASONS``),
in ``ExportSummary.reasons``, ``export.json`` and ``manifest/nifti``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from catalog.cohorts import Cohort, open_cohort
from catalog.config import CatalogConfig
from catalog.connect import Catalog
from catalog.errors import ExportError
from catalog.nifti import MAX_DIMENSION, Skip, Volume, build_volume
from lakehouse import audit
from lakehouse.checksums import as_ingested, sha256_prefix
from lakehouse.deid import Policy, deidentify_dataset
from lakehouse.provenance import code_version
from lakehouse.tables import Lake

log = logging.getLogger(__name__)

FORMATS = ("manifest", "dicom", "nifti")
#: progress(stage, done, total)
Progress = Callable[[str, int, int], None]
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class ExportSummary:
    cohort: str
    snapshot: int
    as_: str
    to: str
    series: int = 0
    instances: int = 0
    written: int = 0
    skipped_existing: int = 0
    #: {SeriesInstanceUID or SOPInstanceUID: why it was not exported}
    not_exported: dict[str, str] = field(default_factory=dict)
    #: {SeriesInstanceUID or SOPInstanceUID: reason code} (catalog.nifti.REASONS, or
    #: source_missing / source_unreadable / source_changed / deid_mismatch for DICOM)
    reasons: dict[str, str] = field(default_factory=dict)
    files: int = 0
    code_version: str = ""

    def skip(self, uid: str, reason: str, message: str) -> None:
        """Record that ``uid`` is not exported, with its reason code."""
        self.not_exported[uid] = message
        self.reasons[uid] = reason

    def to_dict(self) -> dict:
        d = asdict(self)
        d["as"] = d.pop("as_")
        return d


def _sql(name: str) -> str:
    return resources.files("catalog").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")


def export(lake: Lake | Path | str, name: str, to: Path | str, as_: str = "manifest",
           progress: Progress | None = None, key_file: Path | str | None = None
           ) -> ExportSummary:
    """Export saved cohort ``name`` of ``lake`` to folder ``to`` (see the module doc).

    ``key_file``: the key of a research lake, for a DICOM export (default: the key
    `lake init` created for the lake).
    """
    if as_ not in FORMATS:
        raise ExportError(f"unknown format {as_!r}; use one of {', '.join(FORMATS)}")
    lake = lake if isinstance(lake, Lake) else Lake.open(lake)
    cohort = open_cohort(lake, name)
    # a research lake's DICOM copies are de-identified with the lake's key: check it first
    policy = lake.policy(key_file) if as_ == "dicom" and lake.research else None
    to = Path(to)
    _writable_folder(to)  # before the audit record: an export that cannot start is none
    summary = ExportSummary(name, cohort.saved.snapshot, as_, str(to))
    members = cohort.result().rows.column(cohort.saved.key)  # verifies the saved hash
    # every export is audited in the vault before anything leaves the lake
    audit.record(lake, "export", text=f"cohort {name} as {as_} to {to}",
                 snapshot=cohort.saved.snapshot, rows=len(members))
    vault = as_ in ("dicom", "nifti")
    with Catalog(lake, cohort.saved.snapshot, CatalogConfig(vault=vault)) as cat:
        cat.con.register("_cohort_keys", pa.table({"key": members}))
        series = cat.arrow(_sql("cohort_series"), {"grain": cohort.saved.grain})
        cat.con.register("_cohort_series", series)
        instances = cat.arrow(_sql("cohort_instances"))
        summary.series, summary.instances = series.num_rows, instances.num_rows
        _write_json(to / "cohort.json", cohort.saved.to_dict())
        meta = {"lake.cohort": name, "lake.snapshot": str(cohort.saved.snapshot),
                "lake.cohort_rows_sha256": cohort.saved.rows_sha256,
                "lake.code_version": code_version(), "lake.profile": lake.profile}
        _write_table(to / "manifest" / "series", series, meta)
        _write_table(to / "manifest" / "instances", instances, meta)
        if as_ == "dicom":
            _export_dicom(cat.arrow(_sql("cohort_sources")), to / "dicom", summary, progress,
                          policy)
        elif as_ == "nifti":
            _export_nifti(cohort, series, cat.arrow(_sql("cohort_sources")), to / "nifti",
                          summary, progress, to / "manifest" / "nifti", meta)
    summary.code_version = code_version()
    summary.files = _write_checksums(to)
    _write_json(to / "export.json", summary.to_dict())
    return summary


# --- files ----------------------------------------------------------------------------

def _writable_folder(to: Path) -> None:
    """Create ``to`` if needed and check that a file can be created in it."""
    try:
        to.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=to)
    except PermissionError as exc:
        raise ExportError(f"cannot write into {to}: {exc.strerror or exc}; choose a folder "
                          "you can write, or ask its owner for write access") from None
    os.close(fd)
    os.unlink(probe)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str)
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_table(stem: Path, table: pa.Table, meta: dict[str, str]) -> None:
    """Parquet (with provenance in its key-value metadata) and CSV of ``table``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    parquet = stem.with_suffix(".parquet")
    tmp = _tmp(parquet)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}),
                   tmp, compression="zstd")
    os.replace(tmp, parquet)
    text = stem.with_suffix(".csv")
    tmp = _tmp(text)
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow(["" if v is None else _csv_value(v) for v in row.values()])
    os.replace(tmp, text)


def _csv_value(v: Any) -> str:
    if isinstance(v, list):
        return json.dumps(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def sha256_file(path: Path) -> str:
    """SHA-256 of a whole file (the ``SHA256SUMS`` manifest)."""
    return sha256_prefix(path)


def _write_checksums(root: Path) -> int:
    """``SHA256SUMS`` (sha256sum format, sorted paths) of every file but itself."""
    lines = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (path.is_file() and rel not in ("SHA256SUMS", "export.json")
                and not path.name.startswith(".")):
            lines.append(f"{sha256_file(path)}  {rel}\n")
    target = root / "SHA256SUMS"
    tmp = _tmp(target)
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, target)
    return len(lines)


def _safe(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is hashed)."""
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8")).hexdigest()[:32]


# --- DICOM ------------------------------------------------------------------------------

def _export_dicom(sources: pa.Table, out: Path, summary: ExportSummary,
                  progress: Progress | None, policy: Policy | None) -> None:
    """Copies (identified lake) or de-identified copies (research lake, ``policy``)."""
    rows = sources.to_pylist()
    for i, r in enumerate(rows):
        sop = r["SOPInstanceUID"]
        if progress:
            progress("dicom", i, len(rows))
        if r["path"] is None:
            summary.skip(sop, "source_missing", "no ingested source file in the vault")
            continue
        expected = r["source_sha256"] or r["file_sha256"]
        covered = r.get("checksum_bytes")  # of the file's first bytes (the header) or all
        dest = (out / _safe(r["StudyInstanceUID"]) / _safe(r["SeriesInstanceUID"])
                / f"{_safe(sop)}.dcm")
        # written under a temporary name and renamed: an existing file is complete
        if dest.exists() and (policy is not None
                              or sha256_prefix(dest, covered) == expected):
            summary.skipped_existing += 1
            continue
        try:
            data = Path(r["path"]).read_bytes()
        except OSError as exc:
            summary.skip(sop, "source_unreadable", f"source unreadable: {exc.strerror}")
            continue
        if not as_ingested(data, expected, covered, r["file_size"]):
            summary.skip(sop, "source_changed",
                         "source file changed since ingest (checksum differs)")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(dest)
        if policy is None:
            tmp.write_bytes(data)
        else:
            copy = deidentify_dataset(pydicom.dcmread(io.BytesIO(data)), policy)
            if copy.get("SOPInstanceUID") != sop:  # the policy is not the one of the tables
                summary.skip(sop, "deid_mismatch", "the de-identified copy's SOPInstanceUID "
                             "is not the table's: was the lake ingested with this key?")
                continue
            pydicom.dcmwrite(tmp, copy, enforce_file_format=True)
        os.replace(tmp, dest)
        summary.written += 1
    if progress:
        progress("dicom", len(rows), len(rows))


# --- NIfTI ------------------------------------------------------------------------------

def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ExportError("NIfTI export needs SimpleITK: pip install "
                          "'imaging-lakehouse[nifti]'") from None
    return sitk


def _export_nifti(cohort: Cohort, series: pa.Table, sources: pa.Table, out: Path,
                  summary: ExportSummary, progress: Progress | None,
                  manifest: Path, meta: dict[str, str]) -> None:
    """One ``.nii.gz`` + sidecar per series that is one faithful volume (catalog.nifti);
    every series gets a row of ``manifest/nifti.{parquet,csv}``: written, existing or
    skipped with its reason code."""
    sitk = _sitk()
    by_series: dict[str, list[dict]] = {}
    for r in sources.to_pylist():
        by_series.setdefault(r["SeriesInstanceUID"], []).append(r)
    research = cohort.lake.research
    rows = series.to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    outcome: list[dict] = []
    for n, s in enumerate(rows):
        uid = s["SeriesInstanceUID"]
        if progress:
            progress("nifti", n, len(rows))
        stem = _safe(uid)
        image_path, sidecar_path = out / f"{stem}.nii.gz", out / f"{stem}.json"
        row = {"SeriesInstanceUID": uid, "status": "skipped", "reason": None, "message": None,
               "file": None, "size": None, "spacing": None}
        outcome.append(row)
        if sidecar_path.exists() and image_path.exists():
            summary.skipped_existing += 1
            side = json.loads(sidecar_path.read_text(encoding="utf-8"))
            row.update(status="existing", file=f"nifti/{image_path.name}",
                       size=side.get("size"), spacing=side.get("spacing"))
            continue
        got = _series_volume(s, by_series.get(uid, []), research)
        if not isinstance(got, Skip) and max(shape := got[0].array.shape[:3]) > MAX_DIMENSION:
            got = Skip("too_large", f"{' x '.join(map(str, shape))} voxels (slices x rows x "
                       f"columns): NIfTI-1 holds at most {MAX_DIMENSION:,} along each")
        if isinstance(got, Skip):
            summary.skip(uid, got.reason, got.message)
            row.update(reason=got.reason, message=got.message)
            log.info("series %s of cohort %s not exported as NIfTI: %s: %s", uid,
                        cohort.name, got.reason, got.message)
            continue
        volume, ordered = got
        # pixels and geometry only: no DICOM metadata travels into the NIfTI header
        image = sitk.GetImageFromArray(volume.array, isVector=volume.array.ndim == 4)
        image.SetOrigin(volume.origin)
        image.SetSpacing(volume.spacing)
        image.SetDirection(volume.direction)
        tmp = out / f".{stem}.{uuid.uuid4().hex[:8]}.tmp.nii.gz"
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, image_path)
        sidecar = {
            "SeriesInstanceUID": uid,
            "StudyInstanceUID": s["StudyInstanceUID"],
            "PatientID": s["PatientID"],
            "Modality": s["Modality"],
            "BodyPartExamined": s["BodyPartExamined"],
            "StudyDate": s["StudyDate"].isoformat() if s["StudyDate"] else None,
            "SeriesNumber": s["SeriesNumber"],
            "SeriesDescription": s["SeriesDescription"],
            "instanceCount": s["instanceCount"],
            "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()),
            "coordinate_system": "LPS (DICOM patient coordinates; SimpleITK convention)",
            "pixel_values": volume.values,
            # the instance (and frame, from 0) of each slice, in volume order
            "slices": [[ordered[i]["SOPInstanceUID"], f] for i, f in volume.planes],
            "sop_instance_uids": [r["SOPInstanceUID"] for r in ordered],
            "cohort": cohort.name,
            "lake_snapshot": cohort.saved.snapshot,
        }
        _write_json(sidecar_path, sidecar)
        summary.written += 1
        row.update(status="written", file=f"nifti/{image_path.name}",
                   size=list(image.GetSize()), spacing=list(image.GetSpacing()))
    if progress:
        progress("nifti", len(rows), len(rows))
    _write_table(manifest, pa.table(
        {k: [r[k] for r in outcome] for k in outcome[0]} if outcome else _NIFTI_EMPTY,
        schema=_NIFTI_SCHEMA), meta)


#: manifest/nifti: one row per series of the cohort
_NIFTI_SCHEMA = pa.schema([
    pa.field("SeriesInstanceUID", pa.string()),
    # written | existing (an earlier run wrote it) | skipped
    pa.field("status", pa.string()),
    # reason code of a skipped series (catalog.nifti.REASONS), else null
    pa.field("reason", pa.string()),
    pa.field("message", pa.string()),
    # the volume, relative to the export folder
    pa.field("file", pa.string()),
    # NIfTI size (columns, rows, slices) and spacing (mm)
    pa.field("size", pa.list_(pa.int64())),
    pa.field("spacing", pa.list_(pa.float64())),
])
_NIFTI_EMPTY: dict[str, list] = {f.name: [] for f in _NIFTI_SCHEMA}


def _gdcm_pixels(path: str) -> np.ndarray:
    """All frames of one file as GDCM decodes them (SimpleITK applies the rescale):
    ``(frames, rows, columns[, 3])``."""
    sitk = _sitk()
    try:
        image = sitk.ReadImage(path)
    except RuntimeError:  # its message names the path: vault only
        raise ExportError("GDCM cannot read the file either") from None
    arr = sitk.GetArrayFromImage(image)
    return arr[np.newaxis] if image.GetDimension() == 2 else arr


def _series_volume(s: dict, insts: list[dict], research: bool
                   ) -> tuple[Volume, list[dict]] | Skip:
    """The volume of one series from its source files, or why there is none."""
    if research and s["BurnedInAnnotation"] == "YES":
        return Skip("burned_in_annotation",
                    "BurnedInAnnotation = YES: identifying text in the pixels")
    # the series table's geometry checks first: no file is read for these
    if (s["distinct_orientations"] or 0) > 1:
        return Skip("mixed_orientations",
                    f"{s['distinct_orientations']} orientations among the instances")
    if (s["distinct_dimensions"] or 0) > 1:
        return Skip("mixed_dimensions",
                    f"{s['distinct_dimensions']} matrix sizes among the instances")
    if s["uneven_spacing"]:
        return Skip("uneven_spacing", "uneven gaps between slices (missing slices?)")
    if not insts:
        return Skip("source_missing", "no instances")
    if any(r["path"] is None for r in insts):
        return Skip("source_missing", "a source file is not in the vault")
    datasets = []
    for r in insts:
        try:
            data = Path(r["path"]).read_bytes()
        except OSError as exc:  # the message names no path: paths are vault-only
            return Skip("source_unreadable", f"a source file cannot be read: {exc.strerror}")
        if not as_ingested(data, r["source_sha256"] or r["file_sha256"],
                           r.get("checksum_bytes"), r["file_size"]):
            return Skip("source_changed", "a source file changed since ingest "
                        "(checksum differs)")
        try:
            datasets.append(pydicom.dcmread(io.BytesIO(data), force=True))
        except Exception as exc:  # ingested once, so this is rare: say what pydicom said
            return Skip("source_unreadable",
                        f"pydicom cannot read a source file: {type(exc).__name__}")
    got = build_volume(datasets, lambda i: _gdcm_pixels(insts[i]["path"]))
    if isinstance(got, Skip):
        return got
    return got, insts


__all__ = ["FORMATS", "ExportSummary", "export", "sha256_file"]
