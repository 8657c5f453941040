"""The out-of-distribution reference (fl_server.ood) in a real Flower simulation (Ray backend) on tiny synthetic sites.

After the last round the server gathers the sites' feature moments, then their distance histograms; the reference is
in both bundles and metrics.json, the sites sent aggregates only (recorded by an outer client mod, i.e. what left
them), a run whose privacy floor is above every site's study count gets nothing and writes bundles without a
reference. ``fedct predict`` with the bundle flags a study of the independent external generator and not the sites'
own studies. Also the reply gate's good and bad cases.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fedct.protocol import (
    CONFIG_RECORD,
    OOD_COUNT,
    OOD_STATISTICS,
    OOD_SUM,
    OOD_SUMSQ,
    OOD_TRAIN_LOG,
    OOD_VAL_LOG,
)
from fl_client.client_app import build_client_app
from fl_server.config import ServerConfig
from fl_server.ood import screen_distances_reply, screen_moments_reply
from fl_server.rounds import run_federation
from fl_server.strategy import build_strategy
from fl_server.validation import ReplyRejected
from models.ood import bundle_ood

SPLIT = {"val-fraction": 0.3, "test-fraction": 0.3}
#: 20 patients per site (with the generator's extra studies: 30 training + validation studies in all).
PATIENTS = 20


def _recording_mod(folder: Path):
    """Outer client mod: every reply to a feature statistics request, as it leaves the site, into ``folder/<phase>``
    (``folder/phase`` names the run the ServerApp is in: the sites run in other processes)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        config = msg.content[CONFIG_RECORD] if CONFIG_RECORD in msg.content else {}
        if OOD_STATISTICS in config and reply.has_content():
            phase = (folder / "phase").read_text().strip()
            out = folder / phase
            out.mkdir(parents=True, exist_ok=True)
            records = {name: dict(record.items()) for name, record in reply.content.items()}
            partition = context.node_config["partition-id"]
            (out / f"{config[OOD_STATISTICS]}-{partition}.json").write_text(json.dumps(records, default=list))
        return reply

    return mod


def _simulate(root: Path, name: str, config: dict, *, site_floor: int | None = None) -> None:
    """One federation ``name`` in a Flower simulation of two sites; ``site_floor``: the sites' own privacy floor."""
    from flwr.serverapp import ServerApp

    sent = root / "sent"
    sent.mkdir(exist_ok=True)
    (sent / "phase").write_text(name)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_config = {
            **TINY_RUN_CONFIG,
            **SPLIT,
            "num-server-rounds": 1,
            "min-sites": 2,
            "run-dir": str(root / "runs" / name),
            **config,
        }
        server_config = ServerConfig.from_run_config(run_config)
        run_federation(grid, server_config, build_strategy(server_config))

    overrides = {"sim-data-root": str(root / "data"), "sim-work-root": str(root / "work")}
    if site_floor is not None:
        overrides["metrics-min-count"] = site_floor
    run_simulation(
        server_app=app,
        client_app=build_client_app(overrides, outer_mods=[_recording_mod(sent)]),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    tiny_federation(root / "data", sites=2, patients_per_site=PATIENTS, seed=3)
    _simulate(root, "reference", {"num-server-rounds": 2})
    return root


@pytest.fixture(scope="module")
def floor_run(runs):
    """The same sites with a privacy floor above any site's study count: nothing may leave them."""
    _simulate(runs, "floor", {"metrics-min-count": 2 * PATIENTS}, site_floor=2 * PATIENTS)
    return runs


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "metrics.json").read_text())


def _meta(root: Path, name: str, bundle: str) -> dict:
    return json.loads((root / "runs" / name / "model" / bundle / "model.json").read_text())


def test_the_reference_is_pooled_from_both_sites_into_metrics_and_bundles(runs):
    ood = _metrics(runs, "reference")["ood"]
    final = ood["final"]
    assert final["sites"] == ["site-0", "site-1"] and final["reference_studies"] == 30
    assert final["features"] == 64 and final["quantile"] == 0.99 and final["threshold"] > 0
    assert final["validation_studies"] == 14 and final["training_studies"] == 16
    # under the fit of the same 14 studies the 99 % prediction bound leaves n * P(t > t_{0.99, 13} * sqrt(1 + 1/14)) = 0.04
    assert final["validation_above_expected"] == pytest.approx(0.04, abs=0.01)
    assert 0 <= final["training_above_expected"] <= 16
    assert final["rejected_replies"] == [] and final["missing_replies"] == []
    for bundle in ("best", "final"):
        meta = _meta(runs, "reference", bundle)
        reference = bundle_ood(meta)
        assert reference is not None and len(reference.mean) == 64
        assert reference.threshold == ood[bundle]["threshold"]
        assert meta["ood"]["training_above_expected"] == ood[bundle]["training_above_expected"]
        card = (runs / "runs" / "reference" / "model" / bundle / "model_card.md").read_text()
        assert "## Unusual inputs" in card and f"{reference.threshold:.2f}" in card


