"""Integration: a real Flower simulation (Ray backend) of the ServerApp and ClientApp on synthetic DICOM sites."""

import json
import math
import shutil

import pydicom
import pytest
import torch
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.simulation import run_simulation

import models.bundle
from fedct.demo import simulation_backend_config
from fedct.protocol import CALIBRATION_TEMPERATURE, reliability_key
from fl_client.client_app import build_client_app
from fl_server.server_app import build_server_app
from models.bundle import load_bundle
from models.calibration import bundle_temperature
from models.registry import ModelRegistry, PromotionRefused, read_stamp


def calibration_recorder(folder):
    """A client mod keeping the metrics of every calibration reply (evaluate replies to a calibration message)."""

    def mod(msg, context, call_next):
        import uuid

        reply = call_next(msg, context)
        if msg.metadata.message_type == "evaluate" and CALIBRATION_TEMPERATURE in msg.content["config"]:
            (folder / f"calibration-{uuid.uuid4().hex}.json").write_text(
                json.dumps(
                    {
                        "temperature": msg.content["config"][CALIBRATION_TEMPERATURE],
                        "records": sorted(reply.content.keys()),
                        "metrics": dict(reply.content["metrics"]),
                    }
                )
            )
        return reply

    return mod


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    # 30 patients per site: 6 validation studies, above the sites' privacy floor (k = 5) for split-level metrics
    tiny_federation(root / "data", sites=2, patients_per_site=30)
    run_dir = root / "run"
    # the first campaign of a model registry (no champion yet, the final bundle becomes v0001), with late profile
    # fusion: the profile statistics exchange before round 1, the normalisation in every round and bundle
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 2,
        "min-sites": 2,
        "run-dir": str(run_dir),
        "model-registry": str(root / "registry"),
        "profile-fusion": "late",
    }
    replies = root / "replies"
    replies.mkdir()
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app(
            {"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")},
            outer_mods=[calibration_recorder(replies)],
        ),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return root, run_dir


def test_global_weights_change_over_rounds(simulated_run):
    _, run_dir = simulated_run
    initial = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=True)
    final = torch.load(run_dir / "checkpoints" / "round-002.pt", weights_only=True)
    assert set(initial) == set(final)
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.allclose(initial[k], final[k])]
    assert len(changed) > len(initial) // 2


def test_metrics_json_has_every_round_and_site(simulated_run):
    _, run_dir = simulated_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert sorted(entry["evaluate"]["sites"]) == ["site-0", "site-1"]
        assert sorted(entry["train"]["sites"]) == ["site-0", "site-1"]
        assert math.isfinite(entry["train"]["aggregate"]["train-loss"])
        agg = entry["evaluate"]["aggregate"]
        for key in ("val-loss", "val-accuracy", "test-loss", "val-n", "test-n"):
            assert agg[key] is not None
        assert agg["val-n"] == sum(s["val-n"] for s in entry["evaluate"]["sites"].values())
        # FedAvg weighted training by examples: the aggregate count is the sum of the sites' training studies.
        assert entry["train"]["aggregate"]["num-examples"] == sum(
            s["num-examples"] for s in entry["train"]["sites"].values()
        )
    assert metrics["best_round"]["round"] in (1, 2)
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_final_and_best_bundles_load(simulated_run):
    _, run_dir = simulated_run
    model, meta = load_bundle(run_dir / "model" / "final")
    assert meta["provenance"]["rounds_planned"] == 2
    assert meta["provenance"]["sites"] == ["site-0", "site-1"]
    assert meta["pipeline"]["input_size"] == [16, 16, 16]
    final = torch.load(run_dir / "checkpoints" / "round-002.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], final[k].to(model.state_dict()[k].dtype)) for k in final)
    assert (run_dir / "model" / "best" / "model.json").is_file()
    low, high = meta["risk_reference"]["quantiles"]
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    assert (
        meta["risk_reference"]["studies"]
        == meta["provenance"]["metrics"]["training_studies"]["site-0"]
        + meta["provenance"]["metrics"]["training_studies"]["site-1"]
    )
    assert "Not for clinical use" in (run_dir / "model" / "final" / "model_card.md").read_text()


def test_prognosis_and_pooled_metrics_reach_metrics_json(simulated_run):
    _, run_dir = simulated_run
    agg = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["evaluate"]["aggregate"]
    for key in (
        "val-c-index",
        "val-td-auc",
        "val-n-events",
        "val-pooled-auc-macro",
        "val-brier",
        "val-ece",
        "test-pooled-auc-macro",
    ):
        assert key in agg
    # Each site's histograms are empty (fewer than k = 5 studies of a class: not sent) or hold its whole split.
    sites = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["evaluate"]
    for name, hist in sites.get("site_histograms", {}).items():
        pos, neg = hist["val-hist-pos-covid"], hist["val-hist-neg-covid"]
        assert (pos == [] and neg == []) or sum(pos) + sum(neg) == sites["sites"][name]["val-n"]
        assert all(c == 0 or c >= 5 for c in pos + neg)


def test_nothing_identifying_reaches_the_server_side(simulated_run):
    root, run_dir = simulated_run
    registry_files = [*(root / "registry").rglob("*.json"), root / "registry" / "log.jsonl"]
    server_text = " ".join(p.read_text() for p in [*run_dir.rglob("*.json"), *registry_files])
    labels = (root / "data" / "site-0" / "labels.csv").read_text().splitlines()[1:]
    study_uids = [line.split(",")[0] for line in labels]
    assert study_uids and not any(uid in server_text for uid in study_uids)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((root / "data").rglob("IM0001.dcm"))]
    assert headers
    for ds in headers:
        for value in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.StudyInstanceUID):
            assert value and value not in server_text
    assert str(root / "data") not in server_text  # no site file paths


