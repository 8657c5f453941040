"""bench.quality in its tiny size: pooled, local-only and federated arms scored by the same code on the same test studies."""

import json
import math
import shutil

import pytest

from bench.common import BenchOptions
from bench.quality import PARTIAL_NAME, load_partial, medium_plan, plan_for, plan_record_of, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny quality run shared by the tests of this module (its federated arm starts Flower's simulation)."""
    out = tmp_path_factory.mktemp("quality")
    return out, json.loads(run(BenchOptions(out=out, tiny=True)).read_text())


def test_tiny_quality_benchmark_has_every_arm_and_site(tiny_run):
    out, data = tiny_run
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert set(data["arms"]) == {
        "pooled",
        "pooled@1",
        "local:site-0",
        "local:site-1",
        "federated:fedavg",
        "federated:fedavg@1",
    }
    assert data["plan"]["epochs_budget"] == data["plan"]["rounds"] * data["plan"]["local_epochs"]
    for arm in data["arms"].values():
        assert [r["seed"] for r in arm["per_seed"]] == [0]
        assert set(arm["per_seed"][0]["sites"]) == {"site-0", "site-1"}
        for key in ("test-auc-macro", "test-c-index", "test-pooled-auc-macro"):
            stats = arm["summary"]["overall"][key]
            assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
        assert arm["per_seed"][0]["overall"]["test-n"] == sum(
            data["site_studies"][s]["test"] for s in ("site-0", "site-1")
        )
    fed = data["arms"]["federated:fedavg"]["summary"]["overall"]["test-pooled-auc-macro"]["mean"]
    assert fed is not None and not math.isnan(fed)
    assert data["verdict_on_macro_auc"]["fedavg"]["best_local_arm"].startswith("local:")


def test_pooled_and_federated_arms_are_scored_short_of_the_budget_too(tiny_run):
    """``score_at``: the pooled arm after E of its epochs and the federated arm after E / local epochs rounds, from the
    same training as the budget's model (the federated one from its round checkpoint), listed per arm in
    ``budget_curves``."""
    import torch

    from bench.quality import _server_config, _site_configs, round_state, score

    out, data = tiny_run
    assert data["plan"]["score_at"] == [1] and data["plan"]["epochs_budget"] == 2
    for base in ("pooled", "federated:fedavg"):
        curve = data["budget_curves"][base]
        assert [p["epochs"] for p in curve] == [1, 2]
        assert (
            curve[0]["internal_auc_macro"] == data["arms"][f"{base}@1"]["summary"]["overall"]["test-auc-macro"]["mean"]
        )
        assert curve[1]["internal_auc_macro"] == data["arms"][base]["summary"]["overall"]["test-auc-macro"]["mean"]
    plan = plan_for(BenchOptions(out=out, tiny=True))
    work = out / "work" / "quality"
    config = _server_config(plan, seed=0, run_dir=work / "runs" / "fedavg-seed0", strategy="fedavg")
    after_1, after_2 = round_state(config, 1), round_state(config, 2)
    assert any(not torch.equal(after_1[k], after_2[k]) for k in after_1)  # two different models were scored
    sites = _site_configs(work / "data", work / "sites", epochs_budget=2)
    from dataclasses import replace

    settings = replace(config.round_settings(1), local_epochs=2)
    again = score(sites, settings, after_1)
    undefined_as_none = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in again["overall"].items()}
    assert undefined_as_none == data["arms"]["federated:fedavg@1"]["per_seed"][0]["overall"]
    with pytest.raises(FileNotFoundError, match="round-009"):
        round_state(config, 9)


