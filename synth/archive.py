"""Write a synthetic hospital DICOM archive and its ground truth.

Walk order assumed by the ground truth: depth-first, the entries of each
folder sorted by name. Every original lives under ``archive/``, ``media/`` or
``pacs_export/``; the re-sent copies live under ``zz_resent/``, which sorts
after them in any name-sorted walk, so the original is always the one kept.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import random
import struct
import threading
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import UID

from synth.charsets import charset_value
from synth.config import PRESETS
from synth.datasets import build_series
from synth.encode import SeriesEncoder
from synth.plan import Planner, Series, Study, UidFactory, age_string
from synth.truth import OUTCOMES, GroundTruth

log = logging.getLogger(__name__)

#: files that are not plain unique instances: 3 duplicates, 1 conflict,
#: 8 quarantined, 1 DICOMDIR
SPECIAL_FILES = 13
DUPLICATE_COUNT = 3


@dataclass
class _Record:
    """One file written, and what an ingest must make of it."""

    path: str
    outcome: str
    reason: str | None = None
    sop_uid: str | None = None
    series_uid: str | None = None
    study: Study | None = None
    size: int = 0
    #: Modality of the file's series (the study's, or SR for its dose report)
    modality: str | None = None


def encode(ds: Dataset) -> bytes:
    """The Part 10 bytes of ``ds`` (preamble, DICM, file meta, dataset)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _instance_path(study: Study, series: Series, i: int) -> str:
    p = study.patient
    study_dir = f"{study.start:%Y%m%d}_{study.accession}"
    folder = f"archive/{p.patient_id}/{study_dir}/S{series.number:03d}_{study.modality}"
    if study.layout == "nested":
        return f"{folder}/IM{i + 1:05d}.dcm"
    if study.layout == "nested_noext":
        return f"{folder}/IM{i + 1:05d}"
    # flat PACS export: one folder per year, names from the SOP UID or a counter
    sop = series.sop_uids[i]
    if series.number % 2:
        return f"pacs_export/{study.start.year}/{sop}.dcm"
    return (
        f"pacs_export/{study.start.year}/I{hashlib.sha256(sop.encode()).hexdigest()[:10].upper()}"
    )


class _Writer:
    """Writes files on a few threads (file creation dominates on many disks)."""

    def __init__(self, root: Path, threads: int = 4) -> None:
        self.root = root
        self.records: list[_Record] = []
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._slots = threading.BoundedSemaphore(
            threads * 8
        )  # bounds memory held by pending writes
        self._futures: list[Future[None]] = []
        self._dirs: set[Path] = set()

    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.write_bytes(data)
        finally:
            self._slots.release()

    def write(self, rel: str, data: bytes, record: _Record) -> None:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._write, path, data))
        record.size = len(data)
        self.records.append(record)

    def flush(self) -> None:
        """Wait for pending writes; raise the first error."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown()


def generate_archive(
    root: Path | str,
    *,
    seed: int = 0,
    preset: str = "test",
    truth_path: Path | str | None = None,
    **overrides: object,
) -> GroundTruth:
    """Write a synthetic DICOM archive under ``root`` and return its ground truth.

    The same ``seed``, ``preset`` and ``overrides`` give byte-identical files.
    ``root`` must be missing or empty. ``truth_path`` (outside ``root``)
    receives ``GroundTruth.to_json()``. ``overrides`` replace fields of the
    preset's :class:`~synth.config.ArchiveConfig` (e.g. ``target_files=500``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[preset].replace(**overrides)
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"archive root {root} is not empty; give a new or empty folder")
    if truth_path is not None:
        truth_path = Path(truth_path)
        if truth_path.resolve().is_relative_to(root.resolve()):
            raise ValueError(
                f"truth_path {truth_path} is inside the archive root {root}; it would be ingested"
            )
    root.mkdir(parents=True, exist_ok=True)

    namespace = hashlib.sha256(f"synth|{seed}|{preset}|{config.fingerprint()}".encode()).hexdigest()
    uid = UidFactory(namespace)
    planner = Planner(config, seed, uid)
    planner.plan(max(config.target_files - SPECIAL_FILES, 0))
    cfg = json.loads(json.dumps(asdict(config)))  # plain JSON types (tuples become lists)
    writer = _Writer(root)
    try:
        truth = _write_all(writer, planner, cfg, seed, uid)
    finally:
        writer.close()
    truth.seed, truth.preset = seed, preset
    if truth_path is not None:
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        truth_path.write_text(truth.to_json(), encoding="utf-8")
    log.info("wrote %d files under %s", truth.files_total, root)
    return truth


