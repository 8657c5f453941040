"""models/registry.py: versions with content hashes and lineage, the promotion rule, promote/override/rollback, and
the `fedct models` command on real bundles."""

import json

import pytest
import torch

from fedct.cli import main
from models.bundle import BundleError, load_bundle, write_bundle
from models.factory import ModelConfig, build_model
from models.registry import (
    LOG_NAME,
    ModelRegistry,
    PromotionRefused,
    PromotionRule,
    RegistryError,
    bundle_content_hash,
    decide,
    read_stamp,
)
from preprocessing.transforms import PipelineConfig

CFG = ModelConfig(name="smallcnn")


def make_bundle(folder, *, accuracy, seed=0, test_n=(7.0, 6.0), temperature=None):
    """A real bundle whose provenance records per-site test accuracies ``accuracy = (site-0, site-1)``."""
    torch.manual_seed(seed)
    sites = {
        f"site-{i}": {"test-accuracy": a, "test-n": n, "test-auc-macro": None}
        for i, (a, n) in enumerate(zip(accuracy, test_n))
    }
    metrics = {
        "aggregate": {"test-accuracy": sum(accuracy) / 2},
        "sites": sites,
        "training_studies": {"site-0": 17.0, "site-1": 18.0},
    }
    provenance = {
        "strategy": "FedAvg",
        "round_of_weights": 2,
        "rounds_planned": 2,
        "sites": ["site-0", "site-1"],
        "run_config": {"promotion-metric": "test-accuracy", "promotion-margin": 0.05},
        "metrics": metrics,
    }
    calibration = {"temperature": temperature} if temperature else None
    return write_bundle(
        folder,
        build_model(CFG).state_dict(),
        model=CFG,
        pipeline=PipelineConfig(input_size=(16, 16, 16)),
        provenance=provenance,
        calibration=calibration,
    )


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(tmp_path / "registry")


def test_register_copies_the_bundle_with_its_hash_and_lineage(tmp_path, registry):
    bundle = make_bundle(tmp_path / "b1", accuracy=(0.5, 0.6), temperature=1.4)
    v1 = registry.register(bundle, who="coordinator", why="first campaign")
    assert v1 == "v0001" and registry.versions() == ["v0001"] and registry.champion() is None
    folder = registry.bundle_path("v0001")
    assert folder != bundle and bundle_content_hash(folder) == bundle_content_hash(bundle)
    stamp = read_stamp(folder)
    lineage = stamp["lineage"]
    assert lineage["parent"] is None and lineage["sites"] == ["site-0", "site-1"] and lineage["strategy"] == "FedAvg"
    assert lineage["studies"] == {
        "training": {"site-0": 17.0, "site-1": 18.0},
        "validation": {"site-0": None, "site-1": None},
        "test": {"site-0": 7.0, "site-1": 6.0},
    }
    assert lineage["calibration_temperature"] == 1.4 and lineage["pipeline_version"] and lineage["rounds_planned"] == 2
    assert lineage["metrics"]["sites"]["site-1"]["test-accuracy"] == 0.6
    event = json.loads((registry.root / LOG_NAME).read_text().splitlines()[0])
    assert event["event"] == "register" and event["who"] == "coordinator" and event["why"] == "first campaign"
    assert event["content_sha256"] == stamp["content_sha256"] and event["utc"].endswith("Z")
    load_bundle(folder)  # the copy is a usable bundle
    assert "Version v0001" in (folder / "model_card.md").read_text()
    assert "Campaign:" not in (folder / "model_card.md").read_text()  # no campaign counts recorded
    # the second registration is the next version and names its parent
    v2 = registry.register(make_bundle(tmp_path / "b2", accuracy=(0.7, 0.7), seed=1), lineage={**lineage, "parent": v1})
    assert v2 == "v0002" and registry.stamp(v2)["lineage"]["parent"] == "v0001"
    with pytest.raises(RegistryError, match="parent version 'v0009' is not registered"):
        registry.register(bundle, lineage={"parent": "v0009"})


def test_a_bundle_changed_after_registration_is_refused(tmp_path, registry):
    registry.register(make_bundle(tmp_path / "b", accuracy=(0.5, 0.5)))
    folder = registry.folder("v0001")
    state = torch.load(folder / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, folder / "model.pt")
    with pytest.raises(RegistryError, match="changed after registration"):
        registry.bundle_path("v0001")
    assert registry.show("v0001")["hash_ok"] is False
    with pytest.raises(RegistryError, match="no version 'v0007'"):
        registry.bundle_path("v0007")