def test_the_sites_sent_only_aggregates(runs):
    moments = [json.loads(p.read_text())["metrics"] for p in sorted((runs / "sent" / "reference").glob("moments-*"))]
    assert len(moments) == 2
    for m in moments:  # a count of >= k studies, and F sums / sums of squares: nothing per study
        assert set(m) == {OOD_COUNT, OOD_SUM, OOD_SUMSQ} and m[OOD_COUNT] >= 5
        assert len(m[OOD_SUM]) == len(m[OOD_SUMSQ]) == 64
    assert sum(m[OOD_COUNT] for m in moments) == 30
    distances = [json.loads(p.read_text()) for p in sorted((runs / "sent" / "reference").glob("distances-*"))]
    assert len(distances) == 2
    for reply in distances:
        assert set(reply) == {"metrics", "site"}
        m = reply["metrics"]
        assert set(m) == {OOD_VAL_LOG, OOD_TRAIN_LOG}
        assert all(len(m[key]) == 3 and m[key][0] >= 5 for key in m)  # [studies >= k, sum, sum of squares]


def test_below_the_floor_a_site_sends_nothing_and_the_bundles_carry_no_reference(floor_run):
    runs = floor_run
    sent = [json.loads(p.read_text())["metrics"] for p in sorted((runs / "sent" / "floor").glob("*.json"))]
    assert len(sent) == 2 and all(m == {OOD_COUNT: 0} for m in sent)  # only the count 0
    assert not list((runs / "sent" / "floor").glob("distances-*"))  # and no distances request followed
    final = _metrics(runs, "floor")["ood"]["final"]
    assert final["threshold"] is None and "privacy floor" in final["reason"]
    meta = _meta(runs, "floor", "final")
    assert "ood" not in meta and bundle_ood(meta) is None
    assert "Unusual inputs" not in (runs / "runs" / "floor" / "model" / "final" / "model_card.md").read_text()


def test_predict_flags_the_external_generator_but_not_the_sites_studies(runs, tmp_path):
    from inference.predict import run_predict
    from synthetic.external import write_external_family

    bundle = runs / "runs" / "reference" / "model" / "final"
    own = run_predict(bundle, runs / "data" / "site-0" / "dicom", tmp_path / "own", progress=False)
    write_external_family(tmp_path / "external", studies=4, small=True, seed=1)
    other = run_predict(bundle, tmp_path / "external" / "dicom", tmp_path / "other", progress=False)
    own_d = sorted(r.out_of_distribution["distance"] for r in own.results)
    other_d = sorted(r.out_of_distribution["distance"] for r in other.results)
    threshold = own.results[0].out_of_distribution["threshold"]
    print(f"threshold {threshold:.3f}; site-0 distances {own_d}; external distances {other_d}")
    assert len(own.results) >= PATIENTS and len(other.results) == 4
    # The threshold is a 99 % prediction bound fitted to 14 validation studies of a 2-round model at 16^3 voxels, whose
    # features differ from run to run (Ray is not bit-reproducible). Recorded runs: thresholds 1.98-4.3; site-0's
    # distances up to 2.0-4.6 (0-3 of 24 above a plug-in 99th percentile; 0, 0, 0, 2 and 3 of 24 above the prediction
    # bound in five runs: 14 validation studies of so small a model do not fix the tail), the external generator's
    # 4.5-42 (its closest 1.0-6 times the threshold).
    flagged_own = sum(r.out_of_distribution["flagged"] for r in own.results)
    assert flagged_own <= 4  # at most a sixth of the site's own 24 studies (training, validation and test)
    flagged_other = [r for r in other.results if r.out_of_distribution["flagged"]]
    assert len(flagged_other) >= 3  # at least 3 of the 4 studies of the independent generator
    assert np.median(other_d) > max(threshold, 5 * np.median(own_d))  # recorded: 10-20 times the own median
    # the words reach every page: report, prediction.json, summary, SR and secondary captures
    study = tmp_path / "other" / flagged_other[0].study_key
    assert "Unusual input: this study looks unlike" in (study / "report.html").read_text()
    assert json.loads((study / "prediction.json").read_text())["out_of_distribution"]["flagged"] is True
    summary = json.loads((tmp_path / "other" / "summary.json").read_text())
    assert sum(r["unusual_input"] for r in summary["results"]) == len(flagged_other)
    if (study / "sr.dcm").is_file():
        import highdicom as hd
        import pydicom
        from highdicom.sr.utils import find_content_items

        sr = hd.sr.srread(study / "sr.dcm")
        texts = {
            item.name.value: item.value
            for item in find_content_items(sr, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True)
        }
        assert texts["UNUSUAL-INPUT"].startswith("Unusual input: this study looks unlike")
        sc = pydicom.dcmread(next(study.glob("sc_*.dcm")))
        assert "Unusual input" in str(sc.ImageComments)
    clean = tmp_path / "own" / own.results[0].study_key
    if not own.results[0].out_of_distribution["flagged"]:
        assert "Unusual input" not in (clean / "report.html").read_text()


