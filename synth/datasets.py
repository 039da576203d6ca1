"""One template dataset per series, modified in place per instance."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from random import Random

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from synth import pixels
from synth.charsets import PHYSICIANS
from synth.plan import Series, Study, age_string

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
    "SR": "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
}

EQUIPMENT = {
    "CT": [
        ("SIEMENS", "SOMATOM Definition AS", "CT01"),
        ("GE MEDICAL SYSTEMS", "Revolution CT", "CT02"),
    ],
    "MR": [("SIEMENS", "MAGNETOM Skyra", "MR01"), ("Philips", "Ingenia", "MR02")],
    "CR": [("FUJIFILM Corporation", "FCR PROFECT CS", "CR01")],
    "DX": [("Philips", "DigitalDiagnost", "DX01"), ("GE Healthcare", "Definium 6000", "DX02")],
    "US": [("GE Healthcare", "LOGIQ E10", "US01"), ("Philips", "EPIQ 7G", "US02")],
    "MG": [("HOLOGIC, Inc.", "Selenia Dimensions", "MG01")],
    "PT": [("GE MEDICAL SYSTEMS", "Discovery MI", "PET01")],
    "NM": [("SIEMENS NM", "Symbia Intevo", "NM01")],
}
INSTITUTIONS = [
    ("St. Example General Hospital", "Radiology"),
    ("Riverside Imaging Clinic", "Diagnostic Imaging"),
]
CT_KERNELS = {"SIEMENS": ("B30f", "B70f"), "GE MEDICAL SYSTEMS": ("STANDARD", "LUNG")}
Z_CENTER = {
    "HEAD": 80.0,
    "CHEST": -150.0,
    "ABDOMEN": -350.0,
    "PELVIS": -550.0,
    "KNEE": -1200.0,
    "LSPINE": -400.0,
}
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

#: sets the per-instance attributes (UIDs, number, position, pixels) in place
InstanceHook = Callable[[Dataset, int], None]


def ds_str(value: float) -> str:
    """A DS value of at most 16 characters, no float noise."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")


