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


def _run_state(server_round, scale=1.0):
    import numpy as np

    from fl_server.checkpoint import RunState

    return RunState(
        server_round=server_round,
        global_arrays={"w": np.full((2, 3), scale, np.float32), "n": np.array(7, np.int64)},
        strategy_scalars={"eta": 0.01, "clipping_norm": None},
        strategy_arrays={"m_t": {"w": np.full((2, 3), 0.5 * scale), "n": np.array(0.25)}},
        run_log={"rounds": [{"round": server_round}], "best": None},
        run_config={"strategy": "fedadam"},
        extra={"sites": ["site-0"]},
    )


def test_run_state_round_trip_ignores_temporary_files_and_keeps_only_the_last_arrays(tmp_path):
    import numpy as np

    from fl_server.checkpoint import load_run_state, save_run_state

    assert load_run_state(tmp_path / "state") is None
    save_run_state(tmp_path / "state", _run_state(1))
    save_run_state(tmp_path / "state", _run_state(2, scale=2.0))
    (tmp_path / "state" / "state.json.tmp").write_text('{"round": 3, "arrays_file": "round-003.npz"')  # crash mid-write
    (tmp_path / "state" / "round-003.npz.tmp").write_bytes(b"PK half")
    loaded = load_run_state(tmp_path / "state")
    assert loaded.server_round == 2 and loaded.run_config == {"strategy": "fedadam"} and loaded.extra == {"sites": ["site-0"]}
    assert loaded.global_arrays["w"].dtype == np.float32 and np.all(loaded.global_arrays["w"] == 2.0)
    assert loaded.global_arrays["n"].dtype == np.int64 and int(loaded.global_arrays["n"]) == 7
    assert np.all(loaded.strategy_arrays["m_t"]["w"] == 1.0) and float(loaded.strategy_arrays["m_t"]["n"]) == 0.25
    assert loaded.strategy_scalars == {"eta": 0.01, "clipping_norm": None}
    assert sorted(p.name for p in (tmp_path / "state").glob("*.npz")) == ["round-002.npz"]


def test_damaged_run_state_is_an_error_naming_the_file(tmp_path):
    from fl_server.checkpoint import load_run_state, save_run_state

    save_run_state(tmp_path / "state", _run_state(4))
    arrays = tmp_path / "state" / "round-004.npz"
    arrays.write_bytes(arrays.read_bytes()[:-10])
    with pytest.raises(ValueError, match="round-004.npz does not match the checksum"):
        load_run_state(tmp_path / "state")
    (tmp_path / "state" / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format 'other'"):
        load_run_state(tmp_path / "state")


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    from fl_server.checkpoint import atomic_write_bytes

    atomic_write_bytes(tmp_path / "a" / "x.bin", b"1")
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"22")
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"22" and [p.name for p in (tmp_path / "a").iterdir()] == ["x.bin"]
