"""Feature thresholds in cohort specs, on a lake with computed features.

The session's lake, copied, with the radiomics notebook's label maps (one per
regular CT volume: label 1 = soft tissue, -100 < HU < 100; label 2 = dense,
HU > 300) run through the features job with first-order and shape features only
(a few seconds). What a threshold must select follows from those label maps,
read back here with SimpleITK, independently of the lake's SQL.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from catalog import cohorts, open_lake
from catalog import spec as specs
from catalog.errors import SpecError
from catalog.spec import where
from etl.features import FeaturesConfig, compute_features
from etl.radiomics import Params
from lake_cli import main
from lakehouse import Lake
from tests.notebooks.conftest import DENSE, SOFT, threshold_masks

#: the parameter set of the test lake: first order and shape (18 + 14 features)
PARAMS = {"version": 1, "featureClass": {"firstorder": [], "shape": []}}


@pytest.fixture(scope="module")
def features_lake(built_lake, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort-features")
    dest = root / "lake"
    shutil.copytree(built_lake[0], dest, symlinks=True)
    lake = Lake.open(dest)
    masks = threshold_masks(lake, root / "masks")
    summary = compute_features(lake, FeaturesConfig(
        series=tuple(uid for uid, _ in masks), mask_files=tuple(masks),
        params=Params.from_dict(PARAMS), scheduler="synchronous"))
    assert summary.failures == 0 and summary.segments == 2 * len(masks)
    return dest


@pytest.fixture(scope="module")
def fcat(features_lake):
    with open_lake(features_lake) as c:
        yield c


@pytest.fixture(scope="module")
def masks(features_lake) -> dict[str, dict]:
    """{image series: {label: voxels, "mm3": voxel volume}} from the label maps."""
    out = {}
    for path in sorted((features_lake.parent / "masks").glob("*.nrrd")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayViewFromImage(img)
        out[path.name.removesuffix(".nrrd")] = {
            SOFT: int((arr == SOFT).sum()), DENSE: int((arr == DENSE).sum()),
            "mm3": float(np.prod(img.GetSpacing()))}
    return out


def _select(cat, spec) -> list[str]:
    """The members of a spec, by both compilations (which must agree)."""
    rows = cohorts.run(cat, cohorts.Definition.of(spec=spec)).members
    assert cohorts.members(cat, spec) == rows
    return rows


def _series_of_studies(cat, series: list[str]) -> list[str]:
    pairs = cat.arrow("SELECT SeriesInstanceUID, StudyInstanceUID FROM series").to_pylist()
    studies = {p["StudyInstanceUID"] for p in pairs if p["SeriesInstanceUID"] in series}
    return sorted(p["SeriesInstanceUID"] for p in pairs if p["StudyInstanceUID"] in studies)


def test_thresholds_select_the_series_whose_label_maps_pass(fcat, masks):
    with_soft = sorted(u for u, m in masks.items() if m[SOFT])
    with_dense = sorted(u for u, m in masks.items() if m[DENSE])
    assert len(masks) == 12 and len(with_soft) == 12 and len(with_dense) == 12
    # by construction of the masks: soft tissue is within (-100, 100) HU, dense above 300
    assert _select(fcat, where.feature("firstorder_Minimum", min=-100, segment=SOFT)) == with_soft
    assert _select(fcat, where.feature("firstorder_Maximum", max=100, segment="1")) == with_soft
    assert _select(fcat, where.feature("firstorder_Maximum", min=100, segment=SOFT)) == []
    assert _select(fcat, where.feature("Minimum", min=300, feature_class="firstorder",
                                       segment=DENSE)) == with_dense
    assert _select(fcat, where.feature("firstorder_Maximum", max=300, segment=DENSE)) == []
    # without a segment: any segment passes (the dense one is above 300 HU)
    assert _select(fcat, where.feature("firstorder_Maximum", min=300)) == with_dense
    # the dense volume (voxels x voxel volume): between the 6th and 7th smallest
    volume = {u: m[DENSE] * m["mm3"] for u, m in masks.items()}
    ranked = sorted(volume.values())
    assert ranked[5] < ranked[6]
    cut = (ranked[5] + ranked[6]) / 2
    big = sorted(u for u, v in volume.items() if v >= cut)
    assert len(big) == 6
    assert _select(fcat, where.feature("shape_VoxelVolume", min=cut, segment=DENSE)) == big
    assert _select(fcat, where.feature("shape_VoxelVolume", max=cut, segment=DENSE)) == \
        sorted(set(volume) - set(big))


def test_feature_criteria_compose_with_and_or_not_and_study_scope(fcat, masks):
    volume = {u: m[SOFT] * m["mm3"] for u, m in masks.items()}
    ranked = sorted(volume.values())
    cut = (ranked[3] + ranked[4]) / 2
    big = sorted(u for u, v in volume.items() if v >= cut)
    assert len(big) == 8
    large = where.feature("shape_VoxelVolume", min=cut, segment=SOFT)
    ct = sorted(r["SeriesInstanceUID"] for r in fcat.arrow(
        "SELECT SeriesInstanceUID FROM series WHERE Modality = 'CT'").to_pylist())
    assert len(ct) > len(masks)  # CT series without features (scouts, ...) too
    # NOT: every CT series but the large ones, those without features included
    assert _select(fcat, where.modality("CT") & ~large) == sorted(set(ct) - set(big))
    # OR with a criterion on another attribute
    head = sorted(r["SeriesInstanceUID"] for r in fcat.arrow(
        "SELECT SeriesInstanceUID FROM series WHERE BodyPartExamined = 'HEAD'").to_pylist())
    assert _select(fcat, large | where.body_part("head")) == sorted(set(big) | set(head))
    # two features on the same segment
    small_dense = where.feature("shape_VoxelVolume", max=cut, segment=SOFT) & where.feature(
        "firstorder_Minimum", min=-100, segment=SOFT)
    assert _select(fcat, small_dense) == sorted(set(volume) - set(big))
    # study scope: every series of a study with a passing series (the other CTs, scouts...)
    by_study = _select(fcat, where.feature("shape_VoxelVolume", min=cut, segment=SOFT,
                                           scope="study"))
    assert by_study == _series_of_studies(fcat, big)
    assert len(by_study) > len(big)


def test_spec_and_equivalent_sql_give_the_same_rows(fcat):
    wide = fcat.arrow("SELECT * FROM radiomics_wide").to_pylist()

    def median(column: str, segment: int) -> float:
        return float(np.median([r[column] for r in wide if r["segment_number"] == segment]))

    mean1, sphericity2 = median("firstorder_Mean", 1), median("shape_Sphericity", 2)
    entropy1 = median("firstorder_Entropy", 1)
    param = wide[0]["param_hash"]
    cases = [
        ({"feature": {"name": "firstorder_Mean", "segment": 1, "min": mean1}},
         "SELECT SeriesInstanceUID FROM series WHERE SeriesInstanceUID IN (SELECT "
         "SeriesInstanceUID FROM radiomics_wide WHERE segment_number = 1 "
         "AND firstorder_Mean >= ?)", [mean1]),
        ({"all": [{"feature": {"name": "shape_Sphericity", "segment": "2", "max": sphericity2,
                               "params": param}},
                  {"not": {"feature": {"class": "firstorder", "name": "Entropy",
                                       "segment": 1, "min": entropy1}}}]},
         "SELECT SeriesInstanceUID FROM radiomics_wide WHERE segment_label = '2' "
         "AND shape_Sphericity <= ? AND param_hash = ? EXCEPT SELECT SeriesInstanceUID "
         "FROM radiomics_wide WHERE segment_number = 1 AND firstorder_Entropy >= ?",
         [sphericity2, param, entropy1]),
        ({"any": [{"modality": "MR"},
                  {"feature": {"name": "firstorder_Mean", "min": mean1, "max": 1e9,
                               "scope": "study"}}]},
         "SELECT SeriesInstanceUID FROM series WHERE Modality = 'MR' OR StudyInstanceUID IN "
         "(SELECT s.StudyInstanceUID FROM series s JOIN radiomics_wide w USING "
         "(SeriesInstanceUID) WHERE w.firstorder_Mean BETWEEN ? AND 1e9)", [mean1]),
    ]
    for spec, sql, params in cases:
        by_spec = cohorts.run(fcat, cohorts.Definition.of(spec=spec))
        by_sql = sorted(r[0] for r in fcat.con.execute(sql, params).fetchall())
        assert by_spec.members == by_sql
        assert 0 < len(by_sql) < fcat.con.execute("SELECT count(*) FROM series").fetchall()[0][0]
        # the rows are cohort_base's rows of those series
        base = fcat.arrow("SELECT * FROM cohort_base WHERE list_contains(?, SeriesInstanceUID) "
                          "ORDER BY SeriesInstanceUID", [by_sql])
        assert by_spec.rows.equals(base)


@pytest.mark.parametrize("feature, message", [
    ({"name": "wavelet_Mean", "min": 1}, "unknown feature class 'wavelet'"),
    ({"name": "Mean", "min": 1}, "no feature class in 'Mean'; name a feature as CLASS_NAME"),
    ({"name": "wavelet LLH_glcm_Contrast", "min": 1}, "unknown feature class 'wavelet LLH_glcm'"),
    ({"name": "firstorder_Mean; DROP TABLE series", "min": 1}, "is not a feature name"),
    ({"name": "firstorder_Mean"}, "give min, max or both"),
    ({"name": "firstorder_Mean", "min": 5, "max": 1}, "min 5 is greater than max 1"),
    ({"name": "firstorder_Mean", "min": "5"}, "expected min and max numbers"),
    ({"name": "firstorder_Mean", "min": 1, "segment": True}, "segment: expected a segment label"),
    ({"name": "firstorder_Mean", "min": 1, "scope": "patient"}, "scope: expected series or "),
    ({"name": "firstorder_Mean", "min": 1, "params": "no-such-file.yaml"},
     "is neither a parameter hash"),
    ({"name": "firstorder_Mean", "min": 1, "segmnt": 1}, "expected {name: CLASS_NAME"),
])
def test_invalid_feature_criteria_say_what_is_wrong(feature, message):
    with pytest.raises(SpecError, match="cohort spec: spec.feature.*" + message.replace(
            "(", r"\(").replace("{", r"\{")):
        specs.normalize({"feature": feature})


def test_builder_yaml_and_parameter_file_are_one_spec(tmp_path):
    from etl.radiomics import FEATURE_CLASSES

    assert tuple(FEATURE_CLASSES) == specs.FEATURE_CLASSES
    (tmp_path / "specs").mkdir()
    params = tmp_path / "specs" / "liver.yaml"
    params.write_text("version: 1\nsetting: {binWidth: 10}\nfeatureClass: {firstorder: []}\n")
    path = tmp_path / "specs" / "big.yaml"
    path.write_text("all:\n  - modality: CT\n  - feature: {name: shape_MeshVolume, min: 1000, "
                    "segment: Liver, params: liver.yaml, scope: study}\n")
    loaded = specs.load(path)  # the parameter file is read relative to the spec file
    expected = Params.load(params).hash
    assert loaded["all"][1]["feature"] == {"class": "shape", "name": "MeshVolume", "min": 1000,
                                           "segment": "Liver", "params": expected,
                                           "scope": "study"}
    built = where.modality("CT") & where.feature("shape_MeshVolume", min=1000, segment="Liver",
                                                 params=params, scope="study")
    assert specs.normalize(built) == loaded
    assert specs.normalize(yaml.safe_load(path.read_text()), base=path.parent) == loaded
    # on a filtered image, the image type prefixes the class (as in radiomics_features)
    assert specs.normalize(where.feature("log-sigma-1-0-mm-3D_firstorder_Mean", min=0)) == \
        specs.normalize({"feature": {"class": "log-sigma-1-0-mm-3D_firstorder", "name": "Mean",
                                     "min": 0}}) == \
        {"feature": {"class": "log-sigma-1-0-mm-3D_firstorder", "name": "Mean", "min": 0}}
    default = tmp_path / "default.yaml"
    default.write_text(yaml.safe_dump(Params.default().raw))
    assert specs.normalize(where.feature("firstorder_Mean", min=0, params=default))[
        "feature"]["params"] == Params.default().hash
    compiled = specs.compile_spec(loaded)
    assert compiled.params == ["CT", "shape", "MeshVolume", "LIVER", expected, 1000]
    assert "Liver" not in compiled.sql and expected not in compiled.sql  # bound, not formatted


def test_features_the_lake_does_not_have_are_refused_when_saving(fcat, cat, features_lake,
                                                                 tmp_path):
    with pytest.raises(SpecError, match=r"radiomics_features has no rows at lake snapshot \d+; "
                       "run `lake features` first"):
        specs.check_against(cat, where.feature("firstorder_Mean", min=0))
    specs.check_against(cat, where.modality("CT"))  # no feature criterion: nothing to check
    with pytest.raises(SpecError, match="feature firstorder_Meen is not in radiomics_features "
                       r"at lake snapshot \d+; did you mean firstorder_Mean, firstorder_Median, "
                       r"firstorder_Minimum\? the lake has 32 features \(firstorder_10Percentile, "
                       r"firstorder_90Percentile, firstorder_Energy, firstorder_Entropy, ...\); "
                       "`lake features --params FILE` computes others"):
        specs.check_against(fcat, where.modality("CT") | ~where.feature("firstorder_Meen",
                                                                          min=0))
    with pytest.raises(SpecError, match=r"no segment 'Liver' .* segments: 1 \(1\), 2 \(2\)"):
        specs.check_against(fcat, where.feature("firstorder_Mean", min=0, segment="Liver"))
    with pytest.raises(SpecError, match=r"no segment 3 .* segments: 1 \(1\), 2 \(2\)"):
        specs.check_against(fcat, where.feature("firstorder_Mean", min=0, segment=3))
    param = fcat.arrow("SELECT DISTINCT param_hash FROM radiomics_features").column(0)[0]
    with pytest.raises(SpecError, match=f"no values computed with parameters 000000000000.*"
                       f"computed with {str(param)[:12]}"):
        specs.check_against(fcat, where.feature("firstorder_Mean", min=0, params="0" * 64))
    specs.check_against(fcat, where.feature("firstorder_Mean", min=0, segment="1",
                                            params=str(param)))
    dest = tmp_path / "lake"
    shutil.copytree(features_lake, dest, symlinks=True)
    with pytest.raises(SpecError, match="did you mean shape_Sphericity"):
        cohorts.save(dest, "typo", spec=where.feature("shape_Sphercity", min=0))
    with pytest.raises(SpecError, match="feature glcm_Contrast is not in radiomics_features"):
        cohorts.save(dest, "texture", spec=where.feature("glcm_Contrast", min=0))
    assert cohorts.names(dest) == []


def test_cli_saves_a_feature_cohort_and_refuses_an_unknown_feature(features_lake, tmp_path,
                                                                  capsys):
    dest = tmp_path / "lake"
    shutil.copytree(features_lake, dest, symlinks=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    spec = tmp_path / "dense.yaml"
    spec.write_text("all:\n  - modality: CT\n  - feature: {name: firstorder_Minimum, min: 300, "
                    "segment: 2, params: params.yaml}\n")
    assert main(["cohort", "save", "dense", "--spec", str(spec), "--lake", str(dest)]) == 0
    assert capsys.readouterr().out.startswith("saved cohort dense: 12 series rows")
    saved = json.loads((dest / "_lake" / "cohorts" / "dense.json").read_text())
    assert saved["definition"]["spec"]["all"][1]["feature"]["params"] == \
        Params.from_dict(PARAMS).hash
    assert cohorts.open_cohort(dest, "dense").drift().same
    spec.write_text("feature: {name: firstorder_Mena, min: 0}\n")
    assert main(["cohort", "save", "typo", "--spec", str(spec), "--lake", str(dest)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean firstorder_Mean" in err[0]
