"""Image statistics without holding the pixels: exact percentiles, noise, saturation."""

from __future__ import annotations

import numpy as np
import pytest

from etl.imagestats import PERCENTILES, ValueCounts, immerkaer_sigma, stored_value_counts


def test_value_counts_equal_numpy_over_many_instances():
    rng = np.random.default_rng(3)
    parts = [rng.integers(-1024, 3000, size=(32, 32)).astype(np.int16) for _ in range(7)]
    parts.append(np.full((32, 32), 7, dtype=np.int16))
    hist = ValueCounts()
    hist.COMPACT_AT = 500  # compact several times on the way
    for p in parts:
        values, counts = stored_value_counts(p)
        hist.add(values * 0.5 - 3.0, counts)  # a rescale slope and intercept
    every = np.concatenate([p.ravel() * 0.5 - 3.0 for p in parts])
    qs = [*PERCENTILES, 0, 12.5, 100]
    assert hist.percentiles(qs) == pytest.approx(list(np.percentile(every, qs)), abs=1e-9)
    mean, std = hist.mean_std()
    assert mean == pytest.approx(every.mean(), rel=1e-12)
    assert std == pytest.approx(every.std(), rel=1e-12)
    assert hist.n == every.size


def test_stored_value_counts_of_floats_and_wide_integers():
    v, c = stored_value_counts(np.array([[1.5, 1.5], [-2.0, 8.25]]))
    assert v.tolist() == [-2.0, 1.5, 8.25] and c.tolist() == [1, 2, 1]
    v, c = stored_value_counts(np.array([0, 1 << 30, 0], dtype=np.int64))
    assert v.tolist() == [0, 1 << 30] and c.tolist() == [2, 1]


def test_immerkaer_noise_estimate():
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:256, 0:256]
    ramp = 3.0 * x + 2.0 * y + 100
    assert immerkaer_sigma(ramp) == pytest.approx(0.0, abs=1e-9)  # planes carry no noise
    noisy = ramp + rng.normal(0, 12.0, size=ramp.shape)
    assert immerkaer_sigma(noisy) == pytest.approx(12.0, rel=0.03)
    assert immerkaer_sigma(np.zeros((2, 9))) is None
