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
# # Utilization
#
# Exam volumes from the lake through `catalog.reports`: studies, series and
# instances per month and modality, the trend over time, a weekday x hour
# workload heatmap, and volumes per scanner. Every figure comes from one
# committed lake snapshot; `reports.utilization_studies` lists the studies
# behind any number. The lake folder comes from `LAKE_DIR` (set by
# `lake notebook`), else `./lake`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from catalog import open_lake, reports

cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
if cat.df("SELECT count(*) AS n FROM studies").n[0] == 0:
    raise RuntimeError(f"the lake at {cat.lake.location} has no studies yet: ingest DICOM "
                       "files first (`lake ingest FOLDER`), or try `lake demo`")
cat

# %% [markdown]
# ## Volumes per month and modality
#
# `by` takes any column of the `utilization_studies` view: `day`, `week`,
# `month`, `year`, `weekday`, `hour`, `Modality`, `BodyPartExamined`,
# `StationName`, `Manufacturer`, `ManufacturerModelName`,
# `InstitutionalDepartmentName`, ...

# %%
monthly = reports.utilization(cat, by=["month", "Modality"]).to_pandas()
monthly.head(12)

# %%
studies = monthly.pivot_table(index="month", columns="Modality", values="studies",
                              aggfunc="sum", fill_value=0)
ax = studies.plot.area(figsize=(10, 4), title="Studies per month and modality")
ax.set_xlabel("month")
ax.set_ylabel("studies")
plt.tight_layout()

# %% [markdown]
# ## Trend
#
# Studies per quarter with a four-quarter moving average.

# %%
per_month = reports.utilization(cat, by=["month"]).to_pandas()
quarterly = per_month.set_index("month")["studies"]
quarterly.index = quarterly.index.astype("datetime64[ns]")
quarterly = quarterly.resample("QS").sum()
ax = quarterly.plot(marker="o", figsize=(10, 3.5), label="studies per quarter")
quarterly.rolling(4, min_periods=1).mean().plot(ax=ax, label="4-quarter moving average")
ax.set_ylabel("studies")
ax.legend()
plt.tight_layout()

# %% [markdown]
# ## Weekday x hour workload

# %%
workload = reports.workload(cat).to_pandas()
matrix = (workload.pivot_table(index="weekday", columns="hour", values="studies",
                               aggfunc="sum", fill_value=0)
          .reindex(index=range(1, 8), columns=range(24), fill_value=0))
fig, ax = plt.subplots(figsize=(11, 3.5))
image = ax.imshow(matrix.to_numpy(), aspect="auto", cmap="viridis")
ax.set_yticks(np.arange(7), ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])
ax.set_xticks(np.arange(0, 24, 2), [f"{h:02d}" for h in range(0, 24, 2)])
ax.set_xlabel("hour of study start")
ax.set_title("Studies by weekday and hour")
fig.colorbar(image, ax=ax, label="studies")
plt.tight_layout()

# %% [markdown]
# ## By scanner

# %%
scanners = reports.utilization(
    cat, by=["StationName", "Manufacturer", "ManufacturerModelName", "Modality"]).to_pandas()
scanners.sort_values("studies", ascending=False)

# %%
ax = (scanners.groupby("StationName")[["studies"]].sum().sort_values("studies")
      .plot.barh(figsize=(8, 4), legend=False, title="Studies per station"))
ax.set_xlabel("studies")
plt.tight_layout()

# %% [markdown]
# ## Drill-down: the studies of the busiest station

# %%
busiest = scanners.groupby("StationName")["studies"].sum().idxmax()
reports.utilization_studies(
    cat, where=[reports.Filter("StationName", busiest)]).to_pandas()[
    ["StudyInstanceUID", "StudyDate", "StudyTime", "Modality", "BodyPartExamined",
     "series_count", "instance_count"]]

# %%
cat.close()