def test_pooled_training_scored_on_the_way_is_the_same_training(tiny_run):
    """train_pooled_at((1, 2)) continues one training (one Adam, one data order): its 2-epoch weights are those of
    train_pooled(epochs=2) in one call; bad epoch lists are refused."""
    from dataclasses import replace

    import torch

    from bench.quality import _initial_state, _server_config, _site_configs, train_pooled, train_pooled_at

    out, _ = tiny_run
    plan = plan_for(BenchOptions(out=out, tiny=True))
    work = out / "work" / "quality"
    config = _server_config(plan, seed=0, run_dir=work / "runs" / "fedavg-seed0", strategy="fedavg")
    sites = _site_configs(work / "data", work / "sites", epochs_budget=2)
    settings = replace(config.round_settings(1), local_epochs=2)
    state0 = _initial_state(config)
    at = train_pooled_at(sites, settings, state0, epochs=(1, 2))
    once = train_pooled(sites, settings, state0, epochs=2)
    assert set(at) == {1, 2}
    for k, v in once.items():
        assert torch.allclose(at[2][k].float(), v.float(), atol=1e-6), k
    assert any(not torch.equal(at[1][k], at[2][k]) for k in once)
    for bad in ((2, 1), (0, 2), ()):
        with pytest.raises(ValueError, match="increasing positive"):
            train_pooled_at(sites, settings, state0, epochs=bad)


def test_score_at_must_lie_inside_the_budget_in_whole_rounds(tmp_path):
    assert medium_plan(rounds=40, score_at=(10, 20)).score_at == (10, 20)
    with pytest.raises(ValueError, match="score_at 40: must lie between 0 and the budget of 40"):
        medium_plan(rounds=40, score_at=(40,))
    with pytest.raises(ValueError, match="score_at 0"):
        medium_plan(score_at=(0,))
    with pytest.raises(ValueError, match="score_at 3: not a whole number of rounds of 2 local epochs"):
        medium_plan(rounds=5, local_epochs=2, score_at=(3,))
    with pytest.raises(ValueError, match="increasing and without repeats"):
        medium_plan(rounds=40, score_at=(20, 10))
    from bench.quality import _score_at_argument, main

    assert _score_at_argument(None) is None and _score_at_argument("none") == [] and _score_at_argument("6,9") == [6, 9]
    with pytest.raises(ValueError, match="score_at 12: must lie between 0 and the budget of 12"):
        main(["--medium", "--score-at", "12", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # a partial result keeps the arms scored short of this plan's budget, not those of another list
    plan = plan_record_of(medium_plan(rounds=40, score_at=(20,)))
    row = {"seed": 0, "overall": {}, "sites": {}}
    per_seed = {"pooled@20": [row], "pooled@10": [row], "federated:fedavg@20": [row]}
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan, "per_seed": per_seed, "seconds": {}}))
    kept, _ = load_partial(tmp_path / PARTIAL_NAME, plan)
    assert set(kept) == {"pooled@20", "federated:fedavg@20"}


def test_every_arm_is_scored_on_the_external_family(tiny_run):
    out, data = tiny_run
    assert data["external_family"] == {"studies": 6, "generator": "synthetic.external"}
    for arm in data["arms"].values():
        external = arm["per_seed"][0]["external"]
        assert external["external-n"] == 6  # every study of the family, none held out for anything else
        assert 0.0 <= external["external-auc-covid-vs-normal"] <= 1.0
        low, high = external["external-auc-covid-vs-normal-low"], external["external-auc-covid-vs-normal-high"]
        assert 0.0 <= low <= external["external-auc-covid-vs-normal"] <= high <= 1.0  # 2 + 2 studies: wide
        assert 0.0 <= external["external-auc-macro"] <= 1.0
        assert arm["summary"]["external"]["external-auc-covid-vs-normal"]["n"] == 1
    verdict = data["verdict_on_macro_auc"]["fedavg"]
    assert verdict["target_external_auc_covid_vs_normal"] == 0.85
    assert (
        verdict["external_auc_covid_vs_normal"]
        == data["arms"]["federated:fedavg"]["per_seed"][0]["external"]["external-auc-covid-vs-normal"]
    )
    # the family was ingested like a site, apart from the training sites
    report = json.loads((out / "work" / "quality" / "external-site" / "ingest_report.json").read_text())
    assert report["counts"]["accepted"] == 6 and report["counts"]["rejected"] == 0


def test_a_strategy_the_run_config_does_not_know_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="nosuch"):
        run(BenchOptions(out=tmp_path, tiny=True), strategies=("fedavg", "nosuch"))
    assert not (tmp_path / "work").exists()


