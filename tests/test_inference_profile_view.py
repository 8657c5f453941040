"""inference/profile_view.py and its use by prediction, the report and the review page: the profile values a fused
model used, the missing ones, and each value's exact occlusion contribution, worded as decision support."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from federation import tiny_federation

from inference.predict import PREDICTION_NAME, run_predict
from inference.profile_view import METHOD, profile_record, profile_tensor, top_contributors
from inference.report import render_report
from inference.review_pages import render_study
from inference.review_store import FeedbackStore, list_studies
from models.bundle import BundleError, write_bundle
from models.factory import ModelConfig, build_model
from preprocessing.profile import aggregate_statistics, read_schema, read_site_profile
from preprocessing.profile_features import ProfileNormalisation
from preprocessing.transforms import PipelineConfig

SCHEMA = read_schema()
V = len(SCHEMA.names)
PIPELINE = PipelineConfig(input_size=(32, 32, 32), target_spacing_mm=(8.0, 8.0, 8.0))


def _fused_model(fusion: str = "late", seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(name="smallcnn", profile_fusion=fusion, profile_variables=V)
    model = build_model(config).eval()
    with torch.no_grad():  # a risk head that depends visibly on the profile embedding
        for p in model.profile.parameters():
            p.normal_(0.0, 0.5)
    return config, model


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("pv")
    tiny_federation(root / "fed", sites=1, patients_per_site=8, seed=5)
    return root / "fed" / "site-0"


@pytest.fixture(scope="module")
def normalisation(site):
    return ProfileNormalisation.pooled(SCHEMA, [aggregate_statistics(read_site_profile(site))])


@pytest.mark.parametrize("fusion", ["late", "film"])
def test_contributions_are_exact_occlusions_of_each_measured_value(normalisation, site, fusion):
    _, model = _fused_model(fusion)
    image = torch.rand(1, 1, 32, 32, 32)
    table = read_site_profile(site)
    values = table.values[0].copy()
    values[SCHEMA.names.index("crp")] = np.nan  # missing: listed, never given a contribution
    record = profile_record(model, image, values, normalisation=normalisation, schema=SCHEMA, class_index=0)
    entries = {e["name"]: e for e in record["variables"]}
    assert entries["crp"]["missing"] and "risk_contribution" not in entries["crp"] and "crp" in record["missing"]
    with torch.no_grad():
        full = model(image, profile=profile_tensor(normalisation, values)).risk.item()
        for name in ("age", "ldh"):
            occluded = values.copy()
            occluded[SCHEMA.names.index(name)] = np.nan
            without = model(image, profile=profile_tensor(normalisation, occluded)).risk.item()
            assert math.isclose(entries[name]["risk_contribution"], full - without, abs_tol=1e-5)
    assert entries["sex"]["value"] in ("F", "M") and entries["diabetes"]["value"] in ("yes", "no")
    assert record["method"] == METHOD and 1 <= len(record["top_risk"]) <= 3
    assert set(record["top_risk"]) <= {n for n, e in entries.items() if e["used"]}


def test_top_contributors_keep_only_the_large_ones_and_the_schema_must_match(normalisation):
    entries = [{"name": "a", "x": 1.0}, {"name": "b", "x": -0.5}, {"name": "c", "x": 0.05}, {"name": "d"}]
    assert top_contributors(entries, "x") == ["a", "b"]
    assert top_contributors([{"name": "a", "x": 0.0}], "x") == []
    other = ProfileNormalisation(variables=("a",), mean=(0.0,), std=(1.0,), count=(5,))
    _, model = _fused_model()
    with pytest.raises(ValueError, match="not this schema"):
        profile_record(
            model, torch.rand(1, 1, 32, 32, 32), np.zeros(1), normalisation=other, schema=SCHEMA, class_index=0
        )


def test_predict_reads_the_studys_profile_row_and_the_pages_show_it(site, normalisation, tmp_path):
    config, model = _fused_model()
    bundle = write_bundle(
        tmp_path / "bundle",
        model.state_dict(),
        model=config,
        pipeline=PIPELINE,
        provenance={"round_of_weights": 1},
        profile_normalisation=normalisation,
    )
    summary = run_predict(
        bundle, site / "dicom", tmp_path / "out", device="cpu", progress=False, profile_dir=site, dicom_export=False
    )
    table = read_site_profile(site)
    with (site / "labels.csv").open() as fh:
        uids = [row["StudyInstanceUID"] for row in csv.DictReader(fh)]
    assert len(summary.results) == len(uids) and not summary.errors  # Grad-CAM runs with the profile too
    for result in summary.results:
        row = table.values[table.keys.index(result.StudyInstanceUID)]
        entries = {e["name"]: e for e in result.profile["variables"]}
        assert entries["age"]["value"] == pytest.approx(row[0])
        assert [e["name"] for e in result.profile["variables"] if e["missing"]] == [
            n for n, v in zip(SCHEMA.names, row) if np.isnan(v)
        ]
        saved = json.loads((tmp_path / "out" / result.study_key / PREDICTION_NAME).read_text())
        assert saved["profile"]["top_risk"] == result.profile["top_risk"]
    assert {r.StudyInstanceUID for r in summary.results} == set(uids)
    # the pages: values, missing ones, the contributions in words, decision-support wording
    result = summary.results[0]
    page = render_report(result)
    assert 'id="profile"' in page and "Clinical and laboratory profile used by the model" in page
    assert "describes the model, not a cause" in page and "does not replace" in page
    first = result.profile["top_risk"][0]
    assert f'data-variable="{first}"' in page and "the risk score by" in page
    if result.profile["missing"]:
        assert "treated as missing and not estimated" in page
    study = next(s for s in list_studies(tmp_path / "out") if s.key == result.study_key)
    review = render_study(study, FeedbackStore(tmp_path / "fb.sqlite"), "token", "").decode()
    assert 'id="profile"' in review and "values that moved this model" in review
    # prediction.json is site-local; summary.json (shared) carries no profile value
    assert "profile" not in (tmp_path / "out" / "summary.json").read_text()


def test_without_a_profile_export_every_value_is_missing_and_a_bundle_without_normalisation_is_refused(
    site, normalisation, tmp_path
):
    config, model = _fused_model("film")
    bundle = write_bundle(
        tmp_path / "bundle",
        model.state_dict(),
        model=config,
        pipeline=PIPELINE,
        provenance={},
        profile_normalisation=normalisation,
    )
    summary = run_predict(bundle, site / "dicom", tmp_path / "out", device="cpu", progress=False, dicom_export=False)
    result = summary.results[0]
    assert result.profile["missing"] == list(SCHEMA.names) and result.profile["top_risk"] == []
    assert "No clinical or laboratory values were given" in render_report(result)
    with pytest.raises(FileNotFoundError, match="profile-mapping.toml"):
        run_predict(bundle, site / "dicom", tmp_path / "o2", device="cpu", progress=False, profile_dir=tmp_path)
    meta = json.loads((bundle / "model.json").read_text())
    del meta["profile_normalisation"]
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="normalisation is unusable"):
        run_predict(bundle, site / "dicom", tmp_path / "o3", device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs its profile normalisation"):
        write_bundle(tmp_path / "b2", model.state_dict(), model=config, pipeline=PIPELINE, provenance={})


def test_a_model_without_profile_fusion_has_no_profile_section(tmp_path):
    assert (
        render_report({"probabilities": {"covid": 0.7, "normal": 0.3}, "diagnosis": "covid"}).count('id="profile"') == 0
    )