def test_a_bundle_that_does_not_load_is_not_registered(tmp_path, registry):
    bundle = make_bundle(tmp_path / "b", accuracy=(0.5, 0.5))
    meta = json.loads((bundle / "model.json").read_text())
    meta["pipeline"]["pipeline_version"] = "0-old"
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="pipeline version '0-old'"):
        registry.register(bundle)
    assert registry.versions() == []


def test_promote_by_rule_refuse_unless_overridden_and_rollback(tmp_path, registry):
    v1 = registry.register(make_bundle(tmp_path / "b1", accuracy=(0.50, 0.60)))
    first = registry.promote(v1, who="alice")
    assert first.passed and first.champion is None and registry.champion() == v1
    # better on both sites: passes the rule recorded in its run config (test-accuracy, margin 0.05)
    v2 = registry.register(make_bundle(tmp_path / "b2", accuracy=(0.60, 0.62), seed=1))
    decision = registry.decision(v2)
    assert decision.passed and decision.rule["metric"] == "test-accuracy" and decision.rule["margin"] == 0.05
    assert "recorded by each model's own run" in decision.source
    assert decision.sites["site-0"]["difference"] == pytest.approx(0.10)
    assert decision.overall["challenger"] == pytest.approx((7 * 0.60 + 6 * 0.62) / 13)
    registry.promote(v2, who="alice", reason="campaign 2 beats campaign 1")
    assert registry.champion() == v2 and registry.champion_history() == [v1, v2]
    # better overall but worse by 0.10 on site-1: fails non-inferiority and is refused
    v3 = registry.register(make_bundle(tmp_path / "b3", accuracy=(0.90, 0.52), seed=2))
    with pytest.raises(PromotionRefused, match="site site-1: test-accuracy 0.5200 vs champion 0.6200") as refused:
        registry.promote(v3, who="bob")
    assert refused.value.decision.overall["passed"] and not refused.value.decision.sites["site-1"]["passed"]
    assert registry.champion() == v2
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(v3, override=True)
    forced = registry.promote(v3, who="bob", override=True, reason="site-1 test split changed; accepted by the board")
    assert not forced.passed and registry.champion() == v3
    promote_event = [e for e in registry.events() if e["event"] == "promote"][-1]
    assert promote_event["override"] is True and promote_event["who"] == "bob" and promote_event["previous"] == v2
    assert promote_event["decision"]["sites"]["site-1"]["passed"] is False
    card = (registry.folder(v3) / "model_card.md").read_text()
    assert "by override of a failed rule" in card and "site-1: challenger 0.5200, champion 0.6200 (fails)" in card
    # rollback restores the previous champion, then the one before
    assert registry.rollback(reason="site-1 complaints", who="carol") == v2
    assert registry.champion() == v2
    assert "Rolled back to v0002" in (registry.folder(v3) / "model_card.md").read_text()
    assert registry.rollback(reason="back to the first") == v1 and registry.champion() == v1
    with pytest.raises(RegistryError, match="only champion"):
        registry.rollback(reason="nothing left")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.rollback(reason=" ")
    kinds = [e["event"] for e in registry.events()]
    assert kinds == ["register", "promote", "register", "promote", "register", "promote", "rollback", "rollback"]


def test_the_joint_federated_evaluation_is_preferred_to_the_recorded_metrics(tmp_path, registry):
    v1 = registry.register(make_bundle(tmp_path / "b1", accuracy=(0.80, 0.80)))
    registry.promote(v1)
    bundle = make_bundle(tmp_path / "b2", accuracy=(0.60, 0.62), seed=1)
    lineage = {
        **registry.stamp(v1)["lineage"],
        "parent": v1,
        "metrics": {
            "sites": {
                "site-0": {"test-accuracy": 0.60, "test-n": 7.0},
                "site-1": {"test-accuracy": 0.62, "test-n": 6.0},
            }
        },
        "champion_comparison": {
            "champion": v1,
            "sites": {
                "site-0": {"test-accuracy": 0.55, "test-n": 7.0},
                "site-1": {"test-accuracy": 0.58, "test-n": 6.0},
            },
        },
    }
    v2 = registry.register(bundle, lineage=lineage)
    decision = registry.record_decision(v2)
    assert decision.passed and "one federated evaluation" in decision.source  # against 0.80 recorded it would fail
    assert decision.sites["site-0"]["champion"] == 0.55
    assert [e["event"] for e in registry.events()][-1] == "decision"
    assert "Promotion rule evaluated" in (registry.folder(v2) / "model_card.md").read_text()


