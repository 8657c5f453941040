"""bench.explain: the heat-map figures on known maps and masks, the method choice, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.common import BenchOptions
from bench.explain import (
    GOAL_ENERGY_RATIO,
    GOAL_POINTING,
    MAX_SECONDS_FACTOR,
    Method,
    choose,
    deletion_curve,
    deletion_order,
    energy_ratio,
    make_explainer,
    methods_for,
    plan_for,
    pointing_hit,
    run,
)


def _mask() -> np.ndarray:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:4, 2:4, 2:4] = True  # 8 of 1000 voxels
    return mask


def test_pointing_hit_inside_near_and_far():
    mask = _mask()
    heat = np.zeros(mask.shape)
    heat[3, 3, 3] = 1.0
    assert pointing_hit(heat, mask)
    heat = np.zeros(mask.shape)
    heat[5, 3, 3] = 1.0  # two voxels past the lesion's edge (index 3)
    assert not pointing_hit(heat, mask)
    assert pointing_hit(heat, mask, spacing_mm=(5.0, 5.0, 5.0), tolerance_mm=10.0)
    assert not pointing_hit(heat, mask, spacing_mm=(5.0, 5.0, 5.0), tolerance_mm=9.0)
    assert not pointing_hit(np.ones(mask.shape), mask)  # a constant map points nowhere


def test_energy_ratio_of_uniform_focused_and_empty_maps():
    mask = _mask()
    assert energy_ratio(np.ones(mask.shape), mask) == pytest.approx(1.0)  # no better than uniform
    assert energy_ratio(mask.astype(float), mask) == pytest.approx(1000 / 8)  # all energy inside
    half = mask.astype(float) + np.where(mask, 0.0, 8.0 / 992.0)  # half the energy inside
    assert energy_ratio(half, mask) == pytest.approx(0.5 * 1000 / 8)
    assert energy_ratio(-np.ones(mask.shape), mask) is None  # negative values only: nothing points anywhere


@pytest.mark.parametrize(
    ("heat", "mask", "match"),
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5), dtype=bool), "shape"),
        (np.full((4, 4, 4), np.nan), np.ones((4, 4, 4), dtype=bool), "non-finite"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4), dtype=bool), "empty"),
    ],
)
def test_bad_pairs_are_refused_with_the_reason(heat, mask, match):
    with pytest.raises(ValueError, match=match):
        pointing_hit(heat, mask)
    with pytest.raises(ValueError, match=match):
        energy_ratio(heat, mask)


def test_deletion_order_is_hottest_first_and_random_among_ties():
    heat = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
    order = deletion_order(heat, seed=0)
    assert set(order[:2]) == {1, 3} and list(order[2:]) == [2, 0, 4]
    flat = [list(deletion_order(np.zeros(50), seed=s)) for s in (0, 1)]
    assert flat[0] != flat[1] and sorted(flat[0]) == list(range(50))
    with pytest.raises(ValueError, match="non-finite"):
        deletion_order(np.array([0.0, np.inf]))


def test_deletion_curve_drops_faster_for_the_map_that_found_the_signal():
    mask = _mask()
    image = np.where(mask, 1.0, 0.2)[None].astype(np.float32)

    def probability(batch: np.ndarray) -> np.ndarray:  # the "model" is the mean of the lesion voxels
        return batch[:, 0][:, mask].mean(axis=1)

    fractions, relative, auc_true = deletion_curve(probability, image, mask.astype(float), max_fraction=0.1, steps=5)
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(0.1) and relative[0] == 1.0
    assert relative[-1] == 0.0  # the lesion (0.8 % of the volume) is gone after the first step
    _, _, auc_random = deletion_curve(probability, image, np.zeros(mask.shape), max_fraction=0.1, steps=5)
    assert auc_true == pytest.approx(0.1)  # gone at the first step: half of the first of five intervals
    assert auc_random > 0.5  # a random order removes about f of the lesion at fraction f (8 voxels: noisy)
    with pytest.raises(ValueError, match="max_fraction"):
        deletion_curve(probability, image, mask.astype(float), max_fraction=0.0)
    with pytest.raises(ValueError, match="spatial shape"):
        deletion_curve(probability, image, np.zeros((10, 10, 9)))


def _result(kind: str, pointing: float, energy: float, seconds: float, deletion: float = 0.5) -> dict:
    return {
        "kind": kind,
        "layer": "",
        "pointing_hit_rate": pointing,
        "energy_ratio": {"median": energy},
        "deletion_auc": {"median": deletion},
        "seconds_per_study": {"median": seconds},
    }


def test_choose_takes_the_best_pointer_within_the_time_budget():
    results = {
        "Grad-CAM@a": _result("gradcam", 0.5, 2.0, 1.0),
        "Grad-CAM++@a": _result("gradcampp", 0.7, 2.5, 1.2),
        "Occlusion": _result("occlusion", 0.9, 5.0, MAX_SECONDS_FACTOR * 1.0 + 1.0),  # better but too slow
        "random": _result("random", 1.0, 9.0, 0.0),  # the reference is never recommended
    }
    chosen = choose(results)
    assert chosen["method"] == "Grad-CAM++@a" and chosen["kind"] == "gradcampp"
    assert chosen["meets_pointing_goal"] is (0.7 >= GOAL_POINTING)
    assert chosen["meets_energy_goal"] is (2.5 >= GOAL_ENERGY_RATIO)
    tie = {"A": _result("gradcam", 0.5, 3.0, 1.0), "B": _result("gradcam", 0.5, 4.0, 1.0)}
    assert choose(tie)["method"] == "B"  # same hit rate: the higher energy ratio
    assert choose({"random": _result("random", 1.0, 9.0, 0.0)})["method"] is None


def test_methods_cover_monai_explainers_and_a_random_reference():
    methods = methods_for("densenet121", (48, 48, 40), samples=4, occlusion_overlap=0.0)
    kinds = {m.kind for m in methods}
    assert kinds == {"gradcam", "gradcampp", "guidedgradcam", "occlusion", "smoothgrad", "guided", "random"}
    occlusion = next(m for m in methods if m.kind == "occlusion")
    assert occlusion.settings["mask_size"] == (8, 8, 7)
    cam_layers = {m.layer for m in methods if m.kind == "gradcam"}
    assert {m.layer for m in methods if m.kind == "guidedgradcam"} == cam_layers and len(cam_layers) == 4


def test_guided_grad_cam_is_guided_backprop_kept_where_grad_cam_is_hot():
    import torch

    from models.factory import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn")).eval()
    x = torch.rand((1, 1, 32, 32, 32))
    layer = "backbone.features.10"
    cam = make_explainer(Method("cam", "gradcam", layer), model)(x, 1)
    guided = make_explainer(Method("guided", "guided"), model)(x, 1)
    both = make_explainer(Method("both", "guidedgradcam", layer), model)(x, 1)
    assert both.shape == x.shape[2:] and (both >= 0).all() and both.max() > 0
    np.testing.assert_allclose(both, guided * cam, rtol=1e-5, atol=1e-8)
    assert (cam == 0).any() and not both[cam == 0].any()  # nothing outside Grad-CAM's support


def test_plans_grow_with_the_mode(tmp_path):
    tiny, quick, full = (plan_for(BenchOptions(out=tmp_path, **kw)) for kw in ({"tiny": True}, {"quick": True}, {}))
    assert tiny.patients < quick.patients < full.patients
    assert tiny.max_studies < quick.max_studies < full.max_studies


def test_tiny_explain_benchmark_scores_every_method(tmp_path):
    data = json.loads(run(BenchOptions(out=tmp_path, tiny=True)).read_text())
    assert data["studies"]["scored"] >= 1
    for name, result in data["methods"].items():
        assert 0.0 <= result["pointing_hit_rate"] <= 1.0, name
        assert len(result["per_study"]) == data["studies"]["scored"]
        assert all(0.0 <= r["lesion_share"] <= 1.0 for r in result["per_study"])
    assert "random" in data["methods"] and data["recommended"]["method"] != "random"
    assert data["goals"] == {"pointing_hit_rate": GOAL_POINTING, "energy_ratio": GOAL_ENERGY_RATIO}
