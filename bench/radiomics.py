"""Time per (series, segment): the lake's extractor against pyradiomics, same run, same inputs.

A synthetic CT-like volume of 256 x 256 x 100 voxels (0.8 x 0.8 x 2.5 mm) with a
spherical-ish region of about 50,000 voxels; all seven feature classes (first
order, shape, GLCM, GLRLM, GLSZM, GLDM, NGTDM) in two configurations, each with
the same settings for both extractors:

* ``original``: pyradiomics' defaults (bin width 25, the image grid as is);
* ``resampled``: resampled to 1 x 1 x 1 mm with B-spline interpolation
  (``resampledPixelSpacing: [1, 1, 1]``, ``interpolator: sitkBSpline``; the
  region by nearest neighbour, padDistance 5).

Prints, per configuration, the best time per (series, segment) of each over
``--repeat`` runs, their ratio, the largest relative difference over the 107
features and the load average (the machine may be shared: compare ratios).

    .venv/bin/python bench/radiomics.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def volume(seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (100, 256, 256)
    spacing = (2.5, 0.8, 0.8)
    arr = np.round(rng.normal(40, 25, size=shape)).astype(np.float32)
    idx = np.indices(shape, dtype=np.float32)
    centre = (50, 128, 128)
    d = np.sqrt(sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    wobble = 1 + 0.08 * np.sin(idx[2] / 6.0) * np.cos(idx[1] / 7.0)
    mask = d * wobble <= 26.7
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[::-1])
    return img, mask


CONFIGURATIONS = {
    "original": {},
    "resampled": {"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkBSpline"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # this file is named radiomics.py: keep its folder from shadowing the pyradiomics package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from radiomics import featureextractor

    from etl.radiomics import FEATURE_CLASSES, Params, extract

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    img, mask = volume()
    print(f"volume {img.GetSize()}, ROI {int(mask.sum())} voxels, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(img)
    for name, setting in CONFIGURATIONS.items():
        params = Params.from_dict({"version": 1, "setting": {"binWidth": 25, **setting},
                                   "featureClass": dict.fromkeys(FEATURE_CLASSES)})
        ex = featureextractor.RadiomicsFeatureExtractor(**params.pyradiomics_settings())
        ex.disableAllFeatures()
        for cls in params.feature_classes:
            ex.enableFeatureClassByName(cls)
        ours_t, ref_t = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            ref = ex.execute(img, m)
            ref_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours = extract(img, mask, params)
            ours_t.append(time.perf_counter() - t)
        worst = max(abs(ours[(c, n)] - float(ref[f"original_{c}_{n}"]))
                    / max(abs(float(ref[f"original_{c}_{n}"])), 1e-12)
                    for c, names in FEATURE_CLASSES.items() for n in names)
        o, r = min(ours_t), min(ref_t)
        print(f"{name:10s} pyradiomics {r:.3f} s   lake {o:.3f} s per (series, segment)   "
              f"speed-up {r / o:.2f}x   largest relative difference {worst:.2e}   "
              f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
