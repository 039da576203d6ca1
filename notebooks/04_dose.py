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
# # CT dose
#
# CTDIvol and DLP per CT study, from the CT Radiation Dose SRs (TID 10011,
# the `dose_events` table) or, for studies without a report, from the image
# headers' CTDIvol (`dose_source = 'header'`, no DLP). The distributions per
# body region are compared with diagnostic reference levels from a CSV: the
# shipped `catalog/drl_default.csv` holds **example values only**; point
# `DRL_FILE` at your national or local levels.

# %%
import os

import matplotlib.pyplot as plt

from catalog import open_lake, reports

cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
drl_file = os.environ.get("DRL_FILE")  # None: the shipped example levels
levels = reports.read_drl(drl_file).to_pandas()
levels

# %% [markdown]
# ## Irradiation events, as reported

# %%
cat.df("""
    SELECT acquisition_type, target_region, phantom_type, count(*) AS events,
           round(median(CTDIvol), 2) AS median_CTDIvol_mGy,
           round(median(DLP), 1) AS median_DLP_mGycm
    FROM dose_events GROUP BY ALL ORDER BY ALL
""")

# %% [markdown]
# ## Per study, and where the numbers come from

# %%
studies = reports.dose_studies(cat, drl=drl_file).to_pandas()
studies[["StudyInstanceUID", "StudyDate", "BodyPartExamined", "StationName", "dose_source",
         "events", "CTDIvol_max", "DLP_total", "drl_CTDIvol", "drl_DLP", "exceeds"]]

# %%
reports.dose_summary(cat, by=["BodyPartExamined", "dose_source"], drl=drl_file).to_pandas()

# %% [markdown]
# ## Distributions per body region against the reference levels

# %%
regions = sorted(studies["BodyPartExamined"].dropna().unique())
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, column, level, unit in ((axes[0], "CTDIvol_max", "CTDIvol_mGy", "mGy"),
                                (axes[1], "DLP_total", "DLP_mGycm", "mGy·cm")):
    data = [studies.loc[studies["BodyPartExamined"] == r, column].dropna() for r in regions]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(regions) + 1), regions)
    for i, region in enumerate(regions, start=1):
        ax.scatter([i] * len(data[i - 1]), data[i - 1], s=12, alpha=0.6)
        drl = levels.loc[levels["body_region"].str.upper() == region.upper(), level]
        if len(drl) and drl.notna().any():
            ax.hlines(drl.max(), i - 0.4, i + 0.4, colors="red", linestyles="--")
    ax.set_title(f"{column} per study ({unit}); red: reference level")
    ax.set_ylabel(unit)
plt.tight_layout()

# %% [markdown]
# ## Studies above a reference level

# %%
reports.dose_exceedances(cat, drl=drl_file).to_pandas()[
    ["StudyInstanceUID", "StudyDate", "BodyPartExamined", "StationName", "dose_source",
     "CTDIvol_max", "drl_CTDIvol", "DLP_total", "drl_DLP", "CTDIvol_ratio", "DLP_ratio"]]

# %%
cat.close()