def test_plans_grow_with_the_mode(tmp_path):
    full = plan_for(BenchOptions(out=tmp_path))
    assert len(full.seeds) >= 3 and full.sites >= 3 and "model-name" not in full.run_config
    quick = plan_for(BenchOptions(out=tmp_path, quick=True))
    assert len(quick.seeds) >= 3 and set(quick.strategies) == {"fedavg", "fedprox", "fedadam"}
    assert quick.run_config["model-name"] != full.run_config.get("model-name")
    with pytest.raises(ValueError, match="at least 2 sites"):
        type(full)(sites=1, patients_per_site=5, small=True, seeds=(0,), rounds=1, local_epochs=1)


def test_resume_keeps_finished_arms_and_runs_only_the_rest(tiny_run, tmp_path):
    first_out, first = tiny_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    partial = json.loads((out / PARTIAL_NAME).read_text())
    assert partial["plan"]["seeds"] == [0] and set(partial["per_seed"]) == set(first["arms"])
    # drop the pooled arm from the partial result, as if the run had been stopped during it
    del partial["per_seed"]["pooled"], partial["seconds"]["pooled"]
    (out / PARTIAL_NAME).write_text(json.dumps(partial))
    runs = out / "work" / "quality" / "runs"
    shutil.rmtree(runs)
    second = json.loads(run(BenchOptions(out=out, tiny=True, resume=True)).read_text())
    assert second["resumed"] is True
    assert not runs.exists()  # the finished federated arm did not run again
    for arm in ("local:site-0", "local:site-1", "federated:fedavg"):
        assert second["arms"][arm]["per_seed"] == first["arms"][arm]["per_seed"]
    assert [r["seed"] for r in second["arms"]["pooled"]["per_seed"]] == [0]
    assert set(second["arms"]["pooled"]["per_seed"][0]["sites"]) == {"site-0", "site-1"}


def test_resume_refuses_a_partial_result_of_another_plan(tmp_path):
    plan = plan_record_of(plan_for(BenchOptions(out=tmp_path, tiny=True)))
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": {**plan, "rounds": 7}, "per_seed": {}, "seconds": {}}))
    with pytest.raises(ValueError, match="rounds: 7 there, 2 here"):
        load_partial(tmp_path / PARTIAL_NAME, plan)
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"per_seed": {}, "seconds": {}}))
    with pytest.raises(ValueError, match="no plan recorded"):
        load_partial(tmp_path / PARTIAL_NAME, plan)
    assert load_partial(tmp_path / "absent.json", plan) == ({}, {})


def test_resume_keeps_only_this_plans_seeds_and_strategies(tmp_path):
    plan = plan_record_of(plan_for(BenchOptions(out=tmp_path, tiny=True)))  # seed 0, fedavg
    row = {"seed": 0, "overall": {}, "sites": {}}
    per_seed = {
        "pooled": [row, {**row, "seed": 5}],
        "federated:fedadam": [row],
        "federated:fedavg": [{**row, "seed": 5}],
    }
    (tmp_path / PARTIAL_NAME).write_text(
        json.dumps({"plan": plan, "per_seed": per_seed, "seconds": {"pooled": 3.0, "federated:fedadam": 1.0}})
    )
    kept, seconds = load_partial(tmp_path / PARTIAL_NAME, plan)
    assert kept == {"pooled": [row]} and seconds == {"pooled": 3.0}


def test_medium_plan_lies_between_quick_and_full_and_is_its_own_plan(tmp_path):
    """The medium size (issue #20.1): larger inputs and images than quick, full-size external studies, and a partial
    result of it is not mixed with a quick one."""
    quick = plan_for(BenchOptions(out=tmp_path, quick=True))
    medium = medium_plan(seeds=(0, 1))
    assert medium.size == "medium" and medium.seeds == (0, 1) and medium.strategies == ("fedavg",)
    # the federation spends its 12 epochs as one-epoch rounds (many short rounds drifted less than 4 long ones)
    assert (medium.rounds, medium.local_epochs) == (12, 1)
    # ... and is scored at half of them too (is an arm still improving at the budget?)
    assert medium.score_at == (6,) and medium_plan(rounds=5, local_epochs=2).score_at == (4,)
    assert medium_plan(rounds=1).score_at == () and medium_plan(score_at=()).score_at == ()
    assert medium.run_config["input-size"] == "32,32,32" and quick.run_config["input-size"] == "16,16,16"
    assert medium.site_images == (64, 6.0, 5.0) and medium.external_small is False
    record = plan_record_of(medium)
    assert record["site_images"] == [64, 6.0, 5.0] and record["external_small"] is False
    assert plan_record_of(quick)["site_images"] is None and plan_record_of(quick)["external_small"] is True
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(quick), "per_seed": {}}))
    with pytest.raises(ValueError, match="site_images"):
        load_partial(tmp_path / PARTIAL_NAME, record)


