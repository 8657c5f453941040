"""inference.external: a model's figures on a labelled collection no site trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.external import EXTERNAL_KEYS, auc_interval, external_figures, score_external
from models.factory import ModelConfig, build_model
from preprocessing.pipeline import PipelineConfig
from synthetic.external import write_external_family


def test_external_figures_of_known_probabilities():
    labels = np.array([0, 0, 2, 2, 1, 1, -1])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.6, 0.1, 0.3],
            [0.2, 0.1, 0.7],
            [0.7, 0.1, 0.2],
            [0.1, 0.8, 0.1],
            [0.2, 0.6, 0.2],
            [0.3, 0.3, 0.4],
        ]
    )
    score = external_figures(probs, labels)
    assert score.n == 6 and score.counts == {"covid": 2, "other_pneumonia": 2, "normal": 2}
    assert score.auc_covid_vs_normal == pytest.approx(0.75)  # covid 0.9, 0.6 against normal 0.2, 0.7: 3 of 4 pairs
    assert score.accuracy == pytest.approx(5 / 6)
    assert score.auc_macro is not None and 0.5 < score.auc_macro <= 1.0
    # DeLong by hand: placements of the COVID studies (1, 1/2) and of the normal ones (1, 1/2): variance 1/8
    low, high = score.auc_covid_vs_normal_interval
    assert low == pytest.approx(0.75 - 1.959964 * np.sqrt(0.125)) and high == 1.0
    metrics = score.metrics()
    assert (metrics["external-auc-covid-vs-normal-low"], metrics["external-auc-covid-vs-normal-high"]) == (low, high)
    no_normal = external_figures(probs[:2], labels[:2])
    assert no_normal.auc_covid_vs_normal is None and no_normal.auc_macro is None
    assert (
        no_normal.auc_covid_vs_normal_interval is None
        and no_normal.metrics()["external-auc-covid-vs-normal-low"] is None
    )
    with pytest.raises(ValueError, match="probs"):
        external_figures(probs[:, :2][None], labels)


def test_auc_interval_holds_the_auc_and_narrows_with_more_studies():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 12)
    auc = float(np.mean(positives[:, None] > negatives[None, :]))
    low, high = auc_interval(positives, negatives)
    assert low < auc < high
    low4, high4 = auc_interval(np.tile(positives, 4), np.tile(negatives, 4))  # the same AUC on 4x the studies
    assert low4 < auc < high4
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.15)  # about 1 / sqrt(4) as wide
    assert auc_interval([0.9, 0.8], [0.1, 0.2]) == (1.0, 1.0)  # perfectly separated: no spread of placements
    assert auc_interval([0.5, 0.5], [0.5, 0.5]) == (0.5, 0.5)  # all tied: one half each
    assert auc_interval([0.9], [0.1, 0.2]) is None and auc_interval([0.9, 0.8], []) is None


def test_score_external_ingests_once_and_scores_every_labelled_study(tmp_path):
    write_external_family(tmp_path / "family", studies=3, seed=1, small=True)
    config = ModelConfig(name="smallcnn")
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    pipeline = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(12.0, 12.0, 12.0))
    kwargs = {
        "model": config,
        "pipeline": pipeline,
        "dicom_dir": tmp_path / "family" / "dicom",
        "labels_csv": tmp_path / "family" / "labels.csv",
        "work_dir": tmp_path / "work",
    }
    first = score_external(state, **kwargs)
    manifest = (tmp_path / "work" / "manifest.json").stat().st_mtime_ns
    second = score_external(state, **kwargs)
    assert first == second and (tmp_path / "work" / "manifest.json").stat().st_mtime_ns == manifest  # cache reused
    assert first.n == 3 and first.counts == {"covid": 1, "other_pneumonia": 1, "normal": 1}
    assert set(first.metrics()) == set(EXTERNAL_KEYS) and first.auc_covid_vs_normal in (0.0, 1.0)


def test_score_external_without_labelled_studies_is_refused(tmp_path):
    write_external_family(tmp_path / "family", studies=2, seed=1, small=True)
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,diagnosis,severe,time_days,age,sex\n")
    config = ModelConfig(name="smallcnn")
    with pytest.raises(ValueError, match="no labelled study"):
        score_external(
            build_model(config).state_dict(),
            model=config,
            pipeline=PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(12.0, 12.0, 12.0)),
            dicom_dir=tmp_path / "family" / "dicom",
            labels_csv=tmp_path / "labels.csv",
            work_dir=tmp_path / "work",
        )
