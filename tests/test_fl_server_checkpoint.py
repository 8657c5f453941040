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
    assert torch.equal(model(x), loaded(x))
    assert meta["class_names"] == ["covid", "other_pneumonia", "normal"]
    assert meta["provenance"]["round_of_weights"] == 3
    assert bundle_pipeline(meta) == pipeline
    assert meta["pipeline"]["pipeline_version"]


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
