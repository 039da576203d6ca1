"""Archive presets: typed, documented, overridable by keyword."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


def _default_weights() -> dict[str, float]:
    return {
        "CT": 0.30,
        "MR": 0.15,
        "CR": 0.15,
        "DX": 0.12,
        "US": 0.10,
        "MG": 0.08,
        "PT": 0.05,
        "NM": 0.05,
    }


@dataclass(frozen=True)
class ArchiveConfig:
    """What one synthetic archive looks like.

    The generator plans studies until the instance files reach about
    ``target_files`` (the special files - duplicates, conflict, bad files,
    DICOMDIR - included).
    """

    #: approximate number of files in the archive
    target_files: int = 300
    #: Rows/Columns of CT slices (int16, 2 bytes per pixel)
    ct_matrix: int = 64
    #: Rows/Columns of MR slices
    mr_matrix: int = 64
    #: Rows/Columns of PT and NM slices
    pet_matrix: int = 32
    #: Rows/Columns of CR, DX and MG images
    xray_matrix: int = 64
    #: Rows, Columns of US frames
    us_shape: tuple[int, int] = (48, 64)
    #: inclusive range of slices per CT axial series
    ct_slices: tuple[int, int] = (8, 16)
    #: inclusive range of slices per MR series
    mr_slices: tuple[int, int] = (6, 12)
    #: inclusive range of slices per PT / NM series
    pet_slices: tuple[int, int] = (8, 12)
    #: relative frequency of each modality among studies
    modality_weights: dict[str, float] = field(default_factory=_default_weights)
    #: first and last study year
    years: tuple[int, int] = (2019, 2024)

    def replace(self, **overrides: object) -> ArchiveConfig:
        """Return a copy with fields replaced; unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown archive option(s) {unknown}; expected one of {sorted(names)}")
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """A stable JSON text of the configuration (seeds the UID namespace)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


PRESETS: dict[str, ArchiveConfig] = {
    # ~300 files, 64x64 CT/MR: the test suite's archive (< 5 s).
    "test": ArchiveConfig(),
    # ~2,000 files, 256x256 CT (< 30 s).
    "demo": ArchiveConfig(
        target_files=2000,
        ct_matrix=256,
        mr_matrix=256,
        pet_matrix=128,
        xray_matrix=256,
        us_shape=(240, 320),
        ct_slices=(30, 60),
        mr_slices=(12, 24),
        pet_slices=(20, 40),
    ),
    # target_files (default 20,000) small files: 64x64 images, ~10 KB each (the
    # per-file cost of an ingest, with little I/O).
    "bench-small": ArchiveConfig(target_files=20000),
    # target_files (default 20,000), mostly 512x512 int16 CT slices (~514 KB each).
    "bench": ArchiveConfig(
        target_files=20000,
        ct_matrix=512,
        mr_matrix=256,
        pet_matrix=128,
        xray_matrix=256,
        us_shape=(480, 640),
        ct_slices=(100, 200),
        mr_slices=(20, 40),
        pet_slices=(40, 80),
        modality_weights={
            "CT": 0.45,
            "MR": 0.12,
            "CR": 0.12,
            "DX": 0.1,
            "US": 0.07,
            "MG": 0.06,
            "PT": 0.04,
            "NM": 0.04,
        },
    ),
}
