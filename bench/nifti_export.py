"""`lake cohort export --as nifti` against the SimpleITK series read it replaced.

Generates a `bench` archive (CT series of 100-200 slices of 512x512 int16, MR, ...),
ingests it, saves a cohort of its CT and MR series and times, in the same run, with
the page cache warm:

- baseline: what the export did before (SimpleITK/GDCM ``ReadImage`` of the sorted
  files of each series, then ``WriteImage`` of a .nii.gz), every series;
- export: ``catalog.export.export(..., "nifti")`` (checksums checked, pydicom decoding,
  header geometry, manifest), into a fresh folder.

Prints both times, their ratio, the series written and the load average.

    .venv/bin/python bench/nifti_export.py --files 800
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=800, help="archive size (default 800)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from catalog import cohorts, open_lake
    from catalog.export import export
    from etl import IngestConfig, ingest
    from lakehouse import Lake
    from synth import generate_archive

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-nifti-"))
    try:
        src = work / "archive"
        generate_archive(src, seed=1, preset="bench", target_files=args.files)
        lake = Lake.create(work / "lake", profile="identified")
        ingest(lake, src, IngestConfig(scheduler="processes"))
        cohorts.save(lake, "ctmr", sql="SELECT SeriesInstanceUID FROM series WHERE "
                     "Modality IN ('CT', 'MR') AND distinct_orientations = 1 AND "
                     "distinct_dimensions = 1 AND NOT uneven_spacing")
        with open_lake(lake.root, vault=True) as cat:
            rows = cat.con.execute(
                "SELECT i.SeriesInstanceUID, list(f.path ORDER BY i.InstanceNumber), "
                "any_value(i.ImageOrientationPatient) FROM instances i JOIN files f "
                "ON f.SOPInstanceUID = i.SOPInstanceUID AND f.outcome = 'ingested' "
                "WHERE i.SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM series WHERE "
                "Modality IN ('CT', 'MR') AND distinct_orientations = 1 AND "
                "distinct_dimensions = 1 AND NOT uneven_spacing) GROUP BY 1").fetchall()
        files = sum(len(p) for _, p, _ in rows)
        for _, paths, _ in rows:  # warm the page cache for both contenders
            for p in paths:
                Path(p).read_bytes()

        out = work / "baseline"
        out.mkdir()
        t0 = time.perf_counter()
        for uid, paths, _iop in rows:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(paths)
            image = reader.Execute()
            sitk.WriteImage(image, str(out / f"{uid}.nii.gz"), True)
        baseline = time.perf_counter() - t0

        t0 = time.perf_counter()
        summary = export(lake, "ctmr", work / "export", "nifti")
        ours = time.perf_counter() - t0
        voxels = sum(int(np.prod(sitk.ReadImage(str(p)).GetSize()))
                     for p in (work / "export" / "nifti").glob("*.nii.gz"))
        print(f"series {len(rows)}, files {files}, voxels {voxels:,}; written "
              f"{summary.written}, skipped {len(summary.reasons)} {summary.reasons}")
        print(f"baseline (SimpleITK ReadImage + WriteImage): {baseline:.2f} s")
        print(f"export --as nifti:                           {ours:.2f} s")
        print(f"export / baseline: {ours / baseline:.2f}x   load average {os.getloadavg()}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
