"""The table contract: one Arrow schema per table, every column described.

This module is the single source of truth for column names, types and
descriptions. The data dictionary (``lake dictionary``, README), the DuckDB
views and the ETL extraction are generated from it, and it is the allow-list
of what enters a table: an attribute not named here is not extracted.

Naming: DICOM attributes keep their keyword (``StudyInstanceUID``); derived
columns are snake_case (``study_year``); columns shared with the NCI Imaging
Data Commons series index (``idc_index``) use its names (``instanceCount``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

RESEARCH = "research"
VAULT = "vault"


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    #: The DICOM keyword the value comes from, when it is a header attribute.
    keyword: str | None = None
    #: Present only in lakes of the ``identified`` profile.
    identified_only: bool = False


@dataclass(frozen=True)
class TableSpec:
    name: str
    zone: str
    grain: str
    description: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()

    def columns_for(self, profile: str = "identified") -> list[Column]:
        return [c for c in self.columns if profile == "identified" or not c.identified_only]

    def schema(self, profile: str = "identified") -> pa.Schema:
        """The logical schema: what queries see (TIME columns are TIME)."""
        fields = [pa.field(c.name, c.type, metadata={"description": c.description})
                  for c in self.columns_for(profile)]
        return pa.schema(fields, metadata={"table": self.name, "grain": self.grain})

    def storage_schema(self, profile: str = "identified") -> pa.Schema:
        """The schema of the Parquet files: Delta Lake has no TIME type, so times
        are stored as ISO strings (``HH:MM:SS.ffffff``) and cast back by the views."""
        fields = [pa.field(c.name, storage_type(c.type),
                           metadata={"description": c.description})
                  for c in self.columns_for(profile)]
        return pa.schema(fields, metadata={"table": self.name, "grain": self.grain})

    def time_columns(self, profile: str = "identified") -> list[str]:
        return [c.name for c in self.columns_for(profile) if pa.types.is_time(c.type)]

    def column_names(self, profile: str = "identified") -> list[str]:
        return self.schema(profile).names


def _dicom(name: str, typ: pa.DataType, description: str, **kw) -> Column:
    return Column(name, typ, description, keyword=name, **kw)


STR = pa.string()
F64 = pa.float64()
I64 = pa.int64()
I32 = pa.int32()
DATE = pa.date32()
TIME = pa.time64("us")
TS = pa.timestamp("us", tz="UTC")
LIST_F64 = pa.list_(pa.float64())
LIST_STR = pa.list_(pa.string())

# --- per-instance attributes extracted from the DICOM header -----------------
# Order matters only for display. ``keyword`` columns are read from the header
# with the value representation mapped to the Arrow type given here.
HEADER_COLUMNS: tuple[Column, ...] = (
    _dicom("PatientID", STR, "Patient identifier (a keyed pseudonym in research lakes)."),
    _dicom("IssuerOfPatientID", STR, "Assigning authority of PatientID."),
    _dicom("PatientName", STR, "Patient name, decoded to Unicode per SpecificCharacterSet; "
           "identified lakes only.", identified_only=True),
    _dicom("PatientBirthDate", DATE, "Date of birth; identified lakes only.",
           identified_only=True),
    _dicom("PatientSex", STR, "M, F or O."),
    _dicom("PatientAge", STR, "Age string as in the header, e.g. 045Y."),
    _dicom("StudyInstanceUID", STR, "Study UID."),
    _dicom("SeriesInstanceUID", STR, "Series UID."),
    _dicom("SOPInstanceUID", STR, "Instance UID; the key of this table."),
    _dicom("SOPClassUID", STR, "SOP class (storage class) UID."),
    _dicom("FrameOfReferenceUID", STR, "Frame of reference UID (spatial registration)."),
    _dicom("AccessionNumber", STR, "RIS accession number (a keyed pseudonym in research lakes)."),
    _dicom("StudyID", STR, "Scanner-assigned study id."),
    _dicom("Modality", STR, "Modality of the series (CT, MR, CR, DX, US, MG, PT, NM, SR, ...)."),
    _dicom("BodyPartExamined", STR, "Body part examined, as coded by the device."),
    _dicom("StudyDate", DATE, "Study start date."),
    _dicom("StudyTime", TIME, "Study start time."),
    _dicom("SeriesDate", DATE, "Series start date."),
    _dicom("SeriesTime", TIME, "Series start time."),
    _dicom("AcquisitionDate", DATE, "Acquisition date."),
    _dicom("ContentDate", DATE, "Content (image) date."),
    _dicom("SeriesNumber", I64, "Series number within the study."),
    _dicom("InstanceNumber", I64, "Instance number within the series."),
    _dicom("StudyDescription", STR, "Study description."),
    _dicom("SeriesDescription", STR, "Series description."),
    _dicom("ProtocolName", STR, "Acquisition protocol name."),
    _dicom("Manufacturer", STR, "Device manufacturer."),
    _dicom("ManufacturerModelName", STR, "Device model."),
    _dicom("StationName", STR, "Station (device) name."),
    _dicom("InstitutionName", STR, "Institution name."),
    _dicom("InstitutionalDepartmentName", STR, "Department name."),
    _dicom("ImageType", LIST_STR, "Image type values (ORIGINAL/DERIVED, PRIMARY/SECONDARY, ...)."),
    _dicom("SliceThickness", F64, "Nominal slice thickness in mm."),
    _dicom("SpacingBetweenSlices", F64, "Spacing between slices in mm."),
    _dicom("SliceLocation", F64, "Relative slice position in mm."),
    _dicom("PixelSpacing", LIST_F64, "Row and column spacing in mm."),
    _dicom("ImageOrientationPatient", LIST_F64, "Direction cosines of the first row and column."),
    _dicom("ImagePositionPatient", LIST_F64, "Position of the first pixel in mm."),
    _dicom("Rows", I64, "Rows of the image matrix."),
    _dicom("Columns", I64, "Columns of the image matrix."),
    _dicom("NumberOfFrames", I64, "Frames in a multi-frame instance."),
    _dicom("BitsAllocated", I64, "Bits allocated per pixel sample."),
    _dicom("PhotometricInterpretation", STR, "Photometric interpretation (MONOCHROME2, RGB, ...)."),
    _dicom("RescaleSlope", F64, "Rescale slope to modality units."),
    _dicom("RescaleIntercept", F64, "Rescale intercept to modality units."),
    _dicom("KVP", F64, "Peak kilovoltage."),
    _dicom("XRayTubeCurrent", F64, "X-ray tube current in mA."),
    _dicom("Exposure", F64, "Exposure in mAs."),
    _dicom("CTDIvol", F64, "Volume CT dose index in mGy (from the image header)."),
    _dicom("ConvolutionKernel", LIST_STR, "Reconstruction kernel(s)."),
    _dicom("ViewPosition", STR, "Radiographic view (PA, AP, LAT, CC, MLO, ...)."),
    _dicom("ImageLaterality", STR, "Laterality of the image (L, R, B, U)."),
    _dicom("Laterality", STR, "Laterality of the paired body part examined."),
    _dicom("BurnedInAnnotation", STR, "YES when identifying text is burned into the pixels."),
    _dicom("TransferSyntaxUID", STR, "Transfer syntax of the file."),
    _dicom("SpecificCharacterSet", LIST_STR, "Character set(s) the text values were encoded in."),
)

INSTANCES = TableSpec(
    name="instances",
    zone=RESEARCH,
    grain="one row per unique SOPInstanceUID",
    description="Every DICOM instance of the archive: typed header attributes and the full "
    "header.",
    columns=(
        *HEADER_COLUMNS,
        Column("patient_age_years", F64, "Age at the study in years, from PatientAge "
               "(or birth date and study date when PatientAge is absent); at most 90 in "
               "research lakes."),
        Column("study_year", I32, "Year of StudyDate (partition key; null when undated)."),
        Column("invalid_attributes", LIST_STR, "Data-quality flag: the attributes present in "
               "the header whose value did not parse or check (non-numeric DS/IS, impossible "
               "date, control characters, too long for its VR, malformed UID); their typed "
               "columns are null, the raw values stay in dicom_json. Null when all are valid."),
        Column("file_size", I64, "Size of the DICOM file in bytes."),
        Column("file_sha256", STR, "SHA-256 of the file's first checksum_bytes bytes, hex (in "
               "research lakes keyed with the lake key, so that the original file cannot be "
               "looked up)."),
        Column("checksum_bytes", I64, "Bytes file_sha256 covers from the start of the file: "
               "the header before the Pixel Data element in lakes made with checksum "
               "'header' (the default), the whole file with 'full' or when the file has no "
               "pixel data."),
        Column("ingest_run_id", STR, "The ingest run that added this row."),
        Column("dicom_json", STR, "The full header as DICOM JSON (PS3.18 F.2); pixel data and "
               "other bulk data left out."),
    ),
    partition_by=("Modality", "study_year"),
)

SERIES = TableSpec(
    name="series",
    zone=RESEARCH,
    grain="one row per SeriesInstanceUID",
    description="Series summary with the column names of IDC's idc_index where they exist.",
    columns=(
        Column("SeriesInstanceUID", STR, "Series UID.", "SeriesInstanceUID"),
        Column("StudyInstanceUID", STR, "Study UID.", "StudyInstanceUID"),
        Column("PatientID", STR, "Patient identifier.", "PatientID"),
        Column("PatientAge", STR, "Age string at the study.", "PatientAge"),
        Column("PatientSex", STR, "Patient sex.", "PatientSex"),
        Column("StudyDate", DATE, "Study date.", "StudyDate"),
        Column("StudyDescription", STR, "Study description.", "StudyDescription"),
        Column("BodyPartExamined", STR, "Body part examined.", "BodyPartExamined"),
        Column("Modality", STR, "Modality.", "Modality"),
        Column("Manufacturer", STR, "Manufacturer.", "Manufacturer"),
        Column("ManufacturerModelName", STR, "Device model.", "ManufacturerModelName"),
        Column("StationName", STR, "Station name.", "StationName"),
        Column("SeriesDate", DATE, "Series date.", "SeriesDate"),
        Column("SeriesTime", TIME, "Series time.", "SeriesTime"),
        Column("SeriesDescription", STR, "Series description.", "SeriesDescription"),
        Column("SeriesNumber", I64, "Series number.", "SeriesNumber"),
        Column("ProtocolName", STR, "Acquisition protocol name (the smallest one when the "
               "instances differ); free text, cleaned like the instances' column.",
               "ProtocolName"),
        Column("SOPClassUID", STR, "SOP class of the instances (the most frequent one).",
               "SOPClassUID"),
        Column("instanceCount", I64, "Number of instances in the series (idc_index name)."),
        Column("series_size_MB", F64, "Total size of the series' files in MB (10^6 bytes)."),
        Column("frame_count", I64, "Total frames (NumberOfFrames, 1 when absent)."),
        Column("instance_number_min", I64, "Smallest InstanceNumber."),
        Column("instance_number_max", I64, "Largest InstanceNumber."),
        Column("slice_thickness_min", F64, "Smallest SliceThickness in mm."),
        Column("slice_thickness_max", F64, "Largest SliceThickness in mm."),
        Column("pixel_spacing_min", F64, "Smallest in-plane pixel spacing in mm."),
        Column("pixel_spacing_max", F64, "Largest in-plane pixel spacing in mm."),
        Column("kvp_min", F64, "Smallest KVP."),
        Column("kvp_max", F64, "Largest KVP."),
        Column("ctdivol_min", F64, "Smallest header CTDIvol in mGy."),
        Column("ctdivol_max", F64, "Largest header CTDIvol in mGy."),
        Column("acquisition_date_min", DATE, "Earliest AcquisitionDate."),
        Column("acquisition_date_max", DATE, "Latest AcquisitionDate."),
        Column("distinct_orientations", I64, "Distinct ImageOrientationPatient values "
               "(rounded to 1e-4); more than 1 means mixed orientations."),
        Column("distinct_dimensions", I64, "Distinct Rows x Columns; more than 1 means mixed "
               "matrix sizes."),
        Column("distinct_positions", I64, "Distinct slice positions along the slice normal."),
        Column("slice_spacing_min", F64, "Smallest gap between consecutive slice positions "
               "along the normal, in mm."),
        Column("slice_spacing_max", F64, "Largest gap between consecutive slice positions."),
        Column("uneven_spacing", pa.bool_(), "True when slice gaps differ by more than 1% "
               "(missing slices or a variable-spacing acquisition)."),
        Column("study_year", I32, "Year of StudyDate (partition key)."),
        Column("first_ingest_run_id", STR, "Run that added the first instance of the series."),
        Column("last_ingest_run_id", STR, "Run that added the latest instance of the series."),
    ),
    partition_by=("Modality", "study_year"),
)

STUDIES = TableSpec(
    name="studies",
    zone=RESEARCH,
    grain="one row per StudyInstanceUID",
    description="Study summary: patient, date/time, modalities, body parts, counts.",
    columns=(
        Column("StudyInstanceUID", STR, "Study UID.", "StudyInstanceUID"),
        Column("PatientID", STR, "Patient identifier.", "PatientID"),
        Column("PatientName", STR, "Patient name; identified lakes only.", "PatientName",
               identified_only=True),
        Column("PatientSex", STR, "Patient sex.", "PatientSex"),
        Column("PatientAge", STR, "Age string at the study.", "PatientAge"),
        Column("patient_age_years", F64, "Age at the study in years."),
        Column("AccessionNumber", STR, "Accession number.", "AccessionNumber"),
        Column("StudyID", STR, "Study id.", "StudyID"),
        Column("StudyDate", DATE, "Study date.", "StudyDate"),
        Column("StudyTime", TIME, "Study time.", "StudyTime"),
        Column("StudyDescription", STR, "Study description.", "StudyDescription"),
        Column("Modality", STR, "Main modality: the modality with most instances (ties by "
               "name), so that each study has one (partition key)."),
        Column("modalities", LIST_STR, "All modalities in the study, sorted."),
        Column("body_parts", LIST_STR, "All BodyPartExamined values in the study, sorted."),
        Column("BodyPartExamined", STR, "Main body part: the most frequent one."),
        Column("ProtocolName", STR, "Main acquisition protocol: the most frequent "
               "ProtocolName of the study's instances that have one (ties by name); free "
               "text, cleaned like the instances' column; a repeat-exam matching key."),
        Column("InstitutionName", STR, "Institution.", "InstitutionName"),
        Column("InstitutionalDepartmentName", STR, "Department.", "InstitutionalDepartmentName"),
        Column("StationName", STR, "Station of the first series.", "StationName"),
        Column("Manufacturer", STR, "Manufacturer of the first series.", "Manufacturer"),
        Column("ManufacturerModelName", STR, "Model of the first series.",
               "ManufacturerModelName"),
        Column("series_count", I64, "Number of series."),
        Column("instance_count", I64, "Number of instances."),
        Column("instance_kinds", I32, "The kinds of instance the study has, as a bit set for "
               "the repeat-exam exclusions: bit k (0-15) is set when some instance is of kind "
               "k = 1 x localizer (ImageType LOCALIZER) + 2 x derived (ImageType DERIVED) + "
               "4 x secondary (ImageType SECONDARY or a Secondary Capture SOP class) + 8 x "
               "non-image (Modality SR, KO, PR, REG, SEG, RTSTRUCT or DOC); bit 0 = a plain "
               "original image. Null in lakes summarized before the column existed."),
        Column("study_size_MB", F64, "Total size of the study's files in MB (10^6 bytes)."),
        Column("study_year", I32, "Year of StudyDate (partition key)."),
    ),
    partition_by=("Modality", "study_year"),
)

PATIENTS = TableSpec(
    name="patients",
    zone=RESEARCH,
    grain="one row per PatientID",
    description="Patient summary: sex, age range, first and last study.",
    columns=(
        Column("PatientID", STR, "Patient identifier.", "PatientID"),
        Column("PatientName", STR, "Patient name; identified lakes only.", "PatientName",
               identified_only=True),
        Column("PatientSex", STR, "Patient sex (the most frequent value across studies).",
               "PatientSex"),
        Column("age_min_years", F64, "Youngest age at a study, in years."),
        Column("age_max_years", F64, "Oldest age at a study, in years."),
        Column("first_study_date", DATE, "Date of the first study."),
        Column("last_study_date", DATE, "Date of the latest study."),
        Column("study_count", I64, "Number of studies."),
        Column("series_count", I64, "Number of series."),
        Column("instance_count", I64, "Number of instances."),
        Column("modalities", LIST_STR, "All modalities, sorted."),
    ),
)

QUARANTINE = TableSpec(
    name="quarantine",
    zone=RESEARCH,
    grain="one row per rejected input file and run",
    description="Files that could not be ingested, with a reason code (paths are in the vault).",
    columns=(
        Column("file_sha256", STR, "SHA-256 of the rejected file, keyed in research lakes "
               "(null when unreadable)."),
        Column("file_size", I64, "Size of the file in bytes."),
        Column("reason", STR, "Reason code (see etl.errors.REASONS)."),
        Column("message", STR, "What was wrong, without the path."),
        Column("ingest_run_id", STR, "The run that rejected it."),
        Column("quarantined_at", TS, "When it was rejected."),
        Column("resolved_by_run_id", STR, "The run that ingested a fixed version of the file "
               "(same path); null while unresolved."),
        Column("resolved_at", TS, "When it was marked resolved."),
    ),
)

CONFLICTS = TableSpec(
    name="conflicts",
    zone=RESEARCH,
    grain="one row per file whose SOPInstanceUID is already in the lake with other content",
    description="Same SOPInstanceUID, different bytes: the first version is kept, the other "
    "recorded here.",
    columns=(
        Column("SOPInstanceUID", STR, "The contested instance UID.", "SOPInstanceUID"),
        Column("StudyInstanceUID", STR, "Study of the rejected version.", "StudyInstanceUID"),
        Column("SeriesInstanceUID", STR, "Series of the rejected version.", "SeriesInstanceUID"),
        Column("kept_sha256", STR, "Checksum of the version kept in instances."),
        Column("rejected_sha256", STR, "Checksum of the version not ingested."),
        Column("kept_ingest_run_id", STR, "Run that ingested the kept version."),
        Column("ingest_run_id", STR, "Run that met the rejected version."),
        Column("differing_keywords", LIST_STR, "Header attributes whose values differ "
               "(top level, bulk data excluded)."),
        Column("detected_at", TS, "When the conflict was found."),
    ),
)

INGEST_RUNS = TableSpec(
    name="ingest_runs",
    zone=RESEARCH,
    grain="one row per ingest run",
    description="Every run, even a no-op: version, configuration, counts, durations.",
    columns=(
        Column("ingest_run_id", STR, "Run id (UTC time + random suffix)."),
        Column("started_at", TS, "Start time."),
        Column("finished_at", TS, "End time."),
        Column("code_version", STR, "Version of the imaging-lakehouse package."),
        Column("schema_version", I64, "Table schema version."),
        Column("config_hash", STR, "SHA-256 of the ingest configuration (JSON, sorted keys)."),
        Column("config_json", STR, "The ingest configuration (source location excluded)."),
        Column("source_kind", STR, "Where the files came from: folder, dicomweb, dimse "
               "(C-GET), dimse-listen (received by `lake listen`) or s3 (an object store)."),
        Column("files_seen", I64, "Files found by discovery."),
        Column("files_unchanged", I64, "Files already ingested in an earlier run with the same "
               "path, size and mtime; not re-read."),
        Column("files_ingested", I64, "Files that added a new instance row."),
        Column("files_duplicate", I64, "Files byte-identical to an instance already in the lake."),
        Column("files_conflict", I64, "Files with a known SOPInstanceUID but other content."),
        Column("files_skipped", I64, "Files skipped on purpose (DICOMDIR)."),
        Column("files_quarantined", I64, "Files rejected with a reason code."),
        Column("bytes_read", I64, "Bytes of the files read."),
        Column("discover_seconds", F64, "Time spent walking the source and checking the "
               "file index (files are found while earlier ones are read: part of "
               "`extract_seconds`)."),
        Column("extract_seconds", F64, "Time from the start of the walk to the last commit "
               "of rows (discovery included)."),
        Column("summarize_seconds", F64, "Time spent bringing series/studies/patients/"
               "dose_events up to date (updated or rebuilt)."),
        Column("summaries", STR, "How series/studies/patients/dose_events were brought up to "
               "date: updated (the rows of the series, studies and patients the run changed), "
               "rebuilt (whole: a first run, most rows new, or other summary code) or current "
               "(nothing changed)."),
        Column("total_seconds", F64, "Wall time of the run."),
        Column("workers", I64, "Dask workers used."),
        Column("scheduler", STR, "Dask scheduler: processes, threads, synchronous or an address."),
        Column("status", STR, "completed, or failed with the reason in message."),
        Column("message", STR, "Error message of a failed run; in a research lake only its "
               "kind (its text may quote source paths or identifiers: the run's output and "
               "log have it)."),
    ),
)

FILES = TableSpec(
    name="files",
    zone=VAULT,
    grain="one row per file path and run that read it",
    description="Vault: source paths with their outcome; drives incremental ingest.",
    columns=(
        Column("path", STR, "Absolute source path (identifying: vault only)."),
        Column("file_size", I64, "Size in bytes when read."),
        Column("mtime_ns", I64, "Modification time in ns when read."),
        Column("file_sha256", STR, "The file's checksum as the research tables hold it "
               "(keyed in research lakes)."),
        Column("source_sha256", STR, "Plain SHA-256 of the source file's first checksum_bytes "
               "bytes (null when unreadable)."),
        Column("checksum_bytes", I64, "Bytes the checksums cover from the start of the file "
               "(the whole file for skipped and quarantined files)."),
        Column("outcome", STR, "ingested, duplicate, conflict, skipped or quarantined."),
        Column("reason", STR, "Reason code for skipped / quarantined files."),
        Column("message", STR, "Detail of the reason."),
        Column("SOPInstanceUID", STR, "Instance UID found in the file, when any."),
        Column("ingest_run_id", STR, "The run that read the file."),
    ),
)

DOSE_EVENTS = TableSpec(
    name="dose_events",
    zone=RESEARCH,
    grain="one row per CT irradiation event of a CT Radiation Dose SR",
    description="CT irradiation events parsed from CT Radiation Dose Structured Reports "
    "(TID 10011), derived from instances.",
    columns=(
        Column("StudyInstanceUID", STR, "Study the report belongs to.", "StudyInstanceUID"),
        Column("SeriesInstanceUID", STR, "Series of the dose report.", "SeriesInstanceUID"),
        Column("SOPInstanceUID", STR, "The dose report instance.", "SOPInstanceUID"),
        Column("PatientID", STR, "Patient identifier.", "PatientID"),
        Column("StudyDate", DATE, "Study date.", "StudyDate"),
        Column("event_index", I64, "Position of the CT Acquisition in the report, from 1."),
        Column("IrradiationEventUID", STR, "Irradiation Event UID (113769) of the acquisition."),
        Column("acquisition_protocol", STR, "Acquisition Protocol (125203), as text; null "
               "in research lakes (free text of reports is not on the allow-list)."),
        Column("target_region", STR, "Target Region (123014), the code meaning (e.g. Chest)."),
        Column("acquisition_type", STR, "CT Acquisition Type (113820), the code meaning "
               "(Spiral Acquisition, Sequenced Acquisition, Constant Angle Acquisition, ...)."),
        Column("phantom_type", STR, "CTDIw Phantom Type (113835), the code meaning "
               "(IEC Head / IEC Body Dosimetry Phantom)."),
        Column("CTDIvol", F64, "Mean CTDIvol (113830) of the acquisition in mGy."),
        Column("DLP", F64, "Dose length product (113838) of the acquisition in mGy.cm."),
        Column("accumulated_DLP", F64, "CT Dose Length Product Total (113813) of the whole "
               "report in mGy.cm (the same on every row of one report)."),
    ),
)


# --- image-derived features (etl.features; issue 6) ---------------------------
SERIES_GEOMETRY = TableSpec(
    name="series_geometry",
    zone=RESEARCH,
    grain="one row per image SeriesInstanceUID and features run",
    description="How an image series assembles into a 3-D volume along its slice normal, "
    "with the checks of IDC's volume geometry index (missing slices, uneven spacing, oblique "
    "or tilted stacks, mixed dimensions, multiple stacks).",
    columns=(
        Column("SeriesInstanceUID", STR, "Image series UID (as in instances).",
               "SeriesInstanceUID"),
        Column("StudyInstanceUID", STR, "Study UID.", "StudyInstanceUID"),
        Column("Modality", STR, "Modality of the series.", "Modality"),
        Column("instance_count", I64, "Instances of the series in the lake."),
        Column("slice_count", I64, "Slices (frames of single-frame instances) with geometry."),
        Column("Rows", I64, "Rows of the volume (null when mixed).", "Rows"),
        Column("Columns", I64, "Columns of the volume (null when mixed).", "Columns"),
        Column("row_spacing", F64, "Spacing between rows (PixelSpacing[0]) in mm."),
        Column("column_spacing", F64, "Spacing between columns (PixelSpacing[1]) in mm."),
        Column("slice_spacing_median", F64, "Median gap between consecutive slice positions "
               "along the normal, in mm."),
        Column("slice_spacing_min", F64, "Smallest gap between consecutive slice positions."),
        Column("slice_spacing_max", F64, "Largest gap between consecutive slice positions."),
        Column("slice_spacing_std", F64, "Standard deviation of the gaps, in mm."),
        Column("orientation", STR, "axial, coronal, sagittal or oblique (from the normal)."),
        Column("normal_x", F64, "Slice normal (row x column direction cosines), x."),
        Column("normal_y", F64, "Slice normal, y."),
        Column("normal_z", F64, "Slice normal, z."),
        Column("tilt_degrees", F64, "Angle between the slice normal and the line through the "
               "slice origins (gantry tilt or shear); 0 for a regular stack."),
        Column("distinct_orientations", I64, "Distinct ImageOrientationPatient (1e-4)."),
        Column("distinct_dimensions", I64, "Distinct Rows x Columns."),
        Column("distinct_positions", I64, "Distinct slice positions along the normal (0.01 mm)."),
        Column("duplicate_positions", I64, "Slices sharing a position with another slice "
               "(multiple stacks, or repeated acquisitions)."),
        Column("missing_slices", I64, "Slices missing from a regular grid at the median "
               "spacing: round(extent / median gap) + 1 - distinct positions."),
        Column("is_oblique", pa.bool_(), "True when the normal is not within 1e-3 of an axis."),
        Column("is_tilted", pa.bool_(), "True when tilt_degrees exceeds 0.01."),
        Column("uneven_spacing", pa.bool_(), "True when any gap differs from the median by "
               "more than 1%."),
        Column("mixed_dimensions", pa.bool_(), "True when Rows x Columns vary."),
        Column("multiple_stacks", pa.bool_(), "True when orientations differ or positions "
               "repeat."),
        Column("volume_ok", pa.bool_(), "True when the series assembles into one regular "
               "volume: one orientation, one matrix size, no duplicate, missing or tilted slices."),
        Column("issues", LIST_STR, "Codes of the failed checks: no_geometry, mixed_dimensions, "
               "multiple_stacks, missing_slices, uneven_spacing, tilted, oblique."),
        Column("origin", LIST_F64, "Position (x, y, z) of the first voxel of the sorted volume."),
        Column("features_run_id", STR, "The features run that computed the row."),
    ),
)

IMAGE_STATS = TableSpec(
    name="image_stats",
    zone=RESEARCH,
    grain="one row per image SeriesInstanceUID and features run",
    description="Pixel statistics of a series in modality units (HU for CT after rescale), "
    "or the reason the pixels could not be read.",
    columns=(
        Column("SeriesInstanceUID", STR, "Image series UID.", "SeriesInstanceUID"),
        Column("StudyInstanceUID", STR, "Study UID.", "StudyInstanceUID"),
        Column("Modality", STR, "Modality.", "Modality"),
        Column("units", STR, "Units of the values: HU for CT, otherwise the RescaleType or "
               "'stored' when no rescale applies."),
        Column("instances_read", I64, "Instances whose pixels were decoded."),
        Column("pixel_failures", I64, "Instances whose pixels could not be read: no source "
               "file, a file changed since it was ingested, undecodable pixels, or a "
               "rescale that gives no number (an empty or infinite Rescale Slope or "
               "Intercept)."),
        Column("failure_message", STR, "The first such failure (the instance, the transfer "
               "syntax and the error; values the error quotes from the file are left out "
               "as '…', numbers and attribute names kept)."),
        Column("voxel_count", I64, "Pixels the statistics are over."),
        Column("p01", F64, "1st percentile (linear interpolation)."),
        Column("p05", F64, "5th percentile."),
        Column("p25", F64, "25th percentile."),
        Column("p50", F64, "Median."),
        Column("p75", F64, "75th percentile."),
        Column("p95", F64, "95th percentile."),
        Column("p99", F64, "99th percentile."),
        Column("mean", F64, "Mean."),
        Column("std", F64, "Standard deviation (population)."),
        Column("min", F64, "Smallest value."),
        Column("max", F64, "Largest value."),
        Column("noise_sigma", F64, "Background noise estimate: median over slices of "
               "Immerkaer's fast noise estimate (Laplacian-difference mask), in the same units."),
        Column("saturated_fraction", F64, "Fraction of pixels whose stored value is at the "
               "smallest or largest value BitsStored and PixelRepresentation allow."),
        Column("burned_in_annotation", pa.bool_(), "True when any instance has "
               "BurnedInAnnotation YES."),
        Column("status", STR, "ok, partial (some instances failed) or failed."),
        Column("features_run_id", STR, "The features run that computed the row."),
    ),
)

RADIOMICS_FEATURES = TableSpec(
    name="radiomics_features",
    zone=RESEARCH,
    grain="one row per image series, mask, segment, feature and parameter set",
    description="IBSI radiomics features of a segmented region, long format (a wide view per "
    "segment is radiomics_wide).",
    columns=(
        Column("SeriesInstanceUID", STR, "The image series the features are computed on.",
               "SeriesInstanceUID"),
        Column("mask_SOPInstanceUID", STR, "The SEG or RTSTRUCT instance of the mask (for a "
               "mask file, null)."),
        Column("mask_source", STR, "seg, rtstruct or file (with the file name)."),
        Column("segment_number", I64, "SegmentNumber (SEG), ROINumber (RTSTRUCT) or label value."),
        Column("segment_label", STR, "SegmentLabel / ROIName / label value as text."),
        Column("feature_class", STR, "firstorder, shape, glcm, glrlm, glszm, gldm, ngtdm; "
               "on a filtered image prefixed by its pyradiomics image type "
               "(log-sigma-1-0-mm-3D_firstorder, wavelet-LLH_glcm)."),
        Column("feature_name", STR, "Feature name as in pyradiomics (e.g. Entropy)."),
        Column("value", F64, "Feature value."),
        Column("voxel_count", I64, "Voxels in the segment."),
        Column("param_hash", STR, "SHA-256 of the canonical parameter set (JSON)."),
        Column("params_version", I64, "Version of the parameter file format."),
        Column("extractor_version", STR, "Version of the lake's extractor."),
        Column("features_run_id", STR, "The features run that computed the row."),
    ),
)

FEATURE_FAILURES = TableSpec(
    name="feature_failures",
    zone=RESEARCH,
    grain="one row per series or mask that could not be processed, per features run",
    description="What a features run could not compute, and why (geometry mismatch, "
    "undecodable pixels, unsupported mask).",
    columns=(
        Column("SeriesInstanceUID", STR, "Image series concerned; null for a mask placed on "
               "none (no_image_series, or a mask whose header cannot be read).",
               "SeriesInstanceUID"),
        Column("mask_SOPInstanceUID", STR, "Mask instance concerned, if any."),
        Column("stage", STR, "volume, mask or radiomics (pixels a series' image statistics "
               "could not read are in image_stats: status, failure_message)."),
        Column("reason", STR, "Reason code: no_geometry, not_a_volume, pixel_decode, "
               "geometry_mismatch, unsupported_mask, no_image_series, empty_segment, "
               "missing_file, source_changed, worker_crash, feature_error."),
        Column("message", STR, "What was wrong and what to do (values a reader's error "
               "quotes from the file are left out as '…', numbers and attribute names kept)."),
        Column("features_run_id", STR, "The features run."),
    ),
)

IDENTIFIERS = TableSpec(
    name="identifiers",
    zone=VAULT,
    grain="one row per (kind, original value) pseudonymized in a research lake",
    description="Vault: the pseudonym <-> original map behind `lake reidentify`.",
    columns=(
        Column("kind", STR, "PatientID, AccessionNumber, StudyID or UID."),
        Column("pseudonym", STR, "The value in the research tables."),
        Column("original", STR, "The original value (identifying: vault only)."),
        Column("ingest_run_id", STR, "The run that first met it."),
    ),
)

TABLES: dict[str, TableSpec] = {
    t.name: t for t in (INSTANCES, SERIES, STUDIES, PATIENTS, QUARANTINE, CONFLICTS,
                        INGEST_RUNS, FILES, IDENTIFIERS, DOSE_EVENTS, SERIES_GEOMETRY,
                        IMAGE_STATS, RADIOMICS_FEATURES, FEATURE_FAILURES)
}


def table(name: str) -> TableSpec:
    from lakehouse.errors import UnknownTableError

    try:
        return TABLES[name]
    except KeyError:
        raise UnknownTableError(name, sorted(TABLES)) from None


def storage_type(logical: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_time(logical) else logical


def conform(spec: TableSpec, data: pa.Table, profile: str) -> pa.Table:
    """Select and cast ``data`` to the table's storage schema; missing columns are null."""
    schema = spec.storage_schema(profile)
    arrays = []
    for f in schema:
        if f.name in data.column_names:
            col = data.column(f.name)
            if pa.types.is_time(col.type):
                col = col.cast(pa.time64("us")).cast(pa.string())
            arrays.append(col.cast(f.type))
        else:
            arrays.append(pa.nulls(data.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# --- the research allow-list of the DICOM JSON header ------------------------
#: Attributes kept in a research lake's ``dicom_json`` besides the typed
#: columns above: technical, non-identifying attributes that analyses need
#: (geometry, acquisition, pixel description, dose reports, segmentations,
#: structure sets). Everything else is dropped; see ``lakehouse.deid`` for
#: what is done to the values (UIDs remapped, dates shifted, IDs pseudonymized,
#: free-text labels cleaned of identifiers, person names never kept).
HEADER_ALLOWLIST: dict[str, tuple[str, ...]] = {
    "image pixel description": (
        "SamplesPerPixel", "BitsStored", "HighBit", "PixelRepresentation",
        "PlanarConfiguration", "PixelAspectRatio", "WindowCenter", "WindowWidth",
        "RescaleType", "LossyImageCompression", "LossyImageCompressionRatio",
        "LossyImageCompressionMethod", "FrameIncrementPointer", "PresentationLUTShape",
        "RecognizableVisualFeatures", "PixelPaddingValue",
    ),
    "geometry": (
        "PatientPosition", "PatientOrientation", "ImagerPixelSpacing", "GantryDetectorTilt",
        "TableHeight", "DataCollectionDiameter", "ReconstructionDiameter",
        "DistanceSourceToDetector", "DistanceSourceToPatient",
    ),
    "acquisition": (
        "AcquisitionNumber", "AcquisitionTime", "ContentTime", "AcquisitionDateTime",
        "InstanceCreationDate", "ScanOptions", "RotationDirection", "ExposureTime",
        "FilterType", "GeneratorPower", "FocalSpots", "RevolutionTime",
        "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed",
        "TableFeedPerRotation", "SpiralPitchFactor", "ExposureModulationType",
        "EstimatedDoseSaving", "CTDIPhantomTypeCodeSequence", "ScanningSequence",
        "SequenceVariant", "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime",
        "FlipAngle", "MagneticFieldStrength", "NumberOfAverages", "EchoTrainLength",
        "ImagedNucleus", "ImagingFrequency", "PixelBandwidth", "DetectorType",
        "ExposureIndex", "TargetExposureIndex", "DeviationIndex", "CompressionForce",
        "BodyPartThickness", "AnodeTargetMaterial", "FilterMaterial", "ViewCodeSequence",
        "PresentationIntentType", "Units", "DecayCorrection", "CorrectedImage", "SeriesType",
        "RadiopharmaceuticalInformationSequence", "Radiopharmaceutical",
        "RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
        "RadiopharmaceuticalStartDateTime", "SoftwareVersions", "DeviceSerialNumber",
    ),
    "patient characteristics (PS3.15 Retain Patient Characteristics Option)": (
        "PatientSize", "PatientWeight",
    ),
    "references between objects (UIDs remapped)": (
        "ReferencedImageSequence", "ReferencedSeriesSequence", "ReferencedInstanceSequence",
        "ReferencedSOPSequence", "ReferencedSOPClassUID", "ReferencedSOPInstanceUID",
        "ReferencedFrameNumber", "SourceImageSequence", "DerivationImageSequence",
        "ReferencedFrameOfReferenceSequence", "ReferencedFrameOfReferenceUID",
        "RTReferencedStudySequence", "RTReferencedSeriesSequence", "ContourImageSequence",
    ),
    "structured reports: coded and numeric content (dose reports, TID 10011)": (
        "ContentSequence", "ConceptNameCodeSequence", "ConceptCodeSequence", "CodeValue",
        "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "ValueType",
        "RelationshipType", "MeasuredValueSequence", "NumericValue", "FloatingPointValue",
        "MeasurementUnitsCodeSequence", "ContentTemplateSequence", "TemplateIdentifier",
        "MappingResource", "ContinuityOfContent", "CompletionFlag", "VerificationFlag",
        "DateTime", "Date", "Time", "UID",
    ),
    "segmentations and structure sets (labels cleaned of identifiers)": (
        "SegmentSequence", "SegmentNumber", "SegmentLabel", "SegmentAlgorithmType",
        "SegmentAlgorithmName", "SegmentedPropertyCategoryCodeSequence",
        "SegmentedPropertyTypeCodeSequence", "AnatomicRegionSequence", "SegmentationType",
        "MaximumFractionalValue", "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence", "PlaneOrientationSequence",
        "PlanePositionSequence", "PixelMeasuresSequence", "SegmentIdentificationSequence",
        "ReferencedSegmentNumber", "FrameContentSequence", "DimensionIndexValues",
        "DimensionIndexSequence", "DimensionIndexPointer", "FunctionalGroupPointer",
        "DimensionOrganizationSequence", "DimensionOrganizationUID", "ContentLabel",
        "StructureSetLabel", "StructureSetDate", "StructureSetTime",
        "StructureSetROISequence", "ROINumber", "ROIName", "ROIGenerationAlgorithm",
        "ROIContourSequence", "ContourSequence", "ContourGeometricType",
        "NumberOfContourPoints", "ContourData", "ReferencedROINumber", "ROIDisplayColor",
        "RTROIObservationsSequence", "RTROIInterpretedType", "ObservationNumber",
    ),
}


def header_allowlist() -> set[str]:
    """Every keyword a research lake keeps in ``dicom_json``: typed columns + the list."""
    keep = {c.keyword for c in HEADER_COLUMNS if c.keyword and not c.identified_only}
    for keywords in HEADER_ALLOWLIST.values():
        keep.update(keywords)
    return keep