def test_a_weaker_randomisation_is_its_own_plan_and_a_bad_strength_is_refused(tmp_path):
    """``--randomisation S`` (issue #20.1's difficulty knob): recorded with the plan, so a partial result of another
    strength is not continued; a strength outside (0, 1] is refused by name."""
    full, weak = medium_plan(), medium_plan(randomisation=0.3)
    assert plan_record_of(full)["randomisation"] == 1.0 and plan_record_of(weak)["randomisation"] == 0.3
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(full), "per_seed": {}}))
    with pytest.raises(ValueError, match="randomisation"):
        load_partial(tmp_path / PARTIAL_NAME, plan_record_of(weak))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="randomisation must be a strength"):
            medium_plan(randomisation=bad)


def test_the_scoring_views_are_part_of_the_plan(tmp_path):
    """Arms are scored as the run config evaluates (test-time flips, default one view): a partial result scored
    with another setting is not continued; one from before the setting (no such key) was scored with one view."""
    flips, one_view = medium_plan(run_config={"test-time-flips": "0"}), medium_plan()
    assert plan_record_of(flips)["test_time_flips"] == "0" and plan_record_of(one_view)["test_time_flips"] == ""
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(one_view), "per_seed": {}}))
    with pytest.raises(ValueError, match="test_time_flips"):
        load_partial(tmp_path / PARTIAL_NAME, plan_record_of(flips))
    older = {k: v for k, v in plan_record_of(one_view).items() if k != "test_time_flips"}
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": older, "per_seed": {}}))
    assert load_partial(tmp_path / PARTIAL_NAME, plan_record_of(one_view)) == ({}, {})
    with pytest.raises(ValueError, match="test_time_flips"):
        load_partial(tmp_path / PARTIAL_NAME, plan_record_of(flips))


def test_a_longer_budget_is_its_own_plan_and_the_sites_admit_it(tmp_path):
    """``--rounds R --local-epochs E``: the budget is part of the plan record (a partial result of another budget is
    not continued), and the benchmark's sites admit the pooled and local arms' R x E epochs in one call, which a
    site's default limit of 20 local epochs per round refuses."""
    from bench.quality import _site_configs
    from fl_client.limits import SiteLimitError, SiteLimits

    long = medium_plan(rounds=20, local_epochs=5, patients_per_site=100)
    assert long.rounds * long.local_epochs == 100 and long.patients_per_site == 100
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(medium_plan()), "per_seed": {}}))
    with pytest.raises(ValueError, match="rounds|local_epochs"):
        load_partial(tmp_path / PARTIAL_NAME, plan_record_of(long))
    (tmp_path / "data" / "site-0").mkdir(parents=True)
    site = _site_configs(tmp_path / "data", tmp_path / "work", epochs_budget=100)["site-0"]
    assert site.limits.max_local_epochs == 100
    site.limits.check(input_size=(32, 32, 32), spacing_mm=(10.0, 10.0, 10.0), local_epochs=100, batch_size=4)
    default = _site_configs(tmp_path / "data", tmp_path / "work")["site-0"]
    assert default.limits == SiteLimits()
    with pytest.raises(SiteLimitError, match="FEDCT_MAX_LOCAL_EPOCHS"):
        default.limits.check(input_size=(32, 32, 32), spacing_mm=(10.0, 10.0, 10.0), local_epochs=100, batch_size=4)


