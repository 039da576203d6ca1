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
# # Public IDC series comparable to a local cohort
#
# The `series_idc` view has exactly the columns and types of the NCI Imaging
# Data Commons series index (`idc_index.parquet`, shipped by the `idc-index-data`
# package), so local and public series can be stacked with `UNION ALL BY NAME`
# and compared with one query. Nothing is downloaded: the index is a local file.

# %%
import os

import matplotlib.pyplot as plt

from catalog import open_lake
from catalog.spec import compile_spec, where

try:
    import idc_index_data
except ImportError as exc:
    raise RuntimeError("this notebook needs the IDC series index: "
                       "pip install idc-index-data") from exc

IDC_INDEX = str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
print("IDC index:", idc_index_data.__version__)

# %% [markdown]
# ## The local cohort: CT and MR series, by modality and body part

# %%
local = where.modality("CT", "MR") & ~where.text("topogram")
c = compile_spec(local)
cohort = cat.df(f"SELECT Modality, BodyPartExamined, count(*) AS series, "
                f"sum(instanceCount) AS instances FROM ({c.sql}) GROUP BY ALL ORDER BY ALL",
                c.params)
cohort

# %% [markdown]
# ## The same modality and body part in IDC, per collection
#
# IDC codes some body parts differently (a chest CT is often `LUNG` or
# `THORAX`), so the match uses a small synonym table.

# %%
synonyms = {"CHEST": ["CHEST", "LUNG", "THORAX"], "HEAD": ["HEAD", "BRAIN"],
            "ABDOMEN": ["ABDOMEN"], "PELVIS": ["PELVIS"], "KNEE": ["KNEE"]}
pairs = [(m, bp, alias) for m, bp in cohort[["Modality", "BodyPartExamined"]].itertuples(
    index=False) for alias in synonyms.get(bp, [bp])]
comparable = cat.df("""
    SELECT p.local_body_part, i.Modality, i.collection_id, count(*) AS series,
           median(i.instanceCount) AS median_instances, any_value(i.license_short_name) AS license
    FROM read_parquet($idc) i
    JOIN (SELECT unnest($mods) AS Modality, unnest($parts) AS local_body_part,
                 unnest($aliases) AS alias) p
      ON i.Modality = p.Modality AND upper(i.BodyPartExamined) = p.alias
    WHERE i.analysis_result_id IS NULL
    GROUP BY p.local_body_part, i.Modality, i.collection_id
    QUALIFY row_number() OVER (PARTITION BY p.local_body_part, i.Modality
                               ORDER BY count(*) DESC) <= 3
    ORDER BY ALL
""", {"idc": IDC_INDEX, "mods": [p[0] for p in pairs], "parts": [p[1] for p in pairs],
      "aliases": [p[2] for p in pairs]})
comparable

# %% [markdown]
# ## Local and public side by side, with one query
#
# `series_idc` stacks onto IDC's index unchanged; `collection_id` is `'local'`
# for the lake's series.

# %%
stacked = cat.df("""
    SELECT collection_id = 'local' AS is_local, Modality, instanceCount, series_size_MB
    FROM (SELECT * FROM series_idc UNION ALL BY NAME SELECT * FROM read_parquet($idc))
    WHERE Modality IN ('CT', 'MR')
""", {"idc": IDC_INDEX})
stacked.groupby(["is_local", "Modality"]).agg(series=("instanceCount", "size"),
                                               median_instances=("instanceCount", "median"))

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
for is_local, group in stacked[stacked.Modality == "CT"].groupby("is_local"):
    ax.hist(group.instanceCount.clip(upper=600), bins=40, density=True, alpha=0.6,
            label="local" if is_local else "IDC")
ax.set_xlabel("instances per CT series (clipped at 600)")
ax.legend()
plt.tight_layout()

# %%
cat.close()
