# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Radiomics from the lake
#
# A cohort of CT series, their volume geometry and image statistics, the
# radiomics features of their segments (`radiomics_wide`: one row per segment,
# one column per feature), feature distributions, a correlation heatmap and a
# cross-validated model. Run `lake features` first; the lake folder comes from
# `LAKE_DIR` (set by `lake notebook`), else `./lake`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from catalog import cohorts, open_lake
from catalog.spec import check_against, compile_spec, where

cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
cat

# %% [markdown]
# ## The cohort: CT series that form one regular volume

# %%
cohort = cat.df("""
    SELECT s.SeriesInstanceUID, s.BodyPartExamined, s.SeriesDescription,
           g.slice_count, g.slice_spacing_median, g.row_spacing,
           i.p50 AS median_hu, i.noise_sigma
    FROM series s
    JOIN series_geometry g USING (SeriesInstanceUID)
    JOIN image_stats i USING (SeriesInstanceUID)
    WHERE s.Modality = 'CT' AND g.volume_ok
    ORDER BY s.BodyPartExamined, s.SeriesInstanceUID
""")
cohort

# %% [markdown]
# ## Parameter sets
#
# Each `lake features --params FILE` run keeps its features under the hash of
# its parameter file (bin width, resampling, normalization...), beside those
# of other parameter sets. Compare features of one set only: here the set with
# the most feature values (set `PARAM_HASH` to choose another).

# %%
param_sets = cat.df("""
    SELECT param_hash, extractor_version,
           count(DISTINCT (SeriesInstanceUID, mask_source, segment_number)) AS segments,
           count(DISTINCT (feature_class, feature_name)) AS features,
           count(*) AS feature_values
    FROM radiomics_features
    GROUP BY ALL
    ORDER BY feature_values DESC, param_hash
""")
if param_sets.empty:
    raise RuntimeError(
        "this lake has no radiomics features yet: run `lake features` on a lake that holds "
        "segmentations (DICOM SEG or RTSTRUCT), or give label maps with `lake features "
        "--mask-file SERIES_UID=mask.nii.gz` (the `lake demo` archive has no segmentations)")
PARAM_HASH = os.environ.get("PARAM_HASH") or param_sets.param_hash.iloc[0]
param_sets

# %% [markdown]
# ## Features of the cohort's segments

# %%
features = cat.df("""
    SELECT w.*, c.BodyPartExamined, c.Modality
    FROM radiomics_wide w
    JOIN series c USING (SeriesInstanceUID)
    WHERE w.param_hash = $param_hash
      AND w.SeriesInstanceUID IN (
        SELECT SeriesInstanceUID FROM series_geometry WHERE volume_ok)
""", {"param_hash": PARAM_HASH})
assert features.param_hash.nunique() == 1  # one parameter set: comparable values
print(f"{len(features)} segments of {features.SeriesInstanceUID.nunique()} series; "
      f"{features.shape[1] - 9} feature columns")
# the segment label most CT series have (a tie: the highest), for the examples below
ct = features[features.Modality == "CT"]
by_label = (ct if len(ct) else features).groupby("segment_label").SeriesInstanceUID.nunique()
LABEL = max(by_label.index, key=lambda label: (by_label[label], label))
features.groupby("segment_label").size()

# %% [markdown]
# ## Distributions by segment

# %%
shown = ["firstorder_Mean", "firstorder_Entropy", "shape_MeshVolume", "glcm_Contrast"]
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3))
for ax, name in zip(axes, shown, strict=True):
    for label, group in features.groupby("segment_label"):
        ax.hist(group[name].dropna(), bins=10, alpha=0.6, label=f"segment {label}")
    ax.set_title(name)
axes[0].legend()
fig.tight_layout()

# %% [markdown]
# ## Correlation between features

# %%
numeric = [c for c in features.columns if "_" in c and features[c].dtype.kind == "f"
           and c.split("_")[0] in {"firstorder", "shape", "glcm", "glrlm", "glszm", "gldm",
                                   "ngtdm"}]
chosen = [c for c in numeric if features[c].std() > 0][:16]
corr = features[chosen].corr()
fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(corr.values, cmap="coolwarm", vmin=-1, vmax=1)
ax.set_xticks(range(len(chosen)), chosen, rotation=90, fontsize=7)
ax.set_yticks(range(len(chosen)), chosen, fontsize=7)
fig.colorbar(im)
fig.tight_layout()

# %% [markdown]
# ## A cross-validated model on a synthetic label
#
# The label here is the segment itself (`LABEL` against the others: dense tissue
# against soft tissue in the test lakes), so the model should find it; with a
# real outcome table, join it on SeriesInstanceUID instead.

# %%
X = features[chosen].fillna(0).to_numpy()
y = (features.segment_label == LABEL).to_numpy().astype(int)
scores = None
if np.bincount(y, minlength=2).min() < 2:
    print(f"the model needs two segments labelled {LABEL!r} and two others at least")
else:
    folds = min(5, int(np.bincount(y).min()))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    scores = cross_val_score(model, X, y,
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    print(f"{folds}-fold accuracy: {scores.mean():.2f} (+/- {scores.std():.2f})")
scores

# %% [markdown]
# ## A cohort by feature threshold
#
# The same features select series in a declarative cohort spec: here the CT
# series whose segment `LABEL` (the dense one, label 2, in the test lakes) is
# larger than the median, with the parameter set above. `check_against` refuses
# a feature, segment or parameter set the lake does not have (`cohorts.save`
# runs it before pinning a cohort to the snapshot); `cohorts.members` gives the
# matching SeriesInstanceUIDs.

# %%
if ct.empty:
    print("this lake has no CT segment with features: the example needs some")
else:
    # a segment is named by its label (text) or, when it has none, by its number
    segment = LABEL or int(ct.segment_number[ct.segment_label == LABEL].iloc[0])
    dense = ct[ct.segment_label == LABEL] if LABEL else ct[ct.segment_number == segment]
    threshold = float(dense.shape_VoxelVolume.median())
    big_dense = where.modality("CT") & where.feature(
        "shape_VoxelVolume", min=threshold, segment=segment,
        params=features.param_hash.iloc[0])
    check_against(cat, big_dense)
    members = cohorts.members(cat, big_dense)
    assert set(members) == set(dense.SeriesInstanceUID[dense.shape_VoxelVolume >= threshold])
    print(f"{len(members)} of {dense.SeriesInstanceUID.nunique()} series")
    print(compile_spec(big_dense, members=True).sql)

# %%
cat.close()
