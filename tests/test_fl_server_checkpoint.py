import json

import pytest
import torch

from fl_server.checkpoint import bundle_pipeline, load_bundle, save_state, write_bundle
from models.factory import ModelConfig, build_model
from preprocessing.transforms import PipelineConfig


def test_bundle_round_trip_rebuilds_the_same_network(tmp_path):
    cfg = ModelConfig(name="smallcnn")
    model = build_model(cfg)
    pipeline = PipelineConfig(input_size=(32, 32, 16))
    write_bundle(tmp_path / "b", model.state_dict(), model=cfg, pipeline=pipeline, provenance={"round_of_weights": 3, "sites": ["site-0"]})
    loaded, meta = load_bundle(tmp_path / "b")
    x = torch.randn(1, 1, 32, 32, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x).logits, loaded(x).logits) and torch.equal(model(x).risk, loaded(x).risk)
    assert meta["class_names"] == ["covid", "other_pneumonia", "normal"]
    assert meta["provenance"]["round_of_weights"] == 3
    assert bundle_pipeline(meta) == pipeline
    assert meta["pipeline"]["pipeline_version"]
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "Not for clinical use without local validation" in card and "site-0" in card


def test_model_card_lists_site_metrics_and_nan_becomes_null(tmp_path):
    cfg = ModelConfig(name="smallcnn")
    metrics = {"aggregate": {"test-auc-macro": 0.9, "test-n": 10.0}, "training_studies": {"site-a": 20.0},
               "sites": {"site-a": {"test-auc-macro": 0.9, "test-n": 10.0, "test-c-index": float("nan")}}}  # fmt: skip
    write_bundle(tmp_path, build_model(cfg).state_dict(), model=cfg, pipeline=PipelineConfig(),
                 provenance={"sites": ["site-a"], "metrics": metrics})  # fmt: skip
    card = (tmp_path / "model_card.md").read_text()
    assert "| site-a | 10 | 0.900 |" in card and "site-a 20" in card
    assert json.loads((tmp_path / "model.json").read_text())["provenance"]["metrics"]["sites"]["site-a"]["test-c-index"] is None


def test_save_state_is_atomic_and_loadable(tmp_path):
    state = {"w": torch.arange(4.0)}
    path = save_state(tmp_path / "c" / "round-001.pt", state)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_bundle(tmp_path)
