"""First-order (intensity histogram) features, as defined by IBSI and pyradiomics 3.

Pure numpy over the voxel values of the region. The discretized histogram
(Entropy, Uniformity) uses pyradiomics' binning: fixed-width bins whose edges
are multiples of the width, or ``numpy.histogram`` edges for a fixed count.
"""

from __future__ import annotations

import numpy as np

NAMES = (
    "Energy", "TotalEnergy", "Entropy", "Minimum", "10Percentile", "90Percentile", "Maximum",
    "Mean", "Median", "InterquartileRange", "Range", "MeanAbsoluteDeviation",
    "RobustMeanAbsoluteDeviation", "RootMeanSquared", "Skewness", "Kurtosis", "Variance",
    "Uniformity",
)


#: the most bins a fixed bin width may make of a region's values (80 MB of edges)
MAX_BINS = 10_000_000


def bin_edges(values: np.ndarray, bin_width: float = 25.0,
              bin_count: int | None = None) -> np.ndarray:
    if bin_count is not None:
        edges = np.histogram(values, bin_count)[1]
        edges[-1] += 1  # the maximum falls in the top bin with numpy.digitize
        return edges
    lo, hi = float(values.min()), float(values.max())
    low = lo - (lo % bin_width)
    bins = (hi - low) / bin_width + 2
    if bins > MAX_BINS:  # the edges are an array: 10^37 of them do not fit anywhere
        raise ValueError(f"the region's values span {lo:.4g} to {hi:.4g}: {bins:.3g} bins of "
                         f"width {bin_width:g}, more than {MAX_BINS:,} (set binCount, or a "
                         "wider binWidth, for such images)")
    edges = np.arange(low, hi + 2 * bin_width, bin_width)
    if len(edges) == 1:  # a flat region: one bin
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def discretize(values: np.ndarray, bin_width: float = 25.0,
               bin_count: int | None = None) -> np.ndarray:
    return np.digitize(values, bin_edges(values, bin_width, bin_count))


def features(values: np.ndarray, voxel_volume: float, *, bin_width: float = 25.0,
             bin_count: int | None = None, shift: float = 0.0) -> dict[str, float]:
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    _, counts = np.unique(discretize(x, bin_width, bin_count), return_counts=True)
    p = counts / n
    eps = np.spacing(1)
    energy = float(np.sum((x + shift) ** 2))
    mean = float(x.mean())
    dev = x - mean
    m2 = float(np.mean(dev ** 2))
    m3 = float(np.mean(dev ** 3))
    m4 = float(np.mean(dev ** 4))
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    inner = x[(x >= p10) & (x <= p90)]
    return {
        "Energy": energy,
        "TotalEnergy": energy * voxel_volume,
        "Entropy": float(-np.sum(p * np.log2(p + eps))),
        "Minimum": float(x.min()),
        "10Percentile": float(p10),
        "90Percentile": float(p90),
        "Maximum": float(x.max()),
        "Mean": mean,
        "Median": float(p50),
        "InterquartileRange": float(p75 - p25),
        "Range": float(x.max() - x.min()),
        "MeanAbsoluteDeviation": float(np.mean(np.abs(dev))),
        "RobustMeanAbsoluteDeviation": float(np.mean(np.abs(inner - inner.mean()))),
        "RootMeanSquared": float(np.sqrt(energy / n)),
        "Skewness": m3 / m2 ** 1.5 if m2 else 0.0,
        "Kurtosis": m4 / m2 ** 2 if m2 else 0.0,
        "Variance": float(np.std(x) ** 2),
        "Uniformity": float(np.sum(p ** 2)),
    }