def test_decide_directions_margins_and_missing_values():
    def sites(a, b):
        return {"site-0": {"test-loss": a, "test-n": 10}, "site-1": {"test-loss": b, "test-n": 10}}

    rule = PromotionRule(metric="test-loss", margin=0.05)
    assert rule.lower_is_better
    good = decide(
        rule,
        challenger="v2",
        champion="v1",
        challenger_sites=sites(0.9, 1.02),
        champion_sites=sites(1.0, 1.0),
        source="t",
    )
    assert good.passed and good.overall["difference"] == pytest.approx(0.04)
    worse = decide(
        rule,
        challenger="v2",
        champion="v1",
        challenger_sites=sites(0.9, 1.1),
        champion_sites=sites(1.0, 1.0),
        source="t",
    )
    assert not worse.passed and "site site-1" in worse.reasons[0]
    gain = decide(
        PromotionRule(metric="test-loss", margin=0.05, min_gain=0.1),
        challenger="v2",
        champion="v1",
        challenger_sites=sites(0.9, 1.02),
        champion_sites=sites(1.0, 1.0),
        source="t",
    )
    assert not gain.passed and "not better by more than 0.1" in gain.reasons[-1]
    missing = decide(
        rule,
        challenger="v2",
        champion="v1",
        challenger_sites={"site-0": {"test-loss": 0.5}},
        champion_sites=sites(1.0, None),
        source="t",
    )
    assert not missing.passed and "site site-1: no test-loss for the challenger and champion" in missing.reasons[0]
    for bad in ({"metric": "val-auc-macro"}, {"margin": -0.1}, {"min_gain": float("nan")}):
        with pytest.raises(ValueError):
            PromotionRule(**bad)


def test_fedct_models_command(tmp_path, capsys):
    root = tmp_path / "registry"
    assert (
        main(
            [
                "models",
                "register",
                str(make_bundle(tmp_path / "b1", accuracy=(0.5, 0.5))),
                "--registry",
                str(root),
                "--reason",
                "manual",
            ]
        )
        == 0
    )
    assert main(["models", "promote", "v0001", "--registry", str(root), "--who", "alice"]) == 0
    ModelRegistry(root).register(make_bundle(tmp_path / "b2", accuracy=(0.3, 0.3), seed=1))
    capsys.readouterr()
    assert main(["models", "list", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "champion" in out and "v0002" in out
    assert main(["models", "promote", "v0002", "--registry", str(root)]) == 1
    assert "FAILS the rule" in capsys.readouterr().err
    assert main(["models", "promote", "v0002", "--registry", str(root), "--override"]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert (
        main(["models", "promote", "v0002", "--registry", str(root), "--override", "--reason", "board decision"]) == 0
    )
    assert "override" in capsys.readouterr().out
    assert main(["models", "show", "champion", "--registry", str(root)]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == "v0002" and shown["champion"] and shown["hash_ok"]
    assert main(["models", "rollback", "--registry", str(root), "--reason", "worse at site-0"]) == 0
    assert ModelRegistry(root).champion() == "v0001"
    assert main(["models", "show", "v0042", "--registry", str(root)]) == 2


def test_the_campaign_counts_of_each_site_go_into_the_lineage_and_the_card(tmp_path, registry):
    from models.registry import lineage_from_bundle

    bundle = make_bundle(tmp_path / "b", accuracy=(0.5, 0.6))
    counts = {
        "site-0": {"train-new-studies": 0.0, "train-feedback-labels": 0.0, "train-feedback-conflicts": 0.0},
        "site-1": {"train-new-studies": 5.0, "train-feedback-labels": 6.0, "train-feedback-conflicts": None},
    }
    lineage = lineage_from_bundle(json.loads((bundle / "model.json").read_text()), campaign_counts=counts)
    assert lineage["new_studies"] == {"site-0": 0.0, "site-1": 5.0}
    assert lineage["feedback_labels"]["site-1"] == {"used": 6.0, "conflicts": None}
    version = registry.register(bundle, lineage=lineage)
    card = (registry.folder(version) / "model_card.md").read_text()
    assert (
        "Campaign: site-0: new studies 0, feedback labels used 0, conflicts with labels.csv 0; site-1: new studies "
        "5, feedback labels used 6, conflicts with labels.csv withheld." in card
    )