def build_series(
    study: Study, series: Series, cfg_matrix: dict[str, object], seed: int
) -> tuple[Dataset, InstanceHook]:
    """Return the series template and the hook that turns it into instance ``i``."""
    rng = Random(f"synth-series-{seed}-{series.index}")
    nrng = np.random.default_rng([seed, series.index])
    mod = series.modality or study.modality
    patient = study.patient
    equipment = EQUIPMENT[study.modality]
    manufacturer, model, station = equipment[hash_pick(study.study_uid, len(equipment))]
    institution, department = INSTITUTIONS[hash_pick(patient.patient_id, len(INSTITUTIONS))]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[mod])
    meta.MediaStorageSOPInstanceUID = UID(series.sop_uids[0])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if patient.charset is not None:
        ds.SpecificCharacterSet = patient.charset
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SOP_CLASSES[mod]
    ds.SOPInstanceUID = series.sop_uids[0]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = da(study.start.date())
    ds.StudyTime = tm(study.start)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = tm(series.start)
    ds.AccessionNumber = study.accession
    ds.Modality = mod
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = PHYSICIANS[hash_pick(study.study_uid + "ref", len(PHYSICIANS))]
    ds.StationName = station
    ds.StudyDescription = f"{study.modality} {study.body_part}"
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = department
    ds.ManufacturerModelName = model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = da(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = age_string(patient.birth_date, study.start.date())
    ds.BodyPartExamined = study.body_part
    ds.ProtocolName = study.protocol
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0

    def set_ids(d: Dataset, i: int) -> None:
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = UID(series.sop_uids[i])
        d.InstanceNumber = i + 1
        t = series.start + dt.timedelta(seconds=i // 4)
        d.ContentTime = tm(t)

    if series.kind == "dose_report":
        return ds, _dose_report(ds, study, series, set_ids)
    builder = _BUILDERS[mod]
    hook = builder(ds, study, series, cfg_matrix, rng, nrng, set_ids)
    return ds, hook


def hash_pick(text: str, n: int) -> int:
    return sum(text.encode()) % n


def _volume_geometry(
    ds: Dataset,
    study: Study,
    series: Series,
    size: int,
    fov: float,
    thickness: float,
    spacing: float,
) -> Callable[[Dataset, int], None]:
    row, col = (np.array(v) for v in ORIENTATIONS[series.kind])
    normal = np.cross(row, col)
    ps = round(fov / size, 4)
    n = series.n_instances
    centre = np.array([0.0, 0.0, Z_CENTER.get(study.body_part, -200.0)])
    p0 = centre - row * ps * size / 2 - col * ps * size / 2 - normal * spacing * (n - 1) / 2
    p0 = np.round(p0, 2)
    ds.ImageOrientationPatient = [ds_str(v) for v in (*row, *col)]
    ds.PixelSpacing = [ds_str(ps), ds_str(ps)]
    ds.SliceThickness = ds_str(thickness)
    ds.SpacingBetweenSlices = ds_str(spacing)
    ds.Rows = ds.Columns = size
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""

    def place(d: Dataset, i: int) -> None:
        pos = p0 + normal * spacing * i
        d.ImagePositionPatient = [ds_str(v) for v in pos]
        d.SliceLocation = ds_str(float(pos @ normal))

    return place


def _ct(
    ds: Dataset,
    study: Study,
    series: Series,
    cfg: dict,
    rng: Random,
    nrng: np.random.Generator,
    set_ids,
) -> InstanceHook:
    size = int(cfg["ct_matrix"])
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = ds_str(rng.choice((100, 120, 120, 140)))
    # the spiral acquisition's CTDIvol, as its dose report states it
    ds.CTDIvol = study.dose_events[-1].ctdivol
    kernels = CT_KERNELS.get(ds.Manufacturer, ("STANDARD", "BONE"))
    ds.ConvolutionKernel = kernels[1] if "Sharp" in series.description else kernels[0]
    ds.GantryDetectorTilt = "0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    base_ma = rng.randint(120, 300)
    if series.kind == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.Rows = ds.Columns = size
        ps = round(500 / size, 4)
        ds.PixelSpacing = [ds_str(ps), ds_str(ps)]
        ds.SliceThickness = "0.6"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = study.frame_uid
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.XRayTubeCurrent = 35
        ds.CTDIvol = study.dose_events[0].ctdivol
        images = [
            pixels.xray_image(nrng, size, size, 1800) - 1000 for _ in range(series.n_instances)
        ]

        def localizer(d: Dataset, i: int) -> None:
            set_ids(d, i)
            kind = "coronal" if i == 0 else "sagittal"
            row, col = ORIENTATIONS[kind]
            d.ImageOrientationPatient = [ds_str(v) for v in (*row, *col)]
            d.ImagePositionPatient = [
                "-250",
                "-250",
                ds_str(Z_CENTER.get(study.body_part, -200.0) + 250),
            ]
            d.PixelData = pixels.to_pixels(images[i] + 1024, np.int16, -1024, 3071)

        return localizer

    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    thickness = 2.5 if "2.5" in series.description else 5.0
    fov = 240.0 if study.body_part == "HEAD" else 380.0
    place = _volume_geometry(ds, study, series, size, fov, thickness, thickness)
    ds.ReconstructionDiameter = ds_str(fov)
    ds.DataCollectionDiameter = "500"
    ds.WindowCenter, ds.WindowWidth = (
        ("-600", "1500") if "Sharp" in series.description else ("40", "400")
    )
    phantom = pixels.ct_phantom(nrng, size, series.n_instances, study.body_part)

    def instance(d: Dataset, i: int) -> None:
        set_ids(d, i)
        place(d, i)
        d.XRayTubeCurrent = base_ma + (37 * i) % 60
        d.PixelData = pixels.to_pixels(phantom.slice(i) + 1024, np.int16, -1024, 4095)

    return instance


def _mr(
    ds: Dataset,
    study: Study,
    series: Series,
    cfg: dict,
    rng: Random,
    nrng: np.random.Generator,
    set_ids,
) -> InstanceHook:
    size = int(cfg["mr_matrix"])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.BitsStored, ds.HighBit = 12, 11
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK" if "TSE" in series.description else "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = "3" if ds.Manufacturer == "SIEMENS" else "1.5"
    ds.ImagingFrequency = "123.2" if ds.Manufacturer == "SIEMENS" else "63.9"
    ds.RepetitionTime = ds_str(rng.choice((500, 3000, 4500)))
    ds.EchoTime = ds_str(rng.choice((12, 80, 102)))
    ds.EchoTrainLength = rng.choice((1, 12, 16))
    ds.FlipAngle = "90"
    ds.WindowCenter, ds.WindowWidth = "900", "1800"
    thickness = rng.choice((3.0, 4.0, 5.0))
    fov = 240.0 if study.body_part != "KNEE" else 160.0
    place = _volume_geometry(ds, study, series, size, fov, thickness, round(thickness * 1.1, 2))
    phantom = pixels.mr_phantom(nrng, size, series.n_instances)

    def instance(d: Dataset, i: int) -> None:
        set_ids(d, i)
        place(d, i)
        d.PixelData = pixels.to_pixels(phantom.slice(i), np.uint16, 0, 4095)

    return instance


def _pt_nm(
    ds: Dataset,
    study: Study,
    series: Series,
    cfg: dict,
    rng: Random,
    nrng: np.random.Generator,
    set_ids,
) -> InstanceHook:
    size = int(cfg["pet_matrix"])
    n = series.n_instances
    if study.modality == "PT":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
        ds.DecayCorrection = "START"
        ds.NumberOfSlices = n
        radio = Dataset()
        radio.Radiopharmaceutical = "Fludeoxyglucose F^18^"
        radio.RadiopharmaceuticalStartTime = tm(study.start - dt.timedelta(minutes=60))
        radio.RadionuclideTotalDose = ds_str(rng.uniform(2.5e8, 4.0e8))
        radio.RadionuclideHalfLife = "6586.2"
        ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
        ds.RescaleIntercept, ds.RescaleSlope = "0", "0.5"
        fov, thickness = 700.0, 3.27
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
        ds.NumberOfFrames = 1
        ds.FrameIncrementPointer = 0x00540080  # SliceVector
        ds.SliceVector = [1]
        ds.NumberOfSlices = n
        fov, thickness = 400.0, 4.8
    place = _volume_geometry(ds, study, series, size, fov, thickness, thickness)
    phantom = pixels.pet_phantom(nrng, size, n)

    def instance(d: Dataset, i: int) -> None:
        set_ids(d, i)
        place(d, i)
        if study.modality == "PT":
            d.ImageIndex = i + 1
        else:
            d.SliceVector = [i + 1]
        d.PixelData = pixels.to_pixels(phantom.slice(i), np.uint16, 0, 65535)

    return instance


def _projection(
    ds: Dataset,
    study: Study,
    series: Series,
    cfg: dict,
    rng: Random,
    nrng: np.random.Generator,
    set_ids,
) -> InstanceHook:
    size = int(cfg["xray_matrix"])
    mod, bp = study.modality, study.body_part
    ds.Rows = ds.Columns = size
    ds.BitsStored, ds.HighBit = 12, 11
    spacing = ds_str(round((240.0 if mod == "MG" else 430.0) / size, 4))
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.KVP = ds_str(rng.choice((28, 29, 31)) if mod == "MG" else rng.choice((70, 81, 110, 125)))
    ds.ExposureTime = str(rng.randint(5, 40))
    ds.XRayTubeCurrent = rng.randint(100, 400)
    if mod in ("DX", "MG"):
        ds.PresentationIntentType = "FOR PRESENTATION"
    photometric = "MONOCHROME1" if mod == "CR" and rng.random() < 0.5 else "MONOCHROME2"
    ds.PhotometricInterpretation = photometric
    if mod == "MG":
        views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
        views += views[:1] * study.retakes
        ds.CompressionForce = ds_str(rng.uniform(80, 140))
        ds.BodyPartThickness = ds_str(rng.uniform(35, 65))
    else:
        laterality = "" if bp == "CHEST" else rng.choice("LR")
        first = "PA" if bp == "CHEST" else "AP"
        views = [(laterality, first), (laterality, "LAT")][: series.n_instances - study.retakes]
        views += views[:1] * study.retakes  # the first view again: a retake
    images = [pixels.xray_image(nrng, size, size, 4095) for _ in range(series.n_instances)]

    def instance(d: Dataset, i: int) -> None:
        set_ids(d, i)
        laterality, view = views[i]
        d.ViewPosition = view
        d.ImageLaterality = laterality
        d.PatientOrientation = ["A", "F"] if view == "LAT" else ["L", "F"]
        img = 4095 - images[i] if photometric == "MONOCHROME1" else images[i]
        d.PixelData = pixels.to_pixels(img, np.uint16, 0, 4095)

    return instance


def _us(
    ds: Dataset,
    study: Study,
    series: Series,
    cfg: dict,
    rng: Random,
    nrng: np.random.Generator,
    set_ids,
) -> InstanceHook:
    rows, cols = cfg["us_shape"]  # type: ignore[misc]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    rgb = rng.random() < 0.4
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    y, x = np.mgrid[0:rows, 0:cols]
    r = np.hypot(y, x - cols / 2)
    fan = (r < rows * 0.95) & (np.abs(np.arctan2(x - cols / 2, y + 1e-6)) < 0.6)

    def instance(d: Dataset, i: int) -> None:
        set_ids(d, i)
        speckle = nrng.rayleigh(40.0, size=(rows, cols)) * fan
        img = np.clip(speckle, 0, 255).astype(np.uint8)
        if rgb:
            img = np.repeat(img[:, :, None], 3, axis=2)
            img[: rows // 12, : cols // 4, 0] = 200  # a coloured annotation box
        d.PixelData = img.tobytes()

    return instance


_BUILDERS = {
    "CT": _ct,
    "MR": _mr,
    "PT": _pt_nm,
    "NM": _pt_nm,
    "CR": _projection,
    "DX": _projection,
    "MG": _projection,
    "US": _us,
}


# --- CT Radiation Dose SR (TID 10011) --------------------------------------------

#: SNOMED CT codes of the target regions (CID 4030)
TARGET_REGIONS = {
    "Head": "69536005",
    "Chest": "43799004",
    "Abdomen": "818981001",
    "Pelvis": "816092008",
}
ACQUISITION_TYPES = {
    "Spiral Acquisition": ("116152004", "SCT"),
    "Constant Angle Acquisition": ("113805", "DCM"),
}
PHANTOMS = {"IEC Head Dosimetry Phantom": "113690", "IEC Body Dosimetry Phantom": "113691"}


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _content(relationship: str, value_type: str, name: Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([name])
    return item


def _num(name: Dataset, value: float, unit: str, unit_meaning: str) -> Dataset:
    item = _content("CONTAINS", "NUM", name)
    measured = Dataset()
    measured.MeasurementUnitsCodeSequence = Sequence([code(unit, "UCUM", unit_meaning)])
    measured.NumericValue = ds_str(value)
    item.MeasuredValueSequence = Sequence([measured])
    return item


def _code_item(name: Dataset, value: Dataset, relationship: str = "CONTAINS") -> Dataset:
    item = _content(relationship, "CODE", name)
    item.ConceptCodeSequence = Sequence([value])
    return item


def _container(name: Dataset, children: list[Dataset], relationship: str = "CONTAINS") -> Dataset:
    item = _content(relationship, "CONTAINER", name)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = Sequence(children)
    return item


def dose_content(study: Study) -> list[Dataset]:
    """The content items under the root of a TID 10011 CT Radiation Dose report."""
    events = study.dose_events
    items = [
        _code_item(
            code("121058", "DCM", "Procedure reported"),
            code("77477000", "SCT", "Computed Tomography X-Ray"),
            "HAS CONCEPT MOD",
        ),
        _container(
            code("113811", "DCM", "CT Accumulated Dose Data"),
            [
                _num(code("113812", "DCM", "Total Number of Irradiation Events"), len(events),
                     "{events}", "events"),
                _num(code("113813", "DCM", "CT Dose Length Product Total"),
                     study.accumulated_dlp, "mGy.cm", "mGy.cm"),
            ],
        ),
    ]
    for event in events:
        acq_value, acq_scheme = ACQUISITION_TYPES[event.acquisition_type]
        text = _content("CONTAINS", "TEXT", code("125203", "DCM", "Acquisition Protocol"))
        text.TextValue = event.protocol
        uid = _content("CONTAINS", "UIDREF", code("113769", "DCM", "Irradiation Event UID"))
        uid.UID = event.event_uid
        items.append(
            _container(
                code("113819", "DCM", "CT Acquisition"),
                [
                    text,
                    _code_item(
                        code("123014", "DCM", "Target Region"),
                        code(TARGET_REGIONS[event.target_region], "SCT", event.target_region),
                    ),
                    _code_item(
                        code("113820", "DCM", "CT Acquisition Type"),
                        code(acq_value, acq_scheme, event.acquisition_type),
                    ),
                    uid,
                    _container(
                        code("113829", "DCM", "CT Dose"),
                        [
                            _num(code("113830", "DCM", "Mean CTDIvol"), event.ctdivol, "mGy",
                                 "mGy"),
                            _code_item(
                                code("113835", "DCM", "CTDIw Phantom Type"),
                                code(PHANTOMS[event.phantom], "DCM", event.phantom),
                            ),
                            _num(code("113838", "DCM", "DLP"), event.dlp, "mGy.cm", "mGy.cm"),
                        ],
                    ),
                ],
            )
        )
    return items


def _dose_report(ds: Dataset, study: Study, series: Series, set_ids) -> InstanceHook:
    """Turn the common header into an X-Ray Radiation Dose SR with TID 10011 content."""
    for keyword in ("ImageType", "AcquisitionNumber", "SamplesPerPixel",
                    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "BodyPartExamined", "ProtocolName",
                    "AcquisitionDate", "AcquisitionTime"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES["SR"])
    ds.SOPClassUID = SOP_CLASSES["SR"]
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code("113701", "DCM", "X-Ray Radiation Dose Report")])
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentSequence = Sequence(dose_content(study))
    return set_ids
