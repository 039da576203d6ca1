"""Synthetic hospital DICOM archives with an exact ground truth.

>>> from synth import generate_archive
>>> truth = generate_archive(tmp / "archive", seed=1, preset="test")  # doctest: +SKIP
>>> truth.outcomes  # doctest: +SKIP
{'ingested': ..., 'duplicate': 3, 'conflict': 1, 'skipped': 1, 'quarantined': 8}

A top-level package of its own: it imports only the standard library, numpy
and pydicom, never the rest of the project.
"""

from synth.archive import generate_archive
from synth.config import PRESETS, ArchiveConfig
from synth.truth import GroundTruth

__all__ = ["PRESETS", "ArchiveConfig", "GroundTruth", "generate_archive"]
