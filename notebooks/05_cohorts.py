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
# # Reproducible cohorts
#
# Build a cohort with the declarative builder (the same spec can live in a YAML
# file for `lake cohort save NAME --spec FILE`), save it pinned to the lake
# snapshot, reopen it, and export it as a manifest and as NIfTI volumes. The
# lake folder comes from `LAKE_DIR` (set by `lake notebook`), else `./lake`.

# %%
import json
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import SimpleITK as sitk

from catalog import cohorts, open_lake
from catalog.export import export
from catalog.spec import compile_spec, where

LAKE = os.environ.get("LAKE_DIR", "lake")
cat = open_lake(LAKE)
if cat.df("SELECT count(*) AS n FROM studies").n[0] == 0:
    raise RuntimeError(f"the lake at {cat.lake.location} has no studies yet: ingest DICOM "
                       "files first (`lake ingest FOLDER`), or try `lake demo`")
cat

# %% [markdown]
# ## Define
#
# Adult CT series of the chest or abdomen, thin or standard slices, without the
# scout (topogram) images. `&`, `|` and `~` are AND, OR and NOT.

# %%
chest_ct = (where.modality("CT") & (where.body_part("CHEST") | where.body_part("ABDOMEN"))
            & where.slice_thickness(max=5.0) & ~where.text("topogram"))
compiled = compile_spec(chest_ct)
print(compiled.sql)
print(compiled.params)

# %%
cohort_rows = cat.df(compiled.sql, compiled.params)
cohort_rows[["PatientID", "StudyDate", "BodyPartExamined", "SeriesDescription",
             "instanceCount", "slice_thickness_max"]]

# %% [markdown]
# When only the members (SeriesInstanceUIDs) are needed, `members=True`
# compiles the same spec to a cheaper query on `series` alone;
# `cohorts.members` runs it.

# %%
members = cohorts.members(cat, chest_ct)
assert members == sorted(cohort_rows.SeriesInstanceUID)
print(compile_spec(chest_ct, members=True).sql)
len(members)

# %% [markdown]
# A longitudinal question uses `followed_by`: patients with an imaging study and
# a study of the same kind 1 to 400 days later. `patient_timeline` shows every
# study of a patient with the interval since the previous one.

# %%
imaging = where.modality("CT", "MR", "CR", "DX", "US", "MG")
follow_up = imaging.followed_by(imaging, within_days=(1, 400))
c = compile_spec(follow_up)
cat.df(c.sql, c.params)[["PatientID", "Modality", "BodyPartExamined", "StudyDate"]]

# %%
cat.df("""
    SELECT PatientID, study_index, StudyDate, Modality, BodyPartExamined,
           days_since_previous, same_modality_body_part_days
    FROM patient_timeline
    WHERE PatientID IN (SELECT PatientID FROM patient_timeline WHERE study_index > 1)
    ORDER BY PatientID, study_index
""").head(12)

# %% [markdown]
# ## Save, pinned to the snapshot
#
# Saving records the definition, the lake snapshot and a hash of the result in
# `_lake/cohorts/NAME.json`. Reopening after more ingests runs the definition
# at the saved snapshot and checks the hash; `drift()` says what the latest
# snapshot would add or remove.

# %%
saved = cohorts.save(LAKE, "notebook_chest_ct", spec=chest_ct, replace=True,
                     description="adult chest/abdomen CT, <= 5 mm, no scouts")
print(json.dumps(saved.to_dict(), indent=1)[:600])

# %%
cohort = cohorts.open_cohort(LAKE, "notebook_chest_ct")
assert cohort.rows().num_rows == saved.row_count
cohort, cohort.drift()

# %% [markdown]
# ## Export
#
# A manifest (Parquet and CSV with checksums) and NIfTI volumes with a JSON
# sidecar; `lake cohort export NAME --to DIR --as manifest|dicom|nifti` does the
# same from the shell, with a progress bar, and resumes an interrupted export.

# %%
out = Path(tempfile.mkdtemp(prefix="cohort-export-"))
summary = export(LAKE, "notebook_chest_ct", out, "nifti")
summary.to_dict()

# %% [markdown]
# Every series of the cohort has a row in `manifest/nifti`: written, or skipped
# with a reason code (a series that is not one volume, an image without a place
# in the patient...).

# %%
pd.read_parquet(out / "manifest" / "nifti.parquet")[
    ["SeriesInstanceUID", "status", "reason", "message", "size"]]

# %%
pd.read_parquet(out / "manifest" / "instances.parquet").head()

# %%
first = sorted((out / "nifti").glob("*.nii.gz"))[0]
volume = sitk.ReadImage(str(first))
print(first.name, volume.GetSize(), volume.GetSpacing())
array = sitk.GetArrayFromImage(volume)
plt.imshow(array[array.shape[0] // 2], cmap="gray")
plt.title("middle slice of the first exported volume")
plt.axis("off")

# %% [markdown]
# The notebook cleans up after itself: the cohort it saved and the export it wrote (a
# temporary folder here; `lake cohort export` writes where you tell it to).

# %%
cohorts.delete(LAKE, "notebook_chest_ct")
shutil.rmtree(out)
cat.close()
