"""What a site sends for the out-of-distribution reference (fl_client.ood_stats), on a real tiny DICOM site: the
pooled image features of its training and validation studies, only aggregates above the privacy floor (nothing
below it), log-distance sums only from k studies, and refused requests."""

import numpy as np
import pytest
import torch

from fedct.protocol import OOD_COUNT, OOD_MEAN, OOD_SUM, OOD_SUMSQ, OOD_TRAIN_LOG, OOD_VAL_LOG, OOD_VAR
from fl_client.config import SiteConfig
from fl_client.ood_stats import BadOodRequest, distance_metrics, floor_distances, moments_metrics, site_features
from fl_server.config import ServerConfig
from models.factory import build_model
from models.ood import feature_distance, feature_moments, pooled_moments
from preprocessing.labels import DIAGNOSES
from synthetic.dicom_writer import PatientIdentity, write_ct_series


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A site of 12 studies (6 training, 3 validation, 3 test) and the seeded initial smallcnn weights."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rows = ["StudyInstanceUID,diagnosis,severe,time_days,age,sex"]
    for i in range(12):
        label = i % 3
        uid = f"1.2.826.0.1.3680043.10.997.{i}"
        hu = rng.normal(-700 + 300 * label, 50, size=(10, 24, 24)).astype(np.float32)
        write_ct_series(
            root / "dicom" / f"s{i}",
            hu,
            pixel_spacing_mm=(8.0, 8.0),
            slice_spacing_mm=8.0,
            study_instance_uid=uid,
            series_instance_uid=uid + ".1",
            patient=PatientIdentity(f"TEST^P{i}", f"PID{i}", "19500101", "F", "070Y"),
        )
        rows.append(f"{uid},{DIAGNOSES[label]},0,{5 + i},{50 + i},F")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    site = SiteConfig(
        site_name="site-t",
        dicom_dir=root / "dicom",
        site_dir=root / "work",
        labels_csv=root / "labels.csv",
        device="cpu",
        workers=1,
    )
    settings = ServerConfig(model_name="smallcnn", input_size="16,16,16", target_spacing_mm="8,8,8").round_settings(1)
    torch.manual_seed(0)
    return site, settings, build_model(settings.model).state_dict()


def test_features_are_the_backbones_pooled_output_per_split(tiny_site):
    site, settings, state = tiny_site
    features = site_features(site, settings, state)
    assert features["train"].shape == (6, 64) and features["val"].shape == (3, 64)
    assert np.isfinite(features["train"]).all()


def test_moments_are_aggregates_above_the_floor_and_nothing_below(tiny_site):
    site, settings, state = tiny_site
    sent = moments_metrics(site, settings, state, min_count=5)
    assert set(sent) == {OOD_COUNT, OOD_SUM, OOD_SUMSQ} and sent[OOD_COUNT] == 9
    assert len(sent[OOD_SUM]) == len(sent[OOD_SUMSQ]) == 64
    features = site_features(site, settings, state)
    everything = np.concatenate([features["train"], features["val"]])
    np.testing.assert_allclose(sent[OOD_SUM], everything.astype(np.float64).sum(0), rtol=1e-6)
    # 9 training + validation studies under a floor of 10: only the count 0 leaves the site
    assert moments_metrics(site, settings, state, min_count=10) == {OOD_COUNT: 0}


def test_distance_moments_are_sums_above_the_floor_or_empty(tiny_site):
    site, settings, state = tiny_site
    features = site_features(site, settings, state)
    _, mean, var = pooled_moments([feature_moments(np.concatenate(list(features.values())))])
    sent = distance_metrics(site, settings, state, {OOD_MEAN: mean.tolist(), OOD_VAR: var.tolist()}, min_count=5)
    assert set(sent) == {OOD_VAL_LOG, OOD_TRAIN_LOG}
    assert sent[OOD_VAL_LOG] == []  # 3 validation studies: below k = 5, nothing
    logs = np.log10(feature_distance(features["train"], mean, var))
    np.testing.assert_allclose(sent[OOD_TRAIN_LOG], [6, logs.sum(), (logs * logs).sum()])
    with pytest.raises(BadOodRequest, match="features"):
        floor_distances(features, mean[:10], var[:10])
    for bad in ({}, {OOD_MEAN: [0.0], OOD_VAR: [-1.0]}, {OOD_MEAN: ["x"], OOD_VAR: [1.0]}, {OOD_MEAN: [], OOD_VAR: []}):
        with pytest.raises(BadOodRequest):
            distance_metrics(site, settings, state, bad)