# --- the reply gate --------------------------------------------------------------------------------------------------


def _reply(metrics: dict, name: str = "site-a") -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name})})


def _moments(n=10, width=4, **extra):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, width))
    return {OOD_COUNT: n, OOD_SUM: f.sum(0).tolist(), OOD_SUMSQ: (f * f).sum(0).tolist(), **extra}


def _code(call) -> str:
    with pytest.raises(ReplyRejected) as info:
        call()
    return info.value.problem.code


def test_moments_replies_pass_or_are_rejected_with_a_reason():
    kw = {"node_id": 1, "registry": None, "width": 4, "min_count": 5, "count_bound": 100}
    screened, (n, total, squares) = screen_moments_reply(_reply(_moments()), **kw)
    assert screened.site == "site-a" and n == 10 and total.shape == squares.shape == (4,)
    assert screen_moments_reply(_reply({OOD_COUNT: 0}), **kw)[1] is None
    bad = {
        "below the floor": _moments(n=3),
        "above the bound": {**_moments(), OOD_COUNT: 1000},
        "wrong width": _moments(width=3),
        "count 0 with sums": {**_moments(), OOD_COUNT: 0},
        "inconsistent": {**_moments(), OOD_SUMSQ: [0.0] * 4, OOD_SUM: [5.0] * 4},
        "extra key": _moments(**{"ood-study": 1.0}),
        "not a whole count": {**_moments(), OOD_COUNT: 9.5},
    }
    for what, metrics in bad.items():
        assert _code(lambda m=metrics: screen_moments_reply(_reply(m), **kw)) == "bad_ood_statistics", what
    extra = _reply(_moments())
    extra["arrays"] = ConfigRecord({"x": 1})
    assert _code(lambda: screen_moments_reply(extra, **kw)) == "malformed_reply"
    assert _code(lambda: screen_moments_reply(_reply(_moments(), name="../x"), **kw)) == "bad_site_name"


def test_distance_replies_pass_or_are_rejected_with_a_reason():
    kw = {"node_id": 1, "registry": None, "min_count": 5, "count_bound": 100}
    good = [8.0, 1.2, 0.5]
    screened, value = screen_distances_reply(_reply({OOD_VAL_LOG: good, OOD_TRAIN_LOG: []}), **kw)
    assert value[OOD_VAL_LOG] == good and value[OOD_TRAIN_LOG] == [] and screened.metrics[f"{OOD_VAL_LOG}-n"] == 8
    for what, metrics in {
        "below the floor": {OOD_VAL_LOG: [2.0, 0.1, 0.1], OOD_TRAIN_LOG: []},
        "above the bound": {OOD_VAL_LOG: [200.0, 0.1, 0.1], OOD_TRAIN_LOG: []},
        "inconsistent": {OOD_VAL_LOG: [8.0, 8.0, 0.1], OOD_TRAIN_LOG: []},
        "short": {OOD_VAL_LOG: good[:2], OOD_TRAIN_LOG: []},
        "missing key": {OOD_VAL_LOG: good},
        "not finite": {OOD_VAL_LOG: [8.0, float("nan"), 0.5], OOD_TRAIN_LOG: []},
    }.items():
        assert _code(lambda m=metrics: screen_distances_reply(_reply(m), **kw)) == "bad_ood_statistics", what
