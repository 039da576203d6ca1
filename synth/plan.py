"""Plan patients, studies and series (no files written here)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass, field

from synth.charsets import ASCII_FAMILY, ASCII_GIVEN, LATIN1, NON_ASCII, Charset
from synth.config import ArchiveConfig

MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "PT", "NM")

BODY_PARTS = {
    "CT": ("CHEST", "ABDOMEN", "HEAD", "PELVIS"),
    "MR": ("HEAD", "KNEE", "LSPINE"),
    "CR": ("CHEST", "HAND", "KNEE"),
    "DX": ("CHEST", "ANKLE", "SHOULDER"),
    "US": ("ABDOMEN", "NECK", "PELVIS"),
    "MG": ("BREAST",),
    "PT": ("WHOLEBODY",),
    "NM": ("HEART",),
}

#: days between a prior study and its deliberate repeat
REPEAT_DAYS = (0, 30, 31)
#: random studies of one patient with the same Modality and body part are at
#: least this many days apart, so the deliberate repeats are the only ones
MIN_GAP_DAYS = 90
#: share of CT studies sent with a CT Radiation Dose SR (the others only have
#: CTDIvol in their image headers)
DOSE_REPORT_SHARE = 0.8
#: share of CR, DX and MG studies with a retaken image (the first view again)
RETAKE_SHARE = 0.15
#: scan length in cm of a CT spiral acquisition per body part (DLP = CTDIvol x length)
SCAN_LENGTH_CM = {"HEAD": (14.0, 20.0), "CHEST": (28.0, 38.0), "ABDOMEN": (30.0, 42.0),
                  "PELVIS": (20.0, 30.0)}


class UidFactory:
    """Deterministic ``2.25.`` UIDs from a namespace and a counter."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._counter = 0

    def __call__(self) -> str:
        self._counter += 1
        digest = hashlib.sha256(f"{self._namespace}|{self._counter}".encode()).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass
class Patient:
    patient_id: str
    name: str
    charset: Charset | None
    birth_date: dt.date
    sex: str
    studies: list[Study] = field(default_factory=list)


@dataclass
class Series:
    series_uid: str
    number: int
    kind: str  # "axial", "localizer", "sagittal", "coronal", "image", "dose_report"
    description: str
    n_instances: int
    sop_uids: list[str]
    index: int  # global index: seeds this series' pixel RNG
    start: dt.datetime = dt.datetime(2000, 1, 1)
    #: the series' Modality when it is not the study's (the dose report: "SR")
    modality: str | None = None


@dataclass(frozen=True)
class DoseEvent:
    """One CT irradiation event as its dose report (TID 10011) states it."""

    event_uid: str
    #: "Constant Angle Acquisition" (a localizer) or "Spiral Acquisition"
    acquisition_type: str
    protocol: str
    #: target region code meaning (SNOMED CT), e.g. "Chest"
    target_region: str
    #: "IEC Head Dosimetry Phantom" or "IEC Body Dosimetry Phantom"
    phantom: str
    ctdivol: float  # mGy
    dlp: float  # mGy.cm


@dataclass
class Study:
    patient: Patient
    study_uid: str
    modality: str
    body_part: str
    start: dt.datetime
    accession: str
    study_id: str
    layout: str  # "nested", "nested_noext", "flat"
    series: list[Series] = field(default_factory=list)
    media: bool = False  # written as a DICOMDIR File-set under media/
    frame_uid: str = ""  # FrameOfReferenceUID shared by the study's series
    #: CT: the irradiation events (localizer, spiral), whether or not reported
    dose_events: list[DoseEvent] = field(default_factory=list)
    #: CT: a CT Radiation Dose SR is written (a series of its own, Modality SR)
    dose_report: bool = False
    #: CR/DX/MG: extra images repeating the first view (retakes)
    retakes: int = 0
    #: the acquisition protocol, the ProtocolName of every image series of the study
    protocol: str = ""

    @property
    def accumulated_dlp(self) -> float:
        return round(sum(e.dlp for e in self.dose_events), 2)

    @property
    def n_instances(self) -> int:
        return sum(s.n_instances for s in self.series)


def default_protocol(modality: str, body_part: str) -> str:
    """The protocol a study of this modality and body part is acquired with, e.g.
    ``CT Chest Routine`` (no random draw: adding it left the archives unchanged)."""
    return f"{modality} {body_part.title()} Routine"