def test_the_bundles_are_calibrated_and_metrics_json_has_the_ece_before_and_after(simulated_run):
    root, run_dir = simulated_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # every evaluation carries the sites' summed validation NLL on the temperature grid
    last = metrics["rounds"][-1]["evaluate"]
    assert len(last["aggregate"]["val-calib-nll"]) == 41
    calibration = metrics["calibration"]
    assert set(calibration) == {"best", "final"}
    for name in ("best", "final"):
        entry = calibration[name]
        assert entry["temperature"] > 0 and entry["sites"] == ["site-0", "site-1"]
        for key in ("ece_before", "ece_after", "brier_after", "brier_before"):
            assert 0 <= entry[key] <= 2, key
        assert entry["test_studies"] == sum(
            s["test-n"] for s in metrics["rounds"][entry["round"] - 1]["evaluate"]["sites"].values()
        )
        meta = json.loads((run_dir / "model" / name / "model.json").read_text())
        assert bundle_temperature(meta) == pytest.approx(entry["temperature"])
        assert meta["calibration"]["ece_after"] == pytest.approx(entry["ece_after"])
        assert "## Calibration" in (run_dir / "model" / name / "model_card.md").read_text()
    # what the calibration replies carried: reliability bins of >= k studies each, scalars, nothing else
    files = sorted((root / "replies").glob("calibration-*.json"))
    assert len(files) == 2 * len({calibration["best"]["round"], calibration["final"]["round"]})
    for f in files:
        reply = json.loads(f.read_text())
        assert reply["records"] == ["metrics", "site"]
        for key, value in reply["metrics"].items():
            if "-calib-" in key:
                assert len(value) == 15 and all(isinstance(c, int | float) and c >= 0 for c in value)
                if key.endswith("-count"):
                    assert all(c == 0 or c >= 5 for c in value)
            else:
                assert key in ("test-n", "test-loss", "test-brier", "test-accuracy", "num-examples"), key
                assert isinstance(value, int | float)
        assert sum(reply["metrics"][reliability_key("after", "count")]) == reply["metrics"]["test-n"]


@pytest.fixture(scope="module")
def second_campaign(simulated_run):
    """The second campaign: v0001 promoted (the first promotion passes the rule: no champion), then one round that
    starts from v0001 (init-from) on the same sites (their caches reused), with a rule it cannot pass (test-loss
    better by more than 10), so the registration's decision fails and promotion needs an override."""
    root, _ = simulated_run
    registry = ModelRegistry(root / "registry")
    first = registry.promote("v0001", who="coordinator", reason="first campaign")
    run_dir = root / "run-2"
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 1,
        "min-sites": 2,
        "run-dir": str(run_dir),
        "model-registry": str(root / "registry"),
        "init-from": "v0001",
        "promotion-metric": "test-loss",
        "promotion-min-gain": 10.0,
        "profile-fusion": "late",
    }
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app({"sim-data-root": str(root / "data"), "sim-work-root": str(root / "sites")}),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return registry, run_dir, first


