"""fl_server/campaign.py: init-from weights, the refusals before a run starts, the champion to compare with, and the
registration of a finished run (the simulation of two campaigns is in tests/test_fl_server_server_app.py)."""

import json

import numpy as np
import pytest
import torch

import models.bundle
from fl_server.campaign import CampaignError, bundle_arrays, finish_campaign, prepare_campaign
from fl_server.config import ServerConfig
from models.bundle import BundleError, write_bundle
from models.factory import ModelConfig, build_model
from models.registry import ModelRegistry
from preprocessing.transforms import PipelineConfig

TINY = {"model-name": "smallcnn", "input-size": "16,16,16", "target-spacing-mm": "16.0,16.0,16.0"}


def tiny_config(tmp_path, **extra):
    return ServerConfig.from_run_config(
        {**TINY, "model-registry": str(tmp_path / "registry"), "run-dir": str(tmp_path / "run"), **extra}
    )


def make_bundle(folder, *, model=None, pipeline=None, seed=0):
    torch.manual_seed(seed)
    model = model or ModelConfig(name="smallcnn")
    pipeline = pipeline or PipelineConfig(target_spacing_mm=(16.0, 16.0, 16.0), input_size=(16, 16, 16))
    sites = {"site-0": {"test-loss": 1.0, "test-n": 7.0}, "site-1": {"test-loss": 1.1, "test-n": 6.0}}
    return write_bundle(
        folder,
        build_model(model).state_dict(),
        model=model,
        pipeline=pipeline,
        provenance={"sites": ["site-0", "site-1"], "metrics": {"sites": sites}, "round_of_weights": 2},
    )


def test_without_a_registry_the_run_starts_from_the_seeded_weights(tmp_path):
    start = prepare_campaign(ServerConfig.from_run_config(TINY))
    assert start.initial is None and start.champion is None and start.champion_pair is None


def test_init_from_gives_the_versions_weights_and_the_champion_to_compare(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    v1 = registry.register(make_bundle(tmp_path / "b1"))
    v2 = registry.register(make_bundle(tmp_path / "b2", seed=1))
    registry.promote(v2)
    start = prepare_campaign(tiny_config(tmp_path, **{"init-from": v1}))
    expected = torch.load(registry.folder(v1) / "model.pt", weights_only=True)
    assert start.parent == v1 and list(start.initial) == list(expected)
    assert all(np.array_equal(start.initial[k], expected[k].numpy()) for k in expected)
    assert start.champion == v2 and start.champion_problem is None
    champion = torch.load(registry.folder(v2) / "model.pt", weights_only=True)
    assert all(np.array_equal(start.champion_arrays[k], champion[k].numpy()) for k in champion)
    # "champion" names the current champion; its weights are then both the start and the comparison
    again = prepare_campaign(tiny_config(tmp_path, **{"init-from": "champion"}))
    assert again.parent == v2 and again.champion_pair[0] == v2


def test_a_mismatched_pipeline_version_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "old")
    meta = json.loads((bundle / "model.json").read_text())
    meta["pipeline"]["pipeline_version"] = "2"
    (bundle / "model.json").write_text(json.dumps(meta))
    registry = ModelRegistry(tmp_path / "registry")
    with monkeypatch.context() as m:  # registered by a fedct whose pipeline was still version 2
        m.setattr(models.bundle, "PIPELINE_VERSION", "2")
        version = registry.register(bundle)
    with pytest.raises(
        CampaignError, match=r"init-from = 'v0001' refused before the run starts: .*pipeline version '2'"
    ):
        prepare_campaign(tiny_config(tmp_path, **{"init-from": version}))


@pytest.mark.parametrize(
    ("bundle_kwargs", "needle"),
    [
        ({"model": ModelConfig(name="smallcnn", norm="instance")}, "differs from the expected"),
        (
            {"pipeline": PipelineConfig(target_spacing_mm=(16.0, 16.0, 16.0), input_size=(32, 32, 16))},
            "trained on preprocessing",
        ),
    ],
)
def test_another_architecture_or_preprocessing_is_refused(tmp_path, bundle_kwargs, needle):
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(make_bundle(tmp_path / "b", **bundle_kwargs))
    with pytest.raises(CampaignError, match=needle):
        prepare_campaign(tiny_config(tmp_path, **{"init-from": version}))
    with pytest.raises(BundleError, match=needle):
        bundle_arrays(registry.folder(version), tiny_config(tmp_path))
    # as the champion it cannot be evaluated by this run: the run goes on and the reason is kept
    registry.promote(version)
    start = prepare_campaign(tiny_config(tmp_path))
    assert start.champion == version and start.champion_pair is None and needle.split()[0] in start.champion_problem


def test_an_unknown_version_is_refused_naming_the_known_ones(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(make_bundle(tmp_path / "b"))
    with pytest.raises(CampaignError, match=r"no version 'v0042' \(registered: v0001\)"):
        prepare_campaign(tiny_config(tmp_path, **{"init-from": "v0042"}))
    with pytest.raises(CampaignError, match="no champion yet"):
        prepare_campaign(tiny_config(tmp_path, **{"init-from": "champion"}))


def test_finish_registers_the_final_bundle_with_lineage_and_the_decision(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    v1 = registry.register(make_bundle(tmp_path / "b1"))
    registry.promote(v1)
    config = tiny_config(tmp_path, **{"init-from": v1, "promotion-metric": "test-loss"})
    start = prepare_campaign(config)
    make_bundle(tmp_path / "run" / "model" / "final", seed=3)  # the run's final bundle (test-loss 1.0 / 1.1)
    evaluation = {
        "champion": v1,
        "round": 2,
        "sites": {"site-0": {"test-loss": 1.2, "test-n": 7.0}, "site-1": {"test-loss": 1.2, "test-n": 6.0}},
    }
    assert finish_campaign(config, start, tmp_path / "run", aggregated_rounds=0) is None
    version = finish_campaign(config, start, tmp_path / "run", aggregated_rounds=2, champion_evaluation=evaluation)
    lineage = registry.stamp(version)["lineage"]
    assert lineage["parent"] == v1 and lineage["champion_comparison"]["sites"]["site-0"]["test-loss"] == 1.2
    decision = registry.events()[-1]
    assert decision["event"] == "decision" and decision["who"] == "fedct server" and decision["decision"]["passed"]
    assert "one federated evaluation" in decision["decision"]["source"]
    assert registry.champion() == v1  # promotion stays the coordinator's act
