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
# # The lake at a glance
#
# Opens the lake through the `catalog` API (DuckDB over the latest committed
# snapshot), shows the size of every table, and plots studies per modality and
# year. The lake folder comes from `LAKE_DIR` (set by `lake notebook`), else
# `./lake`.

# %%
import os

import matplotlib.pyplot as plt

from catalog import open_lake

cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
cat

# %% [markdown]
# ## Table sizes

# %%
sizes = cat.df("""
    SELECT 'instances' AS table_name, count(*) AS rows FROM instances
    UNION ALL SELECT 'series', count(*) FROM series
    UNION ALL SELECT 'studies', count(*) FROM studies
    UNION ALL SELECT 'patients', count(*) FROM patients
    UNION ALL SELECT 'quarantine', count(*) FROM quarantine
    UNION ALL SELECT 'conflicts', count(*) FROM conflicts
    UNION ALL SELECT 'ingest_runs', count(*) FROM ingest_runs
""")
sizes

# %% [markdown]
# ## Studies per modality and year

# %%
per_year = cat.df("""
    SELECT study_year, Modality, count(*) AS studies
    FROM studies
    WHERE study_year IS NOT NULL
    GROUP BY ALL
    ORDER BY ALL
""").pivot(index="study_year", columns="Modality", values="studies").fillna(0).astype(int)
per_year

# %%
if per_year.empty:
    print("no studies yet: ingest DICOM files first (`lake ingest FOLDER`), or try `lake demo`")
else:
    ax = per_year.plot.bar(stacked=True, figsize=(9, 4), title="Studies per modality and year")
    ax.set_xlabel("year of study")
    ax.set_ylabel("studies")
    plt.tight_layout()

# %% [markdown]
# ## Files that did not make it in, by reason

# %%
cat.df("SELECT reason, count(*) AS files FROM quarantine GROUP BY 1 ORDER BY 2 DESC")

# %%
cat.close()