def test_the_first_run_is_registered_with_its_lineage(simulated_run):
    root, run_dir = simulated_run
    registry = ModelRegistry(root / "registry")
    assert registry.versions() == ["v0001"]
    stamp = read_stamp(registry.folder("v0001"))
    lineage = stamp["lineage"]
    meta = json.loads((run_dir / "model" / "final" / "model.json").read_text())
    assert lineage["parent"] is None and lineage["sites"] == ["site-0", "site-1"] and lineage["rounds_planned"] == 2
    assert lineage["strategy"] == meta["provenance"]["strategy"] and lineage["run_config"]["model-registry"]
    assert lineage["pipeline_version"] == meta["pipeline"]["pipeline_version"]
    assert lineage["calibration_temperature"] == pytest.approx(meta["calibration"]["temperature"])
    assert lineage["studies"]["training"] == meta["provenance"]["metrics"]["training_studies"]
    assert sum(lineage["studies"]["test"].values()) == 13
    assert (
        lineage["metrics"]["sites"]["site-0"]["test-loss"]
        == meta["provenance"]["metrics"]["sites"]["site-0"]["test-loss"]
    )
    assert lineage["champion_comparison"] is None and registry.events()[0]["who"] == "fedct server"


def test_a_campaign_starts_from_a_version_and_is_judged_against_the_champion(simulated_run, second_campaign):
    _, first_run = simulated_run
    registry, run_dir, first = second_campaign
    assert first.passed and first.champion is None
    # round 0 of the second campaign is v0001's weights, not the seeded ones
    start = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=True)
    v1 = torch.load(registry.folder("v0001") / "model.pt", weights_only=True)
    seeded = torch.load(first_run / "checkpoints" / "round-000.pt", weights_only=True)
    assert all(torch.equal(start[k], v1[k]) for k in v1)
    assert not all(torch.equal(start[k], seeded[k]) for k in seeded)
    assert registry.versions() == ["v0001", "v0002"]
    lineage = registry.stamp("v0002")["lineage"]
    assert lineage["parent"] == "v0001" and lineage["run_config"]["init-from"] == "v0001"
    # the champion was evaluated on every site's splits in the same run: the same weights on the same test split
    # give the numbers its own run recorded
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = metrics["champion_evaluation"]
    assert evaluation["champion"] == "v0001" and sorted(evaluation["sites"]) == ["site-0", "site-1"]
    recorded = registry.stamp("v0001")["lineage"]["metrics"]["sites"]
    for site in ("site-0", "site-1"):
        assert evaluation["sites"][site]["test-n"] == recorded[site]["test-n"]
        assert evaluation["sites"][site]["test-loss"] == pytest.approx(recorded[site]["test-loss"], rel=1e-4)
    assert lineage["champion_comparison"]["sites"] == evaluation["sites"]
    # the decision logged at registration, with its numbers, in the log and the model card
    decision = next(e for e in registry.events() if e["event"] == "decision" and e["version"] == "v0002")["decision"]
    assert decision["champion"] == "v0001" and "one federated evaluation" in decision["source"]
    challenger = metrics["rounds"][-1]["evaluate"]["sites"]
    for site in ("site-0", "site-1"):
        assert decision["sites"][site]["challenger"] == pytest.approx(challenger[site]["test-loss"])
        assert decision["sites"][site]["champion"] == pytest.approx(evaluation["sites"][site]["test-loss"])
    assert not decision["passed"] and "not better by more than 10" in decision["reasons"][-1]
    card = (registry.folder("v0002") / "model_card.md").read_text()
    assert "Promotion rule evaluated" in card and "site-0: challenger" in card
    # refused without an override, promoted with one (logged), and a rollback restores v0001
    with pytest.raises(PromotionRefused):
        registry.promote("v0002", who="coordinator")
    registry.promote("v0002", who="coordinator", override=True, reason="test: the board accepts the new model")
    assert registry.champion() == "v0002"
    assert registry.rollback(reason="test: site-1 reports worse reads", who="coordinator") == "v0001"
    assert registry.champion() == "v0001" and registry.champion_history() == ["v0001"]


