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
# # Repeat imaging
#
# A study is a *repeat* when the same patient has an earlier study with the
# same Modality and BodyPartExamined at most 30 days before it (DESIGN.md);
# the window, the matching keys and the exclusions are parameters of
# `reports.RepeatDefinition`. Rates carry Wilson 95% confidence intervals, and
# every rate drills down to the study pairs behind it. Works the same on
# research lakes: per-patient date shifts keep the intervals exact.

# %%
import os

import matplotlib.pyplot as plt
import pandas as pd

from catalog import open_lake, reports

cat = open_lake(os.environ.get("LAKE_DIR", "lake"))
definition = reports.RepeatDefinition(window_days=30, match=("Modality", "BodyPartExamined"))
definition

# %% [markdown]
# ## Repeat rates by modality, with 95% intervals

# %%
rates = reports.repeat_rates(cat, by=["Modality"], definition=definition).to_pandas()
rates

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
err = [rates["repeat_rate"] - rates["ci_low"], rates["ci_high"] - rates["repeat_rate"]]
ax.errorbar(rates["Modality"], rates["repeat_rate"] * 100, yerr=[e * 100 for e in err],
            fmt="o", capsize=4)
ax.set_ylabel("repeat rate, % (Wilson 95% CI)")
ax.set_title(f"Repeat exams within {definition.window_days} days")
plt.tight_layout()

# %% [markdown]
# ## Monthly control chart
#
# A p-chart of the monthly repeat rate over all modalities: the centre line is
# the overall rate, the control limits are p ± 3·sqrt(p(1-p)/n) for each
# month's n studies.

# %%
monthly = reports.repeat_rates(cat, by=["month"], definition=definition).to_pandas()
monthly["month"] = pd.to_datetime(monthly["month"])
p = monthly["repeats"].sum() / monthly["studies"].sum()
sigma = (p * (1 - p) / monthly["studies"]) ** 0.5
monthly["ucl"] = (p + 3 * sigma).clip(upper=1)
monthly["lcl"] = (p - 3 * sigma).clip(lower=0)
monthly["signal"] = (monthly["repeat_rate"] > monthly["ucl"]) | (
    monthly["repeat_rate"] < monthly["lcl"])
fig, ax = plt.subplots(figsize=(10, 3.5))
ax.plot(monthly["month"], monthly["repeat_rate"] * 100, marker="o", label="repeat rate")
ax.step(monthly["month"], monthly["ucl"] * 100, where="mid", color="red", linestyle="--",
        label="control limits")
ax.step(monthly["month"], monthly["lcl"] * 100, where="mid", color="red", linestyle="--")
ax.axhline(p * 100, color="grey", label="centre line")
ax.scatter(monthly.loc[monthly["signal"], "month"],
           monthly.loc[monthly["signal"], "repeat_rate"] * 100, color="red", zorder=3)
ax.set_ylabel("% of studies")
ax.set_title("Monthly repeat rate (p-chart)")
ax.legend()
plt.tight_layout()

# %% [markdown]
# ## How the window changes the picture
#
# Repeats per window length: the generated archive has deliberate repeats after
# 0, 30 and 31 days, so 30 and 31 days differ by one pair.

# %%
pd.DataFrame([
    {"window_days": w,
     "repeats": int(reports.repeat_rates(
         cat, by=["Modality"],
         definition=reports.RepeatDefinition(window_days=w)).to_pandas()["repeats"].sum())}
    for w in (0, 7, 30, 31, 90)
])

# %% [markdown]
# ## Drill-down: the study pairs behind the rates

# %%
pairs = reports.repeat_pairs(cat, definition=definition).to_pandas()
pairs[["StudyInstanceUID", "prior_study_uid", "PatientID", "StudyDate", "prior_study_date",
       "days_since_prior", "Modality", "BodyPartExamined", "StationName"]]

# %%
cat.close()