def test_run_config_overrides_are_part_of_the_plan_and_an_unknown_key_is_refused_before_anything_runs(tmp_path):
    """``--run-config KEY=VALUE`` (e.g. a lung window, ``hu-max=-200``): it overrides the medium size's own run config
    for every arm, a partial result of the default plan is not continued under it, and a key the server's config does
    not know is refused by name before data is written."""
    from bench.quality import main

    lung = medium_plan(run_config={"hu-max": "-200"})
    assert lung.run_config["hu-max"] == "-200" and lung.run_config["input-size"] == "32,32,32"
    assert "hu-max" not in medium_plan().run_config
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(medium_plan()), "per_seed": {}}))
    with pytest.raises(ValueError, match="run_config"):
        load_partial(tmp_path / PARTIAL_NAME, plan_record_of(lung))
    with pytest.raises(ValueError, match="unknown run config key 'no-such-key'"):
        main(["--medium", "--run-config", "no-such-key=1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "work").exists()
    with pytest.raises(SystemExit):
        main(["--medium", "--run-config", "hu-max", "--out", str(tmp_path / "out")])


def test_federated_local_epochs_are_their_own_plan_and_reach_the_federated_runs_only(tmp_path):
    """``--federated-local-epochs N``: the federated arms' rounds of N local epochs (e.g. one per site, the pooled
    arm's sequential steps per round) while the pooled and local arms keep rounds x local epochs; recorded with the
    plan (a partial result of another value is not continued), admitted by the sites, and a bad value refused."""
    from bench.quality import _server_config, main

    plan = medium_plan(rounds=40, federated_local_epochs=3)
    assert plan.fed_local_epochs == 3 and plan.rounds * plan.local_epochs == 40 and plan.score_at == (20,)
    assert medium_plan(rounds=40).fed_local_epochs == 1
    config = _server_config(plan, seed=0, run_dir=tmp_path / "run", strategy="fedavg")
    assert config.local_epochs == 3 and config.num_server_rounds == 40
    assert _server_config(medium_plan(), seed=0, run_dir=tmp_path / "run", strategy="fedavg").local_epochs == 1
    record = plan_record_of(plan)
    assert record["federated_local_epochs"] == 3 and plan_record_of(medium_plan())["federated_local_epochs"] == 1
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": plan_record_of(medium_plan(rounds=40)), "per_seed": {}}))
    with pytest.raises(ValueError, match="federated_local_epochs: 1 there, 3 here"):
        load_partial(tmp_path / PARTIAL_NAME, record)
    # a partial result written before the option existed was one of rounds of the plan's own local epochs
    older = {k: v for k, v in plan_record_of(medium_plan(rounds=40)).items() if k != "federated_local_epochs"}
    (tmp_path / PARTIAL_NAME).write_text(json.dumps({"plan": older, "per_seed": {}}))
    assert load_partial(tmp_path / PARTIAL_NAME, plan_record_of(medium_plan(rounds=40))) == ({}, {})
    with pytest.raises(ValueError, match="federated_local_epochs"):
        load_partial(tmp_path / PARTIAL_NAME, record)
    with pytest.raises(ValueError, match="federated local epochs must be >= 1, got 0"):
        medium_plan(federated_local_epochs=0)
    with pytest.raises(ValueError, match="federated local epochs must be >= 1, got 0"):
        main(["--medium", "--federated-local-epochs", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_external_family_size_is_a_plan_setting_and_another_size_replaces_the_family(tmp_path):
    """``--external-studies N``: the external family's size is recorded with the plan and checked; a family written
    for another size is removed with its ingestion before the new one is written (no leftover studies)."""
    from bench.quality import external_family, main

    assert medium_plan().external_studies == 96 and medium_plan(external_studies=24).external_studies == 24
    assert plan_record_of(medium_plan(external_studies=24))["external_studies"] == 24
    with pytest.raises(ValueError, match="external studies must be >= 3"):
        medium_plan(external_studies=2)
    with pytest.raises(ValueError, match="external studies must be >= 3"):
        main(["--medium", "--external-studies", "1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    root, work = tmp_path / "external", tmp_path / "external-site"
    family = external_family(root, work, studies=6, small=True)
    assert len(list(family.dicom_dir.iterdir())) == 6
    (work / "cache").mkdir(parents=True)  # an ingestion of this family
    marker = (root / "family.json").stat().st_mtime_ns
    external_family(root, work, studies=6, small=True)  # same settings: reused as it is
    assert (root / "family.json").stat().st_mtime_ns == marker and (work / "cache").is_dir()
    family = external_family(root, work, studies=3, small=True)
    assert sorted(p.name for p in family.dicom_dir.iterdir()) == ["case-001", "case-002", "case-003"]
    assert len(family.labels_csv.read_text().splitlines()) == 1 + 3 and not work.exists()