def test_the_profile_normalisation_is_pooled_once_and_travels_into_the_bundles(simulated_run):
    from preprocessing.profile import read_schema, read_site_profile
    from preprocessing.profile_features import ProfileNormalisation

    root, run_dir = simulated_run
    saved = json.loads((run_dir / "profile-normalisation.json").read_text())
    assert saved["sites"] == 2 and saved["rejected_replies"] == [] and saved["missing_replies"] == []
    assert sorted(saved["site_variables"]) == ["site-0", "site-1"]
    norm = ProfileNormalisation.from_dict(saved)
    schema = read_schema()
    assert norm.variables == schema.names
    # the pooled mean is that of both sites' studies together (aggregates above the floor only)
    ages = [read_site_profile(root / "data" / s).column("age") for s in ("site-0", "site-1")]
    assert math.isclose(
        norm.mean[0], float(torch.tensor([*ages[0], *ages[1]], dtype=torch.float64).mean()), rel_tol=1e-9
    )
    assert json.loads((run_dir / "metrics.json").read_text())["profile_normalisation"]["mean"] == list(norm.mean)
    for name in ("best", "final"):
        model, meta = load_bundle(run_dir / "model" / name)
        assert meta["model"]["profile_fusion"] == "late" and model.n_profile == 2 * len(schema.names)
        assert ProfileNormalisation.from_dict(meta["profile_normalisation"]) == norm


def add_studies(root, site, count):
    """``count`` more synthetic studies for ``site`` (the same hospital's generator, new patients: new UIDs), with
    their labels.csv rows; returns their StudyInstanceUIDs."""
    import csv
    from dataclasses import replace

    from synthetic.hospitals import default_profiles, write_site

    data = root / "data" / site
    existing = sorted(p.name for p in (data / "dicom").iterdir())
    index = int(site.split("-")[1])
    profile = replace(default_profiles(2)[index], rows=32, pixel_spacing_mm=12.0, slice_thickness_mm=10.0)
    more = root / f"more-{site}"
    write_site(more, profile, site_index=index, patients_per_site=len(existing) + count, seed=0)
    added = sorted(p.name for p in (more / "dicom").iterdir() if p.name not in existing)[:count]
    for name in added:
        shutil.copytree(more / "dicom" / name, data / "dicom" / name)
    rows = list(csv.DictReader((more / "labels.csv").open()))
    new_rows = rows[len(existing) : len(existing) + count]
    with (data / "labels.csv").open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writerows(new_rows)
    return [r["StudyInstanceUID"] for r in new_rows]


@pytest.fixture(scope="module")
def third_campaign(simulated_run, second_campaign):
    """The third campaign: site-1 has added 5 studies and opted in to clinician feedback (a review page's database in
    its work folder disagreeing, with a corrected diagnosis, on every labelled study; feedback wins conflicts), and the
    run starts from v0002 with a rule it can pass (test loss; lenient per-site margin). The champion (v0001) is sent
    to the sites at its start."""
    from inference.review_store import FeedbackStore
    from preprocessing.labels import DIAGNOSES, read_labels

    root, _ = simulated_run
    registry, _, _ = second_campaign
    added = add_studies(root, "site-1", 5)
    store = FeedbackStore(root / "sites" / "site-1" / "feedback.sqlite")
    for i, (uid, label) in enumerate(read_labels(root / "data" / "site-1" / "labels.csv").items()):
        finding = DIAGNOSES[label.diagnosis]
        corrected = DIAGNOSES[(label.diagnosis + 1) % len(DIAGNOSES)]
        store.add(
            f"study-{i}",
            "disagree",
            "",
            corrected_diagnosis=corrected,
            reader="dr-test",
            study_uid=uid,
            model_version="v0001",
            model_finding=finding,
        )
    store.add("study-x", "disagree", "no correction: not used", study_uid=added[0], model_finding="covid")
    run_dir = root / "run-3"
    server_config = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 1,
        "min-sites": 2,
        "run-dir": str(run_dir),
        "model-registry": str(root / "registry"),
        "init-from": "v0002",
        "promotion-metric": "test-loss",
        "promotion-margin": 10.0,
        "profile-fusion": "late",
    }
    client = {
        "sim-data-root": str(root / "data"),
        "sim-work-root": str(root / "sites"),
        "sim-feedback-labels": "yes",
        "sim-feedback-conflict": "feedback",
    }
    run_simulation(
        server_app=build_server_app(server_config),
        client_app=build_client_app(client),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )
    return registry, run_dir, added


