"""models/bundle.py: the model bundle round trip, its model card and MONAI metadata, and every refusal on load."""

import json
import os
import stat

import pytest
import torch

from models.bundle import BundleError, bundle_pipeline, load_bundle, save_state, write_bundle
from models.factory import ModelConfig, build_model
from preprocessing.transforms import PIPELINE_VERSION, PipelineConfig


def test_bundle_round_trip_rebuilds_the_same_network(tmp_path):
    cfg = ModelConfig(name="smallcnn")
    model = build_model(cfg)
    pipeline = PipelineConfig(input_size=(32, 32, 16))
    write_bundle(
        tmp_path / "b",
        model.state_dict(),
        model=cfg,
        pipeline=pipeline,
        provenance={"round_of_weights": 3, "sites": ["site-0"]},
    )
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
    metrics = {
        "aggregate": {"test-auc-macro": 0.9, "test-n": 10.0},
        "training_studies": {"site-a": 20.0},
        "sites": {"site-a": {"test-auc-macro": 0.9, "test-n": 10.0, "test-c-index": float("nan")}},
    }
    write_bundle(
        tmp_path,
        build_model(cfg).state_dict(),
        model=cfg,
        pipeline=PipelineConfig(),
        provenance={"sites": ["site-a"], "metrics": metrics},
    )
    card = (tmp_path / "model_card.md").read_text()
    assert "| site-a | 10 | 0.900 |" in card and "site-a 20" in card
    assert (
        json.loads((tmp_path / "model.json").read_text())["provenance"]["metrics"]["sites"]["site-a"]["test-c-index"]
        is None
    )


def test_save_state_is_atomic_and_loadable(tmp_path):
    state = {"w": torch.arange(4.0)}
    path = save_state(tmp_path / "c" / "round-001.pt", state)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="model.json"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="format 'other'"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        load_bundle(tmp_path)


@pytest.fixture
def bundle(tmp_path):
    cfg = ModelConfig(name="smallcnn")
    return write_bundle(
        tmp_path / "b",
        build_model(cfg).state_dict(),
        model=cfg,
        pipeline=PipelineConfig(input_size=(32, 32, 16)),
        provenance={"round_of_weights": 1},
    )


def _edit_meta(folder, change):
    meta = json.loads((folder / "model.json").read_text())
    change(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def test_stale_pipeline_version_is_refused_with_both_versions(bundle):
    _edit_meta(bundle, lambda m: m["pipeline"].update(pipeline_version="0-old"))
    with pytest.raises(BundleError, match=f"pipeline version '0-old'.*version '{PIPELINE_VERSION}'"):
        load_bundle(bundle)


def test_unknown_architecture_and_unexpected_architecture_are_refused(bundle):
    with pytest.raises(BundleError, match="differs from the expected"):
        load_bundle(bundle, expected_model=ModelConfig(name="smallcnn", num_classes=2))
    model, _ = load_bundle(bundle, expected_model=ModelConfig(name="smallcnn"))
    assert isinstance(model, torch.nn.Module)
    _edit_meta(bundle, lambda m: m["model"].update(layers=7))
    with pytest.raises(BundleError, match="cannot be built"):
        load_bundle(bundle)


def test_weights_of_another_shape_are_refused_naming_the_tensor(bundle):
    state = torch.load(bundle / "model.pt", weights_only=True)
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_state(bundle / "model.pt", state)
    with pytest.raises(BundleError, match=rf"1 unexpected \(extra.weight\); 1 of another shape \({name}"):
        load_bundle(bundle)


def test_monai_metadata_describes_the_network_data_format(bundle):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    meta = parser.get("_meta_")
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["modality"] == "CT" and image["num_channels"] == 1 and image["spatial_shape"] == [32, 32, 16]
    assert image["preprocessing"]["pipeline_version"] == PIPELINE_VERSION
    logits = meta["network_data_format"]["outputs"]["logits"]
    assert logits["channel_def"] == {"0": "covid", "1": "other_pneumonia", "2": "normal"}
    assert meta["monai_version"] and meta["pytorch_version"]


def test_monai_bundle_load_reads_the_weights(bundle):
    """MONAI's own bundle loader finds the weights of a fedct bundle folder (no download: the folder exists)."""
    from monai.bundle import load

    cfg = ModelConfig(name="smallcnn")
    net = build_model(cfg)
    loaded = load(
        name=bundle.name,
        bundle_dir=bundle.parent,
        model_file="model.pt",
        model=net,
        source="monaihosting",
        progress=False,
    )
    reference = torch.load(bundle / "model.pt", weights_only=True)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key])


