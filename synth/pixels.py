"""Simple phantoms: a body ellipse, a few blobs and noise.

One ``Phantom`` per series precomputes what all its slices share (grid, body,
noise bank), so each slice costs a copy, a few masked adds and a cast.
"""

from __future__ import annotations

import numpy as np

_NOISE_BANK = 3


class Phantom:
    """Slices of a 3-D phantom in arbitrary units.

    ``background`` outside the body, ``body`` inside, ``inner`` in two inner
    ellipses (lungs, ventricles...), ``spine`` in a small dense disc, and
    spherical ``blobs`` that appear over a range of slices.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        rows: int,
        cols: int,
        n_slices: int,
        *,
        background: float,
        body: float,
        inner: float | None,
        spine: float | None,
        blob: tuple[float, float],
        noise: float,
    ) -> None:
        self.rows, self.cols, self.n_slices = rows, cols, n_slices
        y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
        #: normalised coordinates, -1..1 down the rows and across the columns
        self.y, self.x = y.astype(np.float32), x.astype(np.float32)
        ax, ay = rng.uniform(0.75, 0.9), rng.uniform(0.55, 0.75)
        base = np.full((rows, cols), background, dtype=np.float32)
        body_mask = (x / ax) ** 2 + (y / ay) ** 2 <= 1
        base[body_mask] = body
        if inner is not None:
            for cx in (-0.38 * ax, 0.38 * ax):
                base[((x - cx) / (0.28 * ax)) ** 2 + ((y + 0.05) / (0.65 * ay)) ** 2 <= 1] = inner
        if spine is not None:
            base[(x / 0.09) ** 2 + ((y - 0.7 * ay) / 0.09) ** 2 <= 1] = spine
        self._base = base
        self._body = body_mask
        self._blobs = [
            (
                rng.uniform(-0.45, 0.45) * ax,  # centre x
                rng.uniform(-0.45, 0.45) * ay,  # centre y
                rng.uniform(0, max(n_slices - 1, 0)),  # centre slice
                rng.uniform(0.06, 0.16),  # radius (normalised)
                rng.uniform(*blob),  # value
            )
            for _ in range(int(rng.integers(2, 5)))
        ]
        self._noise = (
            rng.standard_normal((_NOISE_BANK, rows, cols), dtype=np.float32) * noise
        ).astype(np.float32)
        self._slice_radius = 2.0 / max(n_slices, 1)

    def slice(self, i: int) -> np.ndarray:
        img = self._base + np.roll(self._noise[i % _NOISE_BANK], 7 * i, axis=1)
        for cx, cy, cz, r, value in self._blobs:
            dz = (i - cz) * self._slice_radius * 0.5
            if abs(dz) >= r:
                continue
            rr = (r * r - dz * dz) ** 0.5
            mask = (self.x - cx) ** 2 + (self.y - cy) ** 2 <= rr * rr
            img[mask] = value + self._noise[(i + 1) % _NOISE_BANK][mask]
        return img


def ct_phantom(rng: np.random.Generator, size: int, n: int, body_part: str) -> Phantom:
    """HU values: air -1000, soft tissue 40, lungs -850 (chest), bone 700."""
    return Phantom(
        rng,
        size,
        size,
        n,
        background=-1000.0,
        body=40.0,
        inner=-850.0 if body_part == "CHEST" else (10.0 if body_part == "HEAD" else None),
        spine=700.0,
        blob=(-50.0, 180.0),
        noise=12.0,
    )


def mr_phantom(rng: np.random.Generator, size: int, n: int) -> Phantom:
    return Phantom(
        rng,
        size,
        size,
        n,
        background=5.0,
        body=700.0,
        inner=1400.0,
        spine=None,
        blob=(200.0, 2500.0),
        noise=25.0,
    )


def pet_phantom(rng: np.random.Generator, size: int, n: int) -> Phantom:
    return Phantom(
        rng,
        size,
        size,
        n,
        background=0.0,
        body=300.0,
        inner=150.0,
        spine=None,
        blob=(2000.0, 8000.0),
        noise=40.0,
    )


def xray_image(rng: np.random.Generator, rows: int, cols: int, max_value: int) -> np.ndarray:
    """A projection-like image: bright body, darker inner fields, a gradient."""
    p = Phantom(
        rng,
        rows,
        cols,
        1,
        background=0.1,
        body=0.7,
        inner=0.35,
        spine=0.95,
        blob=(0.5, 0.9),
        noise=0.02,
    )
    img = p.slice(0) + 0.1 * p.y
    return np.clip(img * max_value, 0, max_value)


def to_pixels(img: np.ndarray, dtype: type[np.integer], lo: int, hi: int) -> bytes:
    return np.clip(img, lo, hi).astype(dtype).tobytes()