def test_sites_get_the_champion_add_studies_and_feedback_and_predict_with_the_champion(
    simulated_run, second_campaign, third_campaign, tmp_path, capsys, monkeypatch
):
    from fedct.cli import main as fedct_main
    from fl_server.campaign import CampaignError, prepare_campaign
    from fl_server.config import ServerConfig

    root, _ = simulated_run
    registry, run_dir, added = third_campaign
    # the champion reached both sites through the federation, hash-verified, at the start of runs 2 and 3
    for run in ("run-2", "run-3"):
        delivery = json.loads((root / run / "champion-delivery.json").read_text())
        assert delivery["champion"] == "v0001" and delivery["failed"] == []
        assert delivery["sites"] == {"site-0": "v0001", "site-1": "v0001"}
        assert delivery["content_sha256"] == registry.stamp("v0001")["content_sha256"]
    for site in ("site-0", "site-1"):
        assert (root / "sites" / site / "models" / "champion").read_text().strip() == "v0001"
        assert read_stamp(root / "sites" / site / "models" / "v0001")["version"] == "v0001"
    # lineage: v0003 starts from v0002; site-1 contributes 5 new studies, site-0 none; every labelled training study
    # of site-1 took its label from feedback (each a conflict with labels.csv, which feedback wins in this run)
    lineage = registry.stamp("v0003")["lineage"]
    assert lineage["parent"] == "v0002"
    assert lineage["new_studies"] == {"site-0": 0.0, "site-1": 5.0}
    training = lineage["studies"]["training"]["site-1"]
    assert lineage["feedback_labels"] == {
        "site-0": {"used": 0.0, "conflicts": 0.0},
        "site-1": {"used": training, "conflicts": training},
    }
    assert registry.stamp("v0002")["lineage"]["new_studies"] == {"site-0": 0.0, "site-1": 0.0}
    card = (registry.folder("v0003") / "model_card.md").read_text()
    assert "site-1: new studies 5, feedback labels used" in card
    # the challenger is promoted only when the rule passes; a rollback restores the previous champion
    decision = registry.decision("v0003")
    assert "one federated evaluation" in decision.source
    if decision.passed:
        registry.promote("v0003", who="coordinator", reason="test: campaign 3 passes the rule")
        assert registry.champion() == "v0003"
        assert registry.rollback(reason="test: restore", who="coordinator") == "v0001"
    else:
        with pytest.raises(PromotionRefused):
            registry.promote("v0003", who="coordinator")
    assert registry.champion() == "v0001"
    # a campaign whose preprocessing differs from the version it starts from is refused before it starts
    same = {**TINY_RUN_CONFIG, "profile-fusion": "late", "model-registry": str(root / "registry"), "init-from": "v0003"}
    with pytest.raises(CampaignError, match="init-from = 'v0003' refused before the run starts: .*preprocessing"):
        prepare_campaign(ServerConfig.from_run_config({**same, "input-size": "32,32,16"}))
    with monkeypatch.context() as m:  # a coordinator whose fedct preprocesses with a newer pipeline version
        m.setattr(models.bundle, "PIPELINE_VERSION", "99")
        with pytest.raises(
            CampaignError, match="refused before the run starts: .*this fedct preprocesses with version '99'"
        ):
            prepare_campaign(ServerConfig.from_run_config(same))
    assert prepare_campaign(ServerConfig.from_run_config(same)).parent == "v0003"
    # the site predicts with the champion it received (no --model) and every result names its version
    study = tmp_path / "input" / "study"
    shutil.copytree(root / "data" / "site-0" / "dicom" / "study-0001", study)
    out = tmp_path / "out"
    args = [
        "predict",
        "--site-dir",
        str(root / "sites" / "site-0"),
        "--input",
        str(tmp_path / "input"),
        "--out",
        str(out),
    ]
    assert fedct_main([*args, "--no-local-identifiers"]) == 0
    printed = capsys.readouterr().out
    digest = registry.stamp("v0001")["content_sha256"]
    assert f"model: registry version v0001 (SHA-256 {digest[:12]})" in printed
    prediction = json.loads(next(out.glob("*/prediction.json")).read_text())
    assert prediction["model"]["registry_version"] == "v0001" and prediction["model"]["content_sha256"] == digest
