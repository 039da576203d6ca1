"""Series geometry checks on instance rows (pure function, exact expectations)."""

from __future__ import annotations

import math

import pytest

from etl.volumes import series_geometry

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def rows(zs, orientation=AXIAL, shift_x=0.0, dims=None):
    out = []
    for i, z in enumerate(zs):
        r, c = dims[i] if dims else (64, 64)
        out.append({"SOPInstanceUID": f"1.2.{i}", "SeriesInstanceUID": "1.2",
                    "ImagePositionPatient": [shift_x * i, 0.0, z],
                    "ImageOrientationPatient": orientation, "PixelSpacing": [0.5, 0.7],
                    "Rows": r, "Columns": c, "Modality": "CT"})
    return out


def test_regular_stack_sorted_along_the_normal():
    g = series_geometry(rows([10.0, 0.0, 5.0, 2.5, 7.5]))
    assert g.row["volume_ok"] is True
    assert g.row["issues"] == []
    assert g.order == ["1.2.1", "1.2.3", "1.2.2", "1.2.4", "1.2.0"]
    assert g.row["slice_spacing_median"] == 2.5
    assert g.row["missing_slices"] == 0
    assert g.row["orientation"] == "axial"
    assert g.row["origin"] == [0.0, 0.0, 0.0]
    assert g.shape == (5, 64, 64)
    assert g.spacing == (0.7, 0.5, 2.5)


def test_missing_slice_and_uneven_spacing():
    g = series_geometry(rows([0.0, 2.5, 5.0, 10.0, 12.5]))
    assert g.row["missing_slices"] == 1
    assert g.row["uneven_spacing"] is True
    assert g.row["slice_spacing_max"] == 5.0
    assert g.row["issues"] == ["missing_slices", "uneven_spacing"]
    assert g.row["volume_ok"] is False


def test_tilted_stack():
    g = series_geometry(rows([0.0, 1.0, 2.0, 3.0], shift_x=0.1))
    assert g.row["tilt_degrees"] == pytest.approx(math.degrees(math.atan(0.1)), rel=1e-9)
    assert g.row["is_tilted"] is True
    assert "tilted" in g.row["issues"]
    assert g.row["volume_ok"] is False


def test_oblique_is_flagged_but_still_a_volume():
    c, s = math.cos(0.3), math.sin(0.3)
    g = series_geometry(rows([0.0, 1.0, 2.0], orientation=[1.0, 0.0, 0.0, 0.0, c, s]))
    # positions along z are not along the tilted normal: also tilted
    assert g.row["orientation"] == "oblique"
    assert g.row["is_oblique"] is True
    assert "oblique" in g.row["issues"]


def test_duplicates_and_mixed_dimensions():
    g = series_geometry(rows([0.0, 1.0, 1.0, 2.0], dims=[(64, 64)] * 3 + [(32, 64)]))
    assert g.row["duplicate_positions"] == 1
    assert g.row["multiple_stacks"] is True
    assert g.row["mixed_dimensions"] is True
    assert "Rows" not in g.row  # no single matrix size
    assert g.row["issues"] == ["mixed_dimensions", "multiple_stacks"]
    assert g.row["volume_ok"] is False


def test_no_geometry():
    r = rows([0.0])
    r[0]["ImagePositionPatient"] = None
    g = series_geometry(r)
    assert g.row["issues"] == ["no_geometry"]
    assert g.row["volume_ok"] is False
    assert g.row["slice_count"] == 0