def test_bundle_files_are_written_atomically_with_the_umask(bundle):
    assert not [p for p in bundle.rglob("*") if p.name.endswith(".tmp")]
    mode = stat.S_IMODE(os.stat(bundle / "model.json").st_mode)
    current = os.umask(0o022)
    os.umask(current)
    assert mode == 0o666 & ~current


def test_the_calibration_round_trips_and_is_on_the_model_card(tmp_path):
    from models.bundle import set_calibration
    from models.calibration import bundle_temperature

    cfg = ModelConfig(name="smallcnn")
    write_bundle(
        tmp_path / "b",
        build_model(cfg).state_dict(),
        model=cfg,
        pipeline=PipelineConfig(),
        provenance={"sites": ["site-a"]},
        calibration={"temperature": 1.75, "sites": ["site-a", "site-b"], "validation_studies": 40},
    )
    _, meta = load_bundle(tmp_path / "b")
    assert bundle_temperature(meta) == 1.75
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "softmax(logits / 1.750)" in card and "2 site(s) (40 studies)" in card
    weights = (tmp_path / "b" / "model.pt").read_bytes()
    set_calibration(
        tmp_path / "b",
        {"temperature": 1.75, "ece_before": 0.21, "ece_after": 0.04, "test_studies": 30, "brier_after": 0.3},
    )
    _, meta = load_bundle(tmp_path / "b")
    assert meta["calibration"]["ece_after"] == 0.04 and (tmp_path / "b" / "model.pt").read_bytes() == weights
    assert "0.210 before, 0.040 after" in (tmp_path / "b" / "model_card.md").read_text()
    # without a temperature the card says the probabilities are uncalibrated, and why
    set_calibration(tmp_path / "b", {"temperature": None, "reason": "every site below the privacy floor"})
    assert bundle_temperature(load_bundle(tmp_path / "b")[1]) == 1.0
    assert "Uncalibrated" in (tmp_path / "b" / "model_card.md").read_text()
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        set_calibration(tmp_path / "b", {"temperature": 0.0})
    with pytest.raises(BundleError, match="not a readable model bundle"):
        set_calibration(tmp_path / "none", {"temperature": 1.0})


def test_the_out_of_distribution_reference_is_set_on_the_bundle_and_its_card(tmp_path):
    from models.bundle import set_ood
    from models.ood import bundle_ood

    cfg = ModelConfig(name="smallcnn")
    write_bundle(tmp_path / "b", build_model(cfg).state_dict(), model=cfg, pipeline=PipelineConfig(), provenance={})
    assert bundle_ood(load_bundle(tmp_path / "b")[1]) is None  # an older bundle: no reference, nothing flagged
    assert "Unusual inputs" not in (tmp_path / "b" / "model_card.md").read_text()
    weights = (tmp_path / "b" / "model.pt").read_bytes()
    figures = {"features": 64, "validation_studies": 12, "validation_above_expected": 0.12, "training_studies": 16}
    set_ood(
        tmp_path / "b",
        {
            **figures,
            "training_above_expected": 1.04,
            "feature_mean": [0.0] * 64,
            "feature_var": [1.0] * 64,
            "threshold": 3.16,
        },
    )
    reference = bundle_ood(load_bundle(tmp_path / "b")[1])
    assert (
        reference is not None and reference.threshold == 3.16 and (tmp_path / "b" / "model.pt").read_bytes() == weights
    )
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "exceeds 3.16, the upper 99 % prediction bound" in card and "0.1 validation and 1.0 of 16 training" in card
    with pytest.raises(ValueError, match="variance"):
        set_ood(tmp_path / "b", {"feature_mean": [0.0], "feature_var": [-1.0], "threshold": 1.0})
    set_ood(tmp_path / "b", None)
    assert bundle_ood(load_bundle(tmp_path / "b")[1]) is None


def test_test_time_flips_are_kept_by_the_bundle_said_on_the_card_and_do_not_block_another_run(bundle):
    from models.bundle import model_card

    model, meta = load_bundle(bundle, expected_model=ModelConfig(name="smallcnn", test_time_flips=(0,)))
    assert model.test_time_flips == () and "one pass over the input" in model_card(meta)  # written without flips
    _edit_meta(bundle, lambda m: m["model"].update(test_time_flips=[0]))
    model, meta = load_bundle(bundle, expected_model=ModelConfig(name="smallcnn"))  # same weights, other evaluation
    assert model.test_time_flips == (0,)
    assert "mean over the input and its mirror image (left-right)" in model_card(meta)
    _edit_meta(bundle, lambda m: m["model"].pop("test_time_flips"))  # a bundle from before the setting: one view
    assert load_bundle(bundle)[0].test_time_flips == ()
    _edit_meta(bundle, lambda m: m["model"].update(test_time_flips=[4]))
    with pytest.raises(BundleError, match="cannot be built.*among 0, 1, 2"):
        load_bundle(bundle)