def _write_all(
    writer: _Writer, planner: Planner, cfg: dict, seed: int, uid: UidFactory
) -> GroundTruth:
    media_datasets: list[tuple[Dataset, Study, Series]] = []
    for study in planner.studies:
        for series in study.series:
            ds, hook = build_series(study, series, cfg, seed)
            encoder = SeriesEncoder(ds)
            for i in range(series.n_instances):
                hook(ds, i)
                rec = _Record(
                    "",
                    "ingested",
                    sop_uid=series.sop_uids[i],
                    series_uid=series.series_uid,
                    study=study,
                    modality=series.modality or study.modality,
                )
                if study.media:
                    media_datasets.append((copy.deepcopy(ds), study, series))
                    continue
                rec.path = _instance_path(study, series, i)
                writer.write(rec.path, encoder.encode(ds), rec)
    writer.flush()
    _write_media(writer, media_datasets, uid)
    rng = random.Random(f"synth-special-{seed}")
    duplicates, conflict = _write_resent(writer, rng)
    _write_bad_files(writer, rng, uid)
    writer.flush()
    return _ground_truth(writer.records, planner, seed, "", cfg, duplicates, conflict)


def _write_media(
    writer: _Writer, items: list[tuple[Dataset, Study, Series]], uid: UidFactory
) -> None:
    """A real DICOMDIR File-set under media/: the DICOMDIR is skipped, its instances ingested."""
    fs = FileSet()
    fs.UID = UID(uid())
    fs.ID = "SYNTHMEDIA"
    for ds, _, _ in items:
        fs.add(ds)
    media = writer.root / "media"
    fs.write(media)
    by_sop = {ds.SOPInstanceUID: (study, series) for ds, study, series in items}
    for instance in fs:
        path = Path(instance.path)
        study, series = by_sop[instance.SOPInstanceUID]
        rel = path.relative_to(writer.root).as_posix()
        rec = _Record(
            rel,
            "ingested",
            sop_uid=instance.SOPInstanceUID,
            series_uid=series.series_uid,
            study=study,
            modality=series.modality or study.modality,
        )
        rec.size = path.stat().st_size
        writer.records.append(rec)
    dicomdir = media / "DICOMDIR"
    writer.records.append(
        _Record("media/DICOMDIR", "skipped", "dicomdir", size=dicomdir.stat().st_size)
    )


def _write_resent(writer: _Writer, rng: random.Random) -> tuple[list[str], dict[str, str]]:
    """3 byte-identical copies and 1 same-SOP-different-content file under zz_resent/."""
    candidates = [
        r for r in writer.records if r.outcome == "ingested" and not r.path.startswith("media/")
    ]
    by_mod: dict[str, list[_Record]] = defaultdict(list)
    for r in candidates:
        by_mod[str(r.modality)].append(r)
    picks = [rng.choice(by_mod[m]) for m in ("CT", "MR", "CR", "US")]
    duplicates = []
    for n, original in enumerate(picks[:DUPLICATE_COUNT], start=1):
        rel = f"zz_resent/RESENT{n:04d}" + (".dcm" if n != 2 else "")
        data = (writer.root / original.path).read_bytes()
        writer.write(rel, data, _Record(rel, "duplicate", sop_uid=original.sop_uid))
        duplicates.append(rel)
    kept = picks[-1]
    ds = pydicom.dcmread(writer.root / kept.path)
    ds.SeriesDescription = f"{ds.SeriesDescription} (corrected)"
    rel = f"zz_resent/RESENT{DUPLICATE_COUNT + 1:04d}.dcm"
    writer.write(rel, encode(ds), _Record(rel, "conflict", sop_uid=kept.sop_uid))
    conflict = {"sop_instance_uid": str(kept.sop_uid), "kept_path": kept.path, "rejected_path": rel}
    return duplicates, conflict


