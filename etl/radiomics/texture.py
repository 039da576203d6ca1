"""Texture features (GLCM, GLRLM, GLSZM, GLDM, NGTDM), as defined by IBSI and pyradiomics 3.

Every class works on the discretized grey levels of the region (1..Ng, the
same binning as the first-order histogram) in 3-D with distance 1: the 13
directions of a voxel's 26-neighbourhood. Matrices are built with numpy over
shifted arrays (GLCM, GLDM, NGTDM), walks along lines (GLRLM) and
``scipy.ndimage.label`` (GLSZM); direction-dependent classes (GLCM, GLRLM)
compute each feature per direction and average, dropping directions in which
the region has no pair of voxels, as pyradiomics does.
"""

from __future__ import annotations

import numpy as np

EPS = np.spacing(1)

#: The 13 directions of distance 1 in 3-D (one of each +/- pair), array order (z, y, x).
DIRECTIONS: tuple[tuple[int, int, int], ...] = tuple(
    (dz, dy, dx)
    for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    if (dz, dy, dx) > (0, 0, 0)
)

GLCM_NAMES = (
    "Autocorrelation", "JointAverage", "ClusterProminence", "ClusterShade", "ClusterTendency",
    "Contrast", "Correlation", "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance",
    "JointEnergy", "JointEntropy", "Imc1", "Imc2", "Idm", "MCC", "Idmn", "Id", "Idn",
    "InverseVariance", "MaximumProbability", "SumAverage", "SumEntropy", "SumSquares",
)
GLRLM_NAMES = (
    "ShortRunEmphasis", "LongRunEmphasis", "GrayLevelNonUniformity",
    "GrayLevelNonUniformityNormalized", "RunLengthNonUniformity",
    "RunLengthNonUniformityNormalized", "RunPercentage", "GrayLevelVariance", "RunVariance",
    "RunEntropy", "LowGrayLevelRunEmphasis", "HighGrayLevelRunEmphasis",
    "ShortRunLowGrayLevelEmphasis", "ShortRunHighGrayLevelEmphasis",
    "LongRunLowGrayLevelEmphasis", "LongRunHighGrayLevelEmphasis",
)
GLSZM_NAMES = (
    "SmallAreaEmphasis", "LargeAreaEmphasis", "GrayLevelNonUniformity",
    "GrayLevelNonUniformityNormalized", "SizeZoneNonUniformity",
    "SizeZoneNonUniformityNormalized", "ZonePercentage", "GrayLevelVariance", "ZoneVariance",
    "ZoneEntropy", "LowGrayLevelZoneEmphasis", "HighGrayLevelZoneEmphasis",
    "SmallAreaLowGrayLevelEmphasis", "SmallAreaHighGrayLevelEmphasis",
    "LargeAreaLowGrayLevelEmphasis", "LargeAreaHighGrayLevelEmphasis",
)
GLDM_NAMES = (
    "SmallDependenceEmphasis", "LargeDependenceEmphasis", "GrayLevelNonUniformity",
    "DependenceNonUniformity", "DependenceNonUniformityNormalized", "GrayLevelVariance",
    "DependenceVariance", "DependenceEntropy", "LowGrayLevelEmphasis", "HighGrayLevelEmphasis",
    "SmallDependenceLowGrayLevelEmphasis", "SmallDependenceHighGrayLevelEmphasis",
    "LargeDependenceLowGrayLevelEmphasis", "LargeDependenceHighGrayLevelEmphasis",
)
NGTDM_NAMES = ("Coarseness", "Contrast", "Busyness", "Complexity", "Strength")