def age_string(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


class Planner:
    """Draws the archive's patients and studies from one seeded RNG."""

    def __init__(self, config: ArchiveConfig, seed: int, uid: UidFactory) -> None:
        self.config = config
        self.rng = random.Random(f"synth-plan-{seed}")
        self.uid = uid
        self.patients: list[Patient] = []
        self.studies: list[Study] = []
        self.repeats: list[tuple[Study, Study, int]] = []
        self._series_index = 0
        self._accession = self.rng.randrange(10_000_000, 20_000_000)
        self._mrn = self.rng.randrange(1_000_000, 2_000_000)
        self.slices = {"CT": config.ct_slices, "MR": config.mr_slices, "PET": config.pet_slices}

    # -- patients --------------------------------------------------------
    def new_patient(
        self, charset_entry: int | None = None, sex: str | None = None, old: bool = False
    ) -> Patient:
        rng = self.rng
        self._mrn += rng.randrange(1, 50)
        if charset_entry is not None:
            entry = NON_ASCII[charset_entry]
            charset: Charset | None = entry.charset
            name = rng.choice(entry.names)
        elif rng.random() < 0.1:
            charset, name = LATIN1.charset, rng.choice(LATIN1.names)
        else:
            charset, name = None, f"{rng.choice(ASCII_FAMILY)}^{rng.choice(ASCII_GIVEN)}"
        y0 = self.config.years[0]
        if old:
            birth = dt.date(y0 - 95, 1, 1) + dt.timedelta(days=rng.randrange(365 * 3))
        else:
            birth = dt.date(y0 - 88, 1, 1) + dt.timedelta(days=rng.randrange(365 * 85))
        patient = Patient(
            patient_id=f"MRN{self._mrn:07d}",
            name=name,
            charset=charset,
            birth_date=birth,
            sex=sex or rng.choice("MF"),
        )
        self.patients.append(patient)
        return patient

    # -- studies ---------------------------------------------------------
    def _random_start(self) -> dt.datetime:
        y0, y1 = self.config.years
        first = dt.date(y0, 1, 1)
        days = (dt.date(y1, 12, 31) - first).days - 40  # room for a 31-day repeat
        day = first + dt.timedelta(days=self.rng.randrange(days))
        seconds = self.rng.randrange(7 * 3600, 14 * 3600)
        return dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=seconds)

    def _fits(self, patient: Patient, modality: str, body_part: str, start: dt.datetime) -> bool:
        if start.date() <= patient.birth_date:
            return False
        return all(
            abs((s.start.date() - start.date()).days) >= MIN_GAP_DAYS
            for s in patient.studies
            if s.modality == modality and s.body_part == body_part
        )

    def add_study(
        self,
        patient: Patient,
        modality: str,
        body_part: str | None = None,
        start: dt.datetime | None = None,
        *,
        dose_report: bool | None = None,
        retakes: int | None = None,
        protocol: str | None = None,
    ) -> Study | None:
        rng = self.rng
        body_part = body_part or rng.choice(BODY_PARTS[modality])
        if start is None:
            for _ in range(50):
                start = self._random_start()
                if self._fits(patient, modality, body_part, start):
                    break
            else:
                return None
        self._accession += rng.randrange(1, 30)
        study = Study(
            patient=patient,
            study_uid=self.uid(),
            modality=modality,
            body_part=body_part,
            start=start,
            accession=f"A{self._accession}",
            study_id=str(rng.randrange(1, 99999)),
            layout=rng.choice(("nested", "nested", "nested_noext", "flat")),
        )
        study.frame_uid = self.uid()
        study.protocol = protocol or default_protocol(modality, body_part)
        if modality == "CT":
            study.dose_report = (
                rng.random() < DOSE_REPORT_SHARE if dose_report is None else dose_report
            )
        if modality in ("CR", "DX", "MG"):
            study.retakes = int(rng.random() < RETAKE_SHARE) if retakes is None else retakes
        self._plan_series(study)
        patient.studies.append(study)
        self.studies.append(study)
        return study

    def _series(
        self, study: Study, kind: str, description: str, n: int, modality: str | None = None
    ) -> None:
        number = len(study.series) + 1
        start = study.start + dt.timedelta(minutes=2 * number + self.rng.randrange(2))
        study.series.append(
            Series(
                series_uid=self.uid(),
                number=number,
                kind=kind,
                description=description,
                n_instances=n,
                sop_uids=[self.uid() for _ in range(n)],
                index=self._series_index,
                start=start,
                modality=modality,
            )
        )
        self._series_index += 1

    def _plan_dose(self, study: Study, localizer: bool) -> None:
        """The CT irradiation events: a localizer (when there is one) and one spiral."""
        rng, bp = self.rng, study.body_part
        head = bp == "HEAD"
        phantom = f"IEC {'Head' if head else 'Body'} Dosimetry Phantom"
        region = bp.title()
        if localizer:
            study.dose_events.append(DoseEvent(
                self.uid(), "Constant Angle Acquisition", "Topogram", region, phantom,
                0.13, round(rng.uniform(2.0, 9.0), 2)))
        ctdivol = round(rng.uniform(40, 60) if head else rng.uniform(3, 15), 2)
        length = rng.uniform(*SCAN_LENGTH_CM.get(bp, (25.0, 35.0)))
        study.dose_events.append(DoseEvent(
            self.uid(), "Spiral Acquisition", f"{region} Routine", region, phantom,
            ctdivol, round(ctdivol * length, 2)))

    def _plan_series(self, study: Study) -> None:
        rng, bp = self.rng, study.body_part
        mod = study.modality
        if mod == "CT":
            localizer = rng.random() < 0.4
            if localizer:
                self._series(study, "localizer", "Topogram 0.6 T20s", rng.choice((1, 2)))
            self._series(study, "axial", f"{bp.title()} 5.0 Soft", rng.randint(*self.slices["CT"]))
            if rng.random() < 0.5:
                self._series(
                    study, "axial", f"{bp.title()} 2.5 Sharp", rng.randint(*self.slices["CT"])
                )
            self._plan_dose(study, localizer)
            if study.dose_report:
                self._series(study, "dose_report", "Dose Report", 1, modality="SR")
        elif mod == "MR":
            plans = [("axial", "AX T2 TSE"), ("sagittal", "SAG T1 SE"), ("coronal", "COR PD FS")]
            for kind, desc in plans[: rng.randint(2, 3)]:
                self._series(study, kind, desc, rng.randint(*self.slices["MR"]))
        elif mod in ("PT", "NM"):
            desc = "PET WB AC" if mod == "PT" else "SPECT MPI Rest"
            self._series(study, "axial", desc, rng.randint(*self.slices["PET"]))
        elif mod == "MG":
            self._series(study, "image", "Screening Mammo", 4 + study.retakes)
        elif mod == "US":
            self._series(study, "image", f"US {bp.title()}", rng.randint(3, 8))
        else:  # CR, DX
            views = 2 if bp == "CHEST" or rng.random() < 0.5 else 1
            self._series(
                study,
                "image",
                f"{bp.title()} {'PA/LAT' if views == 2 else 'AP'}",
                views + study.retakes,
            )

    def choose_modality(self) -> str:
        weights = self.config.modality_weights
        mods = [m for m in MODALITIES if weights.get(m, 0) > 0]
        return self.rng.choices(mods, weights=[weights[m] for m in mods])[0]

    # -- the whole archive ------------------------------------------------
    def plan(self, instance_budget: int) -> None:
        rng = self.rng
        # Small budgets (e.g. a 500-file bench) get shorter volumes, so the
        # studies every archive must have still fit in the budget.
        cfg = self.config

        def cap(bounds: tuple[int, int], limit: int) -> tuple[int, int]:
            limit = max(limit, 4)
            return (min(bounds[0], limit), min(bounds[1], limit))

        self.slices = {
            "CT": cap(cfg.ct_slices, instance_budget // 12),
            "MR": cap(cfg.mr_slices, instance_budget // 25),
            "PET": cap(cfg.pet_slices, instance_budget // 25),
        }
        # 1. one new patient per non-ASCII charset; together they cover every modality
        for i in range(len(NON_ASCII)):
            mod = MODALITIES[i % len(MODALITIES)]
            patient = self.new_patient(charset_entry=i, sex="F" if mod == "MG" else None)
            self.add_study(patient, mod)
        # 2. a patient older than 89
        self.add_study(self.new_patient(old=True), "CR", "CHEST")
        # 3. deliberate repeats: same Modality and body part 0, 30, 31 days later
        #    (the CT prior has a dose report, its same-day repeat only header CTDIvol;
        #    the CR repeat and the DX prior have a retake; the CR repeat is acquired
        #    with another protocol, so matching on the protocol too drops that pair)
        for days, mod in zip(REPEAT_DAYS, ("CT", "CR", "DX"), strict=True):
            prior = self.add_study(
                self.new_patient(), mod, dose_report=True, retakes=1 if mod == "DX" else 0
            )
            assert prior is not None
            later = prior.start + dt.timedelta(days=days, hours=3 if days == 0 else 0)
            repeat = self.add_study(
                prior.patient, mod, prior.body_part, later, dose_report=False,
                retakes=1 if mod == "CR" else 0,
                protocol=(f"{mod} {prior.body_part.title()} Follow-up" if mod == "CR"
                          else None),
            )
            assert repeat is not None
            self.repeats.append((repeat, prior, days))
        # 4. the study exported with a DICOMDIR (2 DX images)
        media = self.add_study(self.new_patient(), "DX", "CHEST", retakes=0)
        assert media is not None
        media.media = True
        media.layout = "media"
        # 5. random studies until the budget is used
        total = sum(s.n_instances for s in self.studies)
        while total < instance_budget:
            mod = self.choose_modality()
            reuse = [
                p for p in self.patients if len(p.studies) < 6 and (mod != "MG" or p.sex == "F")
            ]
            if reuse and rng.random() < 0.6:
                patient = rng.choice(reuse)
            else:
                patient = self.new_patient(sex="F" if mod == "MG" else None)
            study = self.add_study(patient, mod)
            if study is not None:
                total += study.n_instances
        self.studies.sort(key=lambda s: (s.start, s.study_uid))
