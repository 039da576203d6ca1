"""3-D shape features, as defined by IBSI and pyradiomics 3.

The surface is the marching-cubes mesh of the mask padded by one voxel, with
vertices halfway along the edges between voxels in and out of the region.
Diameters are the largest distances between mesh vertices, found over their
convex hull rather than over all pairs. Axis lengths come from the eigenvalues
of the covariance of the voxel centres.
"""

from __future__ import annotations

import contextlib

import numpy as np

NAMES = (
    "MeshVolume", "VoxelVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity",
    "Maximum3DDiameter", "Maximum2DDiameterSlice", "Maximum2DDiameterColumn",
    "Maximum2DDiameterRow", "MajorAxisLength", "MinorAxisLength", "LeastAxisLength",
    "Elongation", "Flatness",
)


def _triangles(field: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lorensen marching cubes at 0.5 in index units: triangle corners a, b, c and their cube."""
    from skimage.measure import marching_cubes

    verts, faces, _, _ = marching_cubes(field, level=0.5, method="lorensen",
                                        allow_degenerate=True)
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    cube = np.floor((a + b + c) / 3.0).astype(np.intp)
    return a, b, c, cube


def mesh(mask: np.ndarray, spacing: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(surface area, enclosed volume, vertices in mm) of the marching-cubes mesh.

    The classic marching-cubes table is symmetric under complement: a cube
    whose corner (+1 slice, +1 row, same column) is inside is triangulated as
    its complement cube, as pyradiomics does. Running scikit-image's Lorensen
    marching cubes on the mask and on its complement, and taking each cube's
    triangles from the matching run, reproduces that mesh. ``spacing`` is in
    array order (slice, row, column).
    """
    padded = np.pad(mask, 1)
    corner = padded[1:, 1:, :-1]  # per cube, indexed by its first corner
    volume = 0.0
    area = 0.0
    vertices = []
    for complement in (False, True):
        field = (~padded if complement else padded).astype(np.float32)
        a, b, c, cube = _triangles(field)
        take = corner[cube[:, 0], cube[:, 1], cube[:, 2]]
        if not complement:
            take = ~take
        a, b, c = a[take] * spacing, b[take] * spacing, c[take] * spacing
        signed = float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum())
        volume += -signed if complement else signed
        area += float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())
        vertices.append(np.concatenate([a, b, c]))
    verts = np.unique(np.concatenate(vertices), axis=0)
    return area, abs(volume) / 6.0, verts


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise distance: over the convex hull's vertices when there are many points."""
    if len(points) < 2:
        return 0.0
    if len(points) > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except (QhullError, ValueError):  # degenerate (coplanar or collinear points)
            centred = points - points.mean(axis=0)
            _, s, vt = np.linalg.svd(centred, full_matrices=False)
            rank = int(np.sum(s > 1e-9 * max(float(s[0]), 1e-300)))
            if rank <= 1:
                d = centred @ vt[0]
                return float(d.max() - d.min())
            if rank < points.shape[1]:
                with contextlib.suppress(QhullError, ValueError):
                    points = points[ConvexHull(centred @ vt[:rank].T).vertices]
    best = 0.0
    for i in range(0, len(points), 2048):  # bounded memory
        diff = points[i:i + 2048, None, :] - points[None, :, :]
        best = max(best, float((diff ** 2).sum(-1).max()))
    return float(np.sqrt(best))


def _diameters(verts: np.ndarray) -> tuple[float, float, float, float]:
    """(slice, column, row, 3-D) maximum diameters between mesh vertices.

    The per-plane diameters are over vertices sharing their slice (z), row (y)
    or column (x) coordinate, as pyradiomics defines them.
    """
    d3 = _max_distance(verts)
    per_axis = []
    for axis in range(3):
        best = 0.0
        keys = np.round(verts[:, axis], 6)
        order = np.argsort(keys, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
            if len(group) > 1:
                best = max(best, _max_distance(np.delete(verts[group], axis, axis=1)))
        per_axis.append(best)
    return per_axis[0], per_axis[1], per_axis[2], d3


def features(mask: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Shape features of a boolean mask; ``spacing`` in array order (slice, row, column)."""
    sp = np.asarray(spacing, dtype=np.float64)
    area, volume, verts = mesh(mask, sp)
    coords = np.argwhere(mask).astype(np.float64) * sp[None, :]
    n = len(coords)
    centred = (coords - coords.mean(axis=0)) / np.sqrt(n)
    eig = np.linalg.eigvals(centred.T @ centred).real
    eig[(eig < 0) & (eig > -1e-10)] = 0
    eig.sort()
    least, minor, major = eig
    d_slice, d_column, d_row, d_3 = _diameters(verts)
    return {
        "MeshVolume": volume,
        "VoxelVolume": float(n * np.prod(sp)),
        "SurfaceArea": area,
        "SurfaceVolumeRatio": area / volume,
        "Sphericity": float((36 * np.pi * volume ** 2) ** (1 / 3) / area),
        "Maximum3DDiameter": d_3,
        "Maximum2DDiameterSlice": d_slice,
        "Maximum2DDiameterColumn": d_column,
        "Maximum2DDiameterRow": d_row,
        "MajorAxisLength": float(4 * np.sqrt(major)),
        "MinorAxisLength": float(4 * np.sqrt(minor)),
        "LeastAxisLength": float(4 * np.sqrt(least)),
        "Elongation": float(np.sqrt(minor / major)) if major else 0.0,
        "Flatness": float(np.sqrt(least / major)) if major else 0.0,
    }
