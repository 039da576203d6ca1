"""Reason codes and errors of the ETL.

A problem with one input file is never raised out of a batch: it becomes a
:class:`FileRejected` carrying a reason code, which the job turns into a
quarantine (or skipped) row. Errors that stop a run derive from
:class:`lakehouse.errors.LakeError`.
"""

from __future__ import annotations

from lakehouse.errors import LakeError

#: The UIDs every instance must carry; each has a ``missing_uid:`` and an
#: ``invalid_uid:`` reason code.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

#: Quarantine reason codes: code -> what it means and what to do.
REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "io_error": "the file could not be opened or read, or the folder (the row's path) could "
    "not be listed (permissions, I/O error); it is read again by the next run",
    "not_dicom": "no DICM magic and no recognisable DICOM data set at the start",
    "truncated": "the file ends inside the file meta, an element header, a value or the pixel "
    "data (element offsets checked against the file size)",
    "element_too_large": "an element declares a value larger than the per-element limit "
    "(1 GiB), whether or not the file holds it; nothing is allocated for it",
    "too_deep": "sequences are nested deeper than the configured limit (64)",
    "unsupported_transfer_syntax": "the transfer syntax UID is not a DICOM transfer syntax "
    "this reader knows",
    "parse_error": "pydicom could not parse the header after the structure checks passed",
    "out_of_memory": "reading the file raised MemoryError; the rest of its batch was kept",
    "worker_crash": "reading the file crashed its worker process (a segfault or an exit); the "
    "rest of its batch was read again without it",
    **{f"missing_uid:{k}": f"{k} is absent or empty"
       + (" (also in the file meta)" if k in ("SOPInstanceUID", "SOPClassUID") else "")
       for k in REQUIRED_UIDS},
    **{f"invalid_uid:{k}": f"{k} is not a valid DICOM UID (digits and dots, no leading "
       "zeros, at most 64 characters)" for k in REQUIRED_UIDS},
}

#: Reasons for files skipped on purpose (not errors).
SKIP_REASONS: dict[str, str] = {
    "dicomdir": "a DICOMDIR media directory, not an image: indexed files are ingested directly",
}


class FileRejected(LakeError):
    """One input file cannot be ingested; ``reason`` is a key of REASONS or SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS and reason not in SKIP_REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")

    @property
    def skipped(self) -> bool:
        return self.reason in SKIP_REASONS


class SourceError(LakeError):
    def __init__(self, source: str, detail: str):
        self.source = source
        self.detail = detail
        super().__init__(f"cannot read source {source}: {detail}")


class SchedulerError(LakeError):
    def __init__(self, address: str, detail: str):
        self.address = address
        self.detail = detail
        super().__init__(
            f"cannot use Dask scheduler {address}: {detail}; start one with "
            "`dask scheduler` or leave out --scheduler to run locally"
        )


class WorkerStartError(LakeError):
    """The local pool's worker processes died while starting, before any of them could
    take a batch: usually, where the workers are spawned (no fork server: Windows), a
    script that calls ``ingest()`` at its top level without ``if __name__ ==
    "__main__":`` (each spawned worker imports the main module, which starts the ingest
    again). Workers forked from the lake's server do not import it."""

    def __init__(self, main: str | None):
        where = f", here {main}" if main else ""
        super().__init__(
            "the ingest worker processes died while starting, before reading any file "
            "(their error is above). A script that calls ingest() must do so under "
            f"`if __name__ == \"__main__\":` (each worker imports the main module{where}), "
            "or use scheduler=\"threads\"")


#: Reason codes of ``feature_failures`` rows (image-derived features).
FEATURE_REASONS: dict[str, str] = {
    "no_geometry": "the series has no usable ImagePositionPatient/ImageOrientationPatient/"
                   "PixelSpacing",
    "not_a_volume": "the slices do not form one regular volume (see series_geometry.issues)",
    "missing_file": "an instance has no ingested source file in the vault",
    "source_changed": "a source file is no longer the one ingested (its size or checksum "
                      "differs): ingest its folder again",
    "pixel_decode": "pixel data could not be decoded (transfer syntax without a decoder, "
                    "corrupt data)",
    "geometry_mismatch": "the mask's grid differs from the image's; it is never resampled",
    "unsupported_mask": "the mask object cannot be read as a segmentation",
    "no_image_series": "the mask references no image series of the lake (not ingested yet, "
                       "or its reference is damaged); recorded by runs over the whole lake",
    "empty_segment": "the segment has no voxel on the image grid",
    "worker_crash": "computing the series or segment killed its worker process (a decoder's "
                    "crash, or the memory exhausted); the rest of the run went on",
    "feature_error": "an unexpected error while computing a segment's features (the message "
                     "names it; please report it with the parameter file)",
}


class FeatureError(LakeError):
    """A series or mask cannot be turned into features; recorded, never raised out of a job."""

    def __init__(self, reason: str, series_uid: str | None, message: str,
                 mask_uid: str | None = None):
        if reason not in FEATURE_REASONS:
            raise ValueError(f"unknown feature failure reason {reason!r}")
        self.reason = reason
        self.series_uid = series_uid
        self.mask_uid = mask_uid
        self.message = message
        super().__init__(f"{reason}: {message}")


class GeometryMismatchError(FeatureError):
    """Mask and image grids differ: says which property and by how much."""

    def __init__(self, series_uid: str | None, what: str, expected, actual,
                 mask_uid: str | None = None):
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(
            "geometry_mismatch", series_uid,
            f"mask {what} {actual} does not match image {what} {expected} "
            f"(series {series_uid}); the lake never resamples a mask: export the mask on the "
            "image's grid", mask_uid)