def _pairs(mask: np.ndarray, d: tuple[int, int, int]) -> tuple[tuple[slice, ...],
                                                                 tuple[slice, ...]]:
    """Slices (a, b) such that arr[b] is the neighbour of arr[a] at offset d."""
    a, b = [], []
    for off, n in zip(d, mask.shape, strict=True):
        if off > 0:
            a.append(slice(0, n - off))
            b.append(slice(off, n))
        elif off < 0:
            a.append(slice(-off, n))
            b.append(slice(0, n + off))
        else:
            a.append(slice(0, n))
            b.append(slice(0, n))
    return tuple(a), tuple(b)


def _neighbour_offsets() -> list[tuple[int, int, int]]:
    return [d for base in DIRECTIONS for d in (base, (-base[0], -base[1], -base[2]))]


# --- GLCM -----------------------------------------------------------------------------

def glcm(q: np.ndarray, mask: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    ng = int(levels.max())
    mats = []
    for d in DIRECTIONS:
        sa, sb = _pairs(mask, d)
        both = mask[sa] & mask[sb]
        i = q[sa][both] - 1
        j = q[sb][both] - 1
        p = np.bincount(i * ng + j, minlength=ng * ng).reshape(ng, ng).astype(np.float64)
        mats.append(p)
    p_all = np.stack(mats, axis=-1)  # (Ng, Ng, Na)
    keep = levels - 1
    p_all = p_all[np.ix_(keep, keep)]
    p_all = p_all + p_all.transpose(1, 0, 2)
    sums = p_all.sum(axis=(0, 1))
    p_all = p_all[:, :, sums > 0]
    p_all = p_all / p_all.sum(axis=(0, 1))[None, None, :]
    return _glcm_features(p_all, levels.astype(np.float64), ng)


def _glcm_features(p: np.ndarray, gl: np.ndarray, ng: int) -> dict[str, float]:
    i = gl[:, None, None]
    j = gl[None, :, None]
    ksum = np.arange(2, 2 * ng + 1, dtype=np.float64)
    kdiff = np.arange(0, ng, dtype=np.float64)
    px = p.sum(axis=1, keepdims=True)  # (Ng, 1, Na)
    py = p.sum(axis=0, keepdims=True)  # (1, Ng, Na)
    ux = (i * p).sum(axis=(0, 1), keepdims=True)
    uy = (j * p).sum(axis=(0, 1), keepdims=True)
    ij_sum = (gl[:, None] + gl[None, :])
    ij_diff = np.abs(gl[:, None] - gl[None, :])
    p_sum = np.stack([p[ij_sum == k].sum(axis=0) for k in ksum])  # (2Ng-1, Na)
    p_diff = np.stack([p[ij_diff == k].sum(axis=0) for k in kdiff])  # (Ng, Na)
    hxy = -(p * np.log2(p + EPS)).sum(axis=(0, 1))
    out: dict[str, np.ndarray] = {}
    out["Autocorrelation"] = (p * (i * j)).sum(axis=(0, 1))
    out["JointAverage"] = ux.reshape(-1)
    cluster = (i + j) - ux - uy
    out["ClusterProminence"] = (p * cluster ** 4).sum(axis=(0, 1))
    out["ClusterShade"] = (p * cluster ** 3).sum(axis=(0, 1))
    out["ClusterTendency"] = (p * cluster ** 2).sum(axis=(0, 1))
    out["Contrast"] = (p * (i - j) ** 2).sum(axis=(0, 1))
    sigx = np.sqrt((p * (i - ux) ** 2).sum(axis=(0, 1)))
    sigy = np.sqrt((p * (j - uy) ** 2).sum(axis=(0, 1)))
    corm = (p * (i - ux) * (j - uy)).sum(axis=(0, 1))
    corr = corm / (sigx * sigy + EPS)
    corr[sigx * sigy == 0] = 1
    out["Correlation"] = corr
    diff_avg = (kdiff[:, None] * p_diff).sum(axis=0)
    out["DifferenceAverage"] = diff_avg
    out["DifferenceEntropy"] = -(p_diff * np.log2(p_diff + EPS)).sum(axis=0)
    out["DifferenceVariance"] = (p_diff * (kdiff[:, None] - diff_avg[None, :]) ** 2).sum(axis=0)
    out["JointEnergy"] = (p ** 2).sum(axis=(0, 1))
    out["JointEntropy"] = hxy
    hx = -(px * np.log2(px + EPS)).sum(axis=(0, 1))
    hy = -(py * np.log2(py + EPS)).sum(axis=(0, 1))
    hxy1 = -(p * np.log2(px * py + EPS)).sum(axis=(0, 1))
    div = np.fmax(hx, hy)
    imc1 = hxy - hxy1
    imc1 = np.where(div != 0, imc1 / np.where(div != 0, div, 1), 0.0)
    out["Imc1"] = imc1
    hxy2 = -((px * py) * np.log2(px * py + EPS)).sum(axis=(0, 1))
    with np.errstate(invalid="ignore"):  # a negative radicand is NaN, as in pyradiomics
        imc2 = (1 - np.e ** (-2 * (hxy2 - hxy))) ** 0.5
    imc2[hxy2 == hxy] = 0
    out["Imc2"] = imc2
    out["Idm"] = (p_diff / (1 + kdiff[:, None] ** 2)).sum(axis=0)
    out["MCC"] = _mcc(p, px, py)
    out["Idmn"] = (p_diff / (1 + kdiff[:, None] ** 2 / ng ** 2)).sum(axis=0)
    out["Id"] = (p_diff / (1 + kdiff[:, None])).sum(axis=0)
    out["Idn"] = (p_diff / (1 + kdiff[:, None] / ng)).sum(axis=0)
    out["InverseVariance"] = (p_diff[1:] / kdiff[1:, None] ** 2).sum(axis=0)
    out["MaximumProbability"] = p.max(axis=(0, 1))
    out["SumAverage"] = (ksum[:, None] * p_sum).sum(axis=0)
    out["SumEntropy"] = -(p_sum * np.log2(p_sum + EPS)).sum(axis=0)
    out["SumSquares"] = (p * (i - ux) ** 2).sum(axis=(0, 1))
    with np.errstate(invalid="ignore"):
        return {k: float(np.nanmean(v)) for k, v in out.items()}


def _mcc(p: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Maximal correlation coefficient: sqrt of the second largest eigenvalue of Q, per angle."""
    ng = p.shape[0]
    if ng < 2:
        return np.ones(p.shape[2])
    px0 = px[:, 0, :]  # (Ng, Na)
    py0 = py[0, :, :]  # (Ng, Na)
    # Q[i, j] = sum_k p[i, k] p[j, k] / (px[i] py[k])
    q = np.einsum("ika,jka->aij", p / (px0[:, None, :] * py0[None, :, :] + EPS), p)
    eig = np.linalg.eigvals(q)
    eig.sort(axis=-1)
    return np.sqrt(eig[:, -2]).real


# --- GLRLM ----------------------------------------------------------------------------

def _runs(qp: np.ndarray, mp: np.ndarray, d: tuple[int, int, int], ng: int,
          nr: int) -> np.ndarray:
    """Run-length counts (Ng, Nr) along direction d.

    ``qp`` and ``mp`` are the grey levels and the region padded by one voxel of
    background, so a step along d never leaves the array before leaving the region.
    """
    _, ny, nx = mp.shape
    off = d[0] * ny * nx + d[1] * nx + d[2]
    mf = mp.ravel()
    qf = qp.ravel()
    idx = np.flatnonzero(mf)
    prev = idx - off
    # a voxel starts a run when its predecessor is outside the region or differs
    starts = idx[~(mf[prev] & (qf[prev] == qf[idx]))]
    gl = qf[starts]
    length = np.ones(len(starts), dtype=np.intp)
    alive = np.arange(len(starts))
    cur = starts
    while alive.size:
        cur = cur + off
        cont = mf[cur] & (qf[cur] == gl[alive])
        alive = alive[cont]
        cur = cur[cont]
        length[alive] += 1
    flat = np.bincount((gl - 1) * nr + (length - 1), minlength=ng * nr)
    return flat.reshape(ng, nr).astype(np.float64)


def _line_has_two(mask: np.ndarray, d: tuple[int, int, int]) -> bool:
    """Does some line along d hold two voxels of the region (adjacent or not)?"""
    for k in range(1, max(mask.shape)):
        dk = (d[0] * k, d[1] * k, d[2] * k)
        if any(abs(o) >= n for o, n in zip(dk, mask.shape, strict=True)):
            return False
        sa, sb = _pairs(mask, dk)
        if np.any(mask[sa] & mask[sb]):
            return True
    return False


def glrlm(q: np.ndarray, mask: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    ng = int(levels.max())
    nr = int(max(mask.shape))
    qp = np.pad(q, 1)
    mp = np.pad(mask, 1)
    mats = [_runs(qp, mp, d, ng, nr) for d in DIRECTIONS if _line_has_two(mask, d)]
    if not mats:  # no line holds two voxels (a single voxel): undefined
        return dict.fromkeys(GLRLM_NAMES, float("nan"))
    p = np.stack(mats, axis=-1)[levels - 1]  # (Ng', Nr, Na)
    n_runs = p.sum(axis=(0, 1))
    p = p[:, :, n_runs > 0]
    n_runs = n_runs[n_runs > 0]
    pr = p.sum(axis=0)  # (Nr, Na)
    pg = p.sum(axis=1)  # (Ng, Na)
    iv = levels.astype(np.float64)
    jv = np.arange(1, p.shape[1] + 1, dtype=np.float64)
    nonempty = pr.sum(axis=1) > 0
    p, pr, jv = p[:, nonempty], pr[nonempty], jv[nonempty]
    i2 = iv[:, None, None] ** 2
    j2 = jv[None, :, None] ** 2
    out: dict[str, np.ndarray] = {
        "ShortRunEmphasis": (pr / jv[:, None] ** 2).sum(axis=0) / n_runs,
        "LongRunEmphasis": (pr * jv[:, None] ** 2).sum(axis=0) / n_runs,
        "GrayLevelNonUniformity": (pg ** 2).sum(axis=0) / n_runs,
        "GrayLevelNonUniformityNormalized": (pg ** 2).sum(axis=0) / n_runs ** 2,
        "RunLengthNonUniformity": (pr ** 2).sum(axis=0) / n_runs,
        "RunLengthNonUniformityNormalized": (pr ** 2).sum(axis=0) / n_runs ** 2,
        "RunPercentage": n_runs / (pr * jv[:, None]).sum(axis=0),
        "GrayLevelVariance": _variance(pg / n_runs, iv),
        "RunVariance": _variance(pr / n_runs, jv),
        "RunEntropy": -((p / n_runs) * np.log2(p / n_runs + EPS)).sum(axis=(0, 1)),
        "LowGrayLevelRunEmphasis": (pg / iv[:, None] ** 2).sum(axis=0) / n_runs,
        "HighGrayLevelRunEmphasis": (pg * iv[:, None] ** 2).sum(axis=0) / n_runs,
        "ShortRunLowGrayLevelEmphasis": (p / (i2 * j2)).sum(axis=(0, 1)) / n_runs,
        "ShortRunHighGrayLevelEmphasis": (p * i2 / j2).sum(axis=(0, 1)) / n_runs,
        "LongRunLowGrayLevelEmphasis": (p * j2 / i2).sum(axis=(0, 1)) / n_runs,
        "LongRunHighGrayLevelEmphasis": (p * j2 * i2).sum(axis=(0, 1)) / n_runs,
    }
    with np.errstate(invalid="ignore"):
        return {k: float(np.nanmean(v)) for k, v in out.items()}


def _variance(p: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Variance of ``values`` under the distribution p (rows: values, columns: angles)."""
    mu = (p * values[:, None]).sum(axis=0, keepdims=True)
    return (p * (values[:, None] - mu) ** 2).sum(axis=0)


# --- GLSZM ----------------------------------------------------------------------------

def glszm(q: np.ndarray, mask: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)
    zones_gl: list[int] = []
    zones_size: list[np.ndarray] = []
    for g in levels:
        labels, n = ndimage.label(mask & (q == g), structure=structure)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            zones_size.append(sizes)
            zones_gl.extend([int(g)] * n)
    size = np.concatenate(zones_size)
    gl = np.array(zones_gl)
    ns = int(size.max())
    p = np.zeros((int(levels.max()), ns), dtype=np.float64)
    np.add.at(p, (gl - 1, size - 1), 1)
    p = p[levels - 1]
    ps = p.sum(axis=0)
    pg = p.sum(axis=1)
    iv = levels.astype(np.float64)
    jv = np.arange(1, ns + 1, dtype=np.float64)
    nz = p.sum()
    n_vox = (ps * jv).sum()
    nonempty = ps > 0
    p, ps, jv = p[:, nonempty], ps[nonempty], jv[nonempty]
    return _zone_like(p, ps, pg, iv, jv, nz, {
        "small": "SmallAreaEmphasis", "large": "LargeAreaEmphasis",
        "gln": "GrayLevelNonUniformity", "glnn": "GrayLevelNonUniformityNormalized",
        "sn": "SizeZoneNonUniformity", "snn": "SizeZoneNonUniformityNormalized",
        "glv": "GrayLevelVariance", "sv": "ZoneVariance", "ent": "ZoneEntropy",
        "lgl": "LowGrayLevelZoneEmphasis", "hgl": "HighGrayLevelZoneEmphasis",
        "slgl": "SmallAreaLowGrayLevelEmphasis", "shgl": "SmallAreaHighGrayLevelEmphasis",
        "llgl": "LargeAreaLowGrayLevelEmphasis", "lhgl": "LargeAreaHighGrayLevelEmphasis",
    }) | {"ZonePercentage": float(nz / n_vox)}


def _zone_like(p, ps, pg, iv, jv, nz, names: dict[str, str]) -> dict[str, float]:
    """Features shared by GLSZM and GLDM: p is (Ng, Ns), ps/pg its marginals, nz its sum."""
    i2 = iv[:, None] ** 2
    j2 = jv[None, :] ** 2
    values = {
        "small": (ps / jv ** 2).sum() / nz,
        "large": (ps * jv ** 2).sum() / nz,
        "gln": (pg ** 2).sum() / nz,
        "glnn": (pg ** 2).sum() / nz ** 2,
        "sn": (ps ** 2).sum() / nz,
        "snn": (ps ** 2).sum() / nz ** 2,
        "glv": float(_variance((pg / nz)[:, None], iv)[0]),
        "sv": float(_variance((ps / nz)[:, None], jv)[0]),
        "ent": -((p / nz) * np.log2(p / nz + EPS)).sum(),
        "lgl": (pg / iv ** 2).sum() / nz,
        "hgl": (pg * iv ** 2).sum() / nz,
        "slgl": (p / (i2 * j2)).sum() / nz,
        "shgl": (p * i2 / j2).sum() / nz,
        "llgl": (p * j2 / i2).sum() / nz,
        "lhgl": (p * i2 * j2).sum() / nz,
    }
    return {name: float(values[key]) for key, name in names.items()}


# --- GLDM -----------------------------------------------------------------------------

def gldm(q: np.ndarray, mask: np.ndarray, levels: np.ndarray, alpha: int = 0
         ) -> dict[str, float]:
    dep = np.zeros(mask.shape, dtype=np.intp)
    for d in _neighbour_offsets():
        sa, sb = _pairs(mask, d)
        ok = mask[sa] & mask[sb] & (np.abs(q[sa] - q[sb]) <= alpha)
        dep[sa] += ok
    gl = q[mask]
    dv = dep[mask]
    nd = 2 * len(DIRECTIONS) + 1
    p = np.zeros((int(levels.max()), nd), dtype=np.float64)
    np.add.at(p, (gl - 1, dv), 1)
    p = p[levels - 1]
    jv = np.arange(1, nd + 1, dtype=np.float64)
    pd = p.sum(axis=0)
    pg = p.sum(axis=1)
    nonempty = pd > 0
    p, pd, jv = p[:, nonempty], pd[nonempty], jv[nonempty]
    nz = pd.sum()
    return _zone_like(p, pd, pg, levels.astype(np.float64), jv, nz, {
        "small": "SmallDependenceEmphasis", "large": "LargeDependenceEmphasis",
        "gln": "GrayLevelNonUniformity", "sn": "DependenceNonUniformity",
        "snn": "DependenceNonUniformityNormalized", "glv": "GrayLevelVariance",
        "sv": "DependenceVariance", "ent": "DependenceEntropy",
        "lgl": "LowGrayLevelEmphasis", "hgl": "HighGrayLevelEmphasis",
        "slgl": "SmallDependenceLowGrayLevelEmphasis",
        "shgl": "SmallDependenceHighGrayLevelEmphasis",
        "llgl": "LargeDependenceLowGrayLevelEmphasis",
        "lhgl": "LargeDependenceHighGrayLevelEmphasis",
    })


# --- NGTDM ----------------------------------------------------------------------------

def ngtdm(q: np.ndarray, mask: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    total = np.zeros(mask.shape, dtype=np.float64)
    count = np.zeros(mask.shape, dtype=np.float64)
    qf = q.astype(np.float64)
    for d in _neighbour_offsets():
        sa, sb = _pairs(mask, d)
        ok = mask[sa] & mask[sb]
        total[sa] += np.where(ok, qf[sb], 0.0)
        count[sa] += ok
    sel = mask
    c = count[sel]
    diff = np.where(c > 0, np.abs(qf[sel] - total[sel] / np.where(c > 0, c, 1)), 0.0)
    ng = int(levels.max())
    gl = q[sel] - 1
    n_i = np.bincount(gl, minlength=ng).astype(np.float64)
    s_i = np.bincount(gl, weights=diff, minlength=ng)
    present = n_i > 0
    n_i, s_i = n_i[present], s_i[present]
    iv = np.arange(1, ng + 1, dtype=np.float64)[present]
    nvp = n_i.sum()
    p_i = n_i / nvp
    ngp = len(n_i)
    sum_coarse = float((p_i * s_i).sum())
    coarseness = 1 / sum_coarse if sum_coarse != 0 else 1e6
    div = ngp * (ngp - 1)
    contrast = ((p_i[:, None] * p_i[None, :] * (iv[:, None] - iv[None, :]) ** 2).sum()
                * s_i.sum() / nvp)
    contrast = contrast / div if div != 0 else 0.0
    i_pi = iv * p_i
    absdiff = np.abs(i_pi[:, None] - i_pi[None, :]).sum()
    busyness = (p_i * s_i).sum() / absdiff if absdiff != 0 else 0.0
    pi_si = p_i * s_i
    numerator = pi_si[:, None] + pi_si[None, :]
    divisor = p_i[:, None] + p_i[None, :]
    complexity = (np.abs(iv[:, None] - iv[None, :]) * numerator / divisor).sum() / nvp
    sum_s = s_i.sum()
    strength = ((p_i[:, None] + p_i[None, :]) * (iv[:, None] - iv[None, :]) ** 2).sum()
    strength = strength / sum_s if sum_s != 0 else 0.0
    return {"Coarseness": float(coarseness), "Contrast": float(contrast),
            "Busyness": float(busyness), "Complexity": float(complexity),
            "Strength": float(strength)}