def _write_bad_files(writer: _Writer, rng: random.Random, uid: UidFactory) -> None:
    ct = sorted(
        (
            r
            for r in writer.records
            if r.outcome == "ingested" and r.modality == "CT"
        ),
        key=lambda r: r.path,
    )
    source = pydicom.dcmread(writer.root / ct[len(ct) // 2].path)

    def variant() -> Dataset:
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(uid())
        return ds

    def bad(rel: str, data: bytes, reason: str) -> None:
        writer.write(rel, data, _Record(rel, "quarantined", reason))

    bad("misc/empty.dcm", b"", "empty_file")
    bad(
        "readme.txt",
        b"Export from PACS, 3 CDs merged.\nContact radiology IT for questions.\n",
        "not_dicom",
    )
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + rng.randbytes(2000)
    bad("misc/screenshot.png", png, "not_dicom")
    data = encode(variant())
    pixel_bytes = len(source.PixelData)
    bad("misc/CT_cut_in_pixels.dcm", data[: len(data) - pixel_bytes // 2], "truncated")
    ds = variant()
    ds.SeriesDescription = "Axial 5.0 Soft truncated in transfer"
    data = encode(ds)
    value = b"Axial 5.0 Soft truncated in transfer"
    cut = data.index(value) + len(value) // 2
    assert cut < len(data) - pixel_bytes
    bad("misc/CT_cut_in_header.dcm", data[:cut], "truncated")
    ds = variant()
    del ds.StudyInstanceUID
    bad("misc/no_study_uid.dcm", encode(ds), "missing_uid:StudyInstanceUID")
    ds = variant()
    del ds.SeriesInstanceUID
    bad("misc/no_series_uid", encode(ds), "missing_uid:SeriesInstanceUID")
    # No SOPInstanceUID anywhere, file meta included (so no fallback exists).
    ds = variant()
    del ds.SOPInstanceUID
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    bad("misc/no_sop_uid.dcm", buf.getvalue(), "missing_uid:SOPInstanceUID")


def _ground_truth(
    records: list[_Record],
    planner: Planner,
    seed: int,
    preset: str,
    cfg: dict,
    duplicates: list[str],
    conflict: dict[str, str],
) -> GroundTruth:
    records = sorted(records, key=lambda r: r.path)
    ingested = [r for r in records if r.outcome == "ingested"]
    sops = [r.sop_uid for r in ingested]
    assert len(sops) == len(set(sops)), "generator wrote one SOPInstanceUID twice"
    studies = {r.study.study_uid: r.study for r in ingested if r.study}
    series_counts: Counter[str] = Counter(str(r.series_uid) for r in ingested)
    series_size: Counter[str] = Counter()
    for r in ingested:
        series_size[str(r.series_uid)] += r.size
    patients = {s.patient.patient_id: s.patient for s in studies.values()}
    outcomes = Counter(r.outcome for r in records)
    quarantine = Counter(str(r.reason) for r in records if r.outcome == "quarantined")
    by_mod_year = Counter((s.modality, s.start.year) for s in studies.values())
    old = sorted(
        {
            s.patient.patient_id
            for s in studies.values()
            if int(age_string(s.patient.birth_date, s.start.date())[:3]) > 89
        }
    )
    repeats = [
        {
            "patient_id": later.patient.patient_id,
            "study_uid": later.study_uid,
            "prior_study_uid": prior.study_uid,
            "days": days,
            "protocol": later.protocol,
            "prior_protocol": prior.protocol,
        }
        for later, prior, days in planner.repeats
    ]
    return GroundTruth(
        seed=seed,
        preset=preset,
        config=cfg,
        files_total=len(records),
        outcomes={o: outcomes.get(o, 0) for o in OUTCOMES},
        quarantine_reasons=dict(sorted(quarantine.items())),
        skipped_reasons={"dicomdir": outcomes.get("skipped", 0)},
        tables={
            "instances": len(ingested),
            "series": len(series_counts),
            "studies": len(studies),
            "patients": len(patients),
            "conflicts": outcomes.get("conflict", 0),
            "quarantine": outcomes.get("quarantined", 0),
        },
        studies_by_modality=dict(sorted(Counter(s.modality for s in studies.values()).items())),
        studies_by_modality_year=[[m, y, n] for (m, y), n in sorted(by_mod_year.items())],
        instances_by_modality=dict(sorted(Counter(str(r.modality) for r in ingested).items())),
        series_instance_counts=dict(sorted(series_counts.items())),
        series_size_bytes=dict(sorted(series_size.items())),
        names={pid: p.name for pid, p in sorted(patients.items()) if p.charset is not None},
        charsets={
            pid: charset_value(p.charset)
            for pid, p in sorted(patients.items())
            if p.charset is not None
        },
        patients_over_89=old,
        repeats=repeats,
        duplicates=duplicates,
        conflict=conflict,
        bad_files={
            r.path: str(r.reason) for r in records if r.outcome in ("quarantined", "skipped")
        },
        files={r.path: r.outcome for r in records},
        retakes={
            s.study_uid: s.retakes for s in sorted(studies.values(), key=lambda s: s.study_uid)
            if s.retakes
        },
        dose_reports={
            s.study_uid: {
                "accumulated_dlp": s.accumulated_dlp,
                "events": [asdict(e) for e in s.dose_events],
            }
            for s in sorted(studies.values(), key=lambda s: s.study_uid)
            if s.dose_report
        },
        ct_header_ctdivol={
            s.study_uid: max(e.ctdivol for e in s.dose_events)
            for s in sorted(studies.values(), key=lambda s: s.study_uid)
            if s.modality == "CT" and not s.dose_report
        },
    )
