"""Federated learning learns (issue #20.6): a short FedAvg run in Flower's simulation engine on an easy task.

One real simulation (Ray backend, fedct's ClientApp on tiny synthetic DICOM sites, fedct's round loop on the server)
with a FedAvg that records, on the way, the replies it is given (their arrays and example counts, as the sites sent
them). Checked afterwards:

- the validation loss (diagnosis cross-entropy only: the prognosis weight is 0) ends below chance, ln 3, by a
  margin, and below the initial model's (the server's round-0 checkpoint), both scored by fedct's evaluation at every
  site (``fl_client.train.evaluate_round``) and weighted over sites as the server does (``fl_server.run_log.aggregate``);
  the server's own record of the last round agrees;
- every round's global model (the server's checkpoint) is Σ nᵢ wᵢ / Σ nᵢ of that round's recorded replies,
  computed here independently with numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from federation import TINY_RUN_CONFIG
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fl_client.client_app import build_client_app
from fl_server.config import ServerConfig
from fl_server.rounds import run_federation
from fl_server.strategy import build_strategy

SITES = 3
ROUNDS = 10
RUN_CONFIG = {
    **TINY_RUN_CONFIG,
    "val-fraction": 0.3,
    "test-fraction": 0.2,
    "num-server-rounds": ROUNDS,
    "local-epochs": 4,
    "input-size": "24,24,16",
    "learning-rate": 0.01,
    "target-spacing-mm": "10.0,10.0,10.0",
    "min-sites": SITES,
    "loss-weight-prognosis": 0.0,  # val-loss is then the diagnosis cross-entropy, whose chance level is ln 3
    "seed": 1,
}
BALANCED = (1 / 3, 1 / 3, 1 / 3)
#: The final validation loss must lie this far below ln 3 (chance for three classes).
MARGIN = 0.1


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping per round the replies it aggregates: ``{name: array}`` and ``num-examples``."""

    def __init__(self, inner: FedAvg, log: dict[int, list[tuple[dict[str, np.ndarray], float]]]) -> None:
        super().__init__(
            fraction_train=inner.fraction_train,
            fraction_evaluate=inner.fraction_evaluate,
            min_train_nodes=inner.min_train_nodes,
            min_evaluate_nodes=inner.min_evaluate_nodes,
            min_available_nodes=inner.min_available_nodes,
            train_metrics_aggr_fn=inner.train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=inner.evaluate_metrics_aggr_fn,
        )
        self.log = log

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        recorded = []
        for reply in replies:
            [arrays] = reply.content.array_records.values()
            [metrics] = reply.content.metric_records.values()
            recorded.append(
                ({k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}, float(metrics["num-examples"]))
            )
        self.log[server_round] = recorded
        return super().aggregate_train(server_round, replies)


def easy_federation(root: Path) -> Path:
    """An easy task: the default sites (vendor, size) with balanced classes and 48x48 images of 8 mm pixels and slices
    and little noise (5 HU), the canonical phantom (no per-study domain randomisation, no label noise: issue #20.1's
    harder data is the benchmarks' business), so that a short run learns the diagnosis reliably.

    With the default sites' skewed class mixes the final validation loss of this run ranged 0.54-1.01 over repeated
    runs (the pseudonym keys, hence the splits, are drawn anew at every ingestion) and sometimes missed ln 3 - 0.1;
    with balanced classes and 4 local epochs it ranged 0.43-0.62."""
    from dataclasses import replace

    from synthetic.hospitals import default_profiles, write_federation

    profiles = [
        replace(
            p,
            rows=48,
            pixel_spacing_mm=8.0,
            slice_thickness_mm=8.0,
            noise_hu=5.0,
            class_prevalence=BALANCED,
            domain_randomisation=False,
            label_noise=0.0,
        )
        for p in default_profiles(SITES)
    ]
    write_federation(root, sites=SITES, patients_per_site=24, seed=5, profiles=profiles)
    return root


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedlearn")
    easy_federation(root / "data")
    run_dir = root / "runs" / "fedavg"
    config = ServerConfig.from_run_config({**RUN_CONFIG, "run-dir": str(run_dir)})
    log: dict[int, list] = {}

    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = build_strategy(config)
        assert type(strategy) is FedAvg  # the default strategy is what this test records
        run_federation(grid, config, RecordingFedAvg(strategy, log))

    run_simulation(
        server_app=app,
        client_app=build_client_app({"sim-data-root": str(root / "data"), "sim-work-root": str(root / "work")}),
        num_supernodes=SITES,
        backend_config=simulation_backend_config(),
    )
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), log


def _val_loss(root: Path, run_dir: Path, server_round: int) -> float:
    """Validation loss of the server's checkpoint of ``server_round`` at every site, weighted as the server weighs it."""
    from fl_client.config import SiteConfig
    from fl_client.train import evaluate_round
    from fl_server.run_log import aggregate

    config = ServerConfig.from_run_config({**RUN_CONFIG, "run-dir": str(run_dir)})
    settings = config.round_settings(server_round)
    state = torch.load(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)
    sites = sorted(p.name for p in (root / "data").iterdir() if (p / "dicom").is_dir())
    per_site = {
        name: evaluate_round(
            SiteConfig(
                site_name=name,
                dicom_dir=root / "data" / name / "dicom",
                site_dir=root / "work" / name,
                labels_csv=root / "data" / name / "labels.csv",
                device="cpu",
            ),
            settings,
            state,
        )
        for name in sites
    }
    value = aggregate(per_site).get("val-loss")
    assert value is not None and math.isfinite(value), f"round {server_round}: no validation loss in {per_site}"
    return float(value)


def test_federated_run_ends_below_chance_and_below_round_zero(learned):
    run_dir, metrics, _ = learned
    root = run_dir.parent.parent
    first, last = _val_loss(root, run_dir, 0), _val_loss(root, run_dir, ROUNDS)
    assert last < math.log(3) - MARGIN, f"final validation loss {last:.3f} is not below ln 3 - {MARGIN}"
    assert last < first, f"final validation loss {last:.3f} is not below round 0's {first:.3f}"
    [final] = [r for r in metrics["rounds"] if r["round"] == ROUNDS]
    reported = final["evaluate"]["aggregate"].get("val-loss")
    assert reported is not None and abs(reported - last) < 1e-3, (
        f"server recorded {reported}, sites' evaluation gives {last}"
    )


def test_each_global_model_is_the_example_weighted_mean_of_the_recorded_replies(learned):
    run_dir, _, log = learned
    assert sorted(log) == list(range(1, ROUNDS + 1))
    for server_round, replies in log.items():
        assert len(replies) == SITES and all(n > 0 for _, n in replies)
        total = sum(n for _, n in replies)
        global_state = torch.load(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)
        assert set(global_state) == set(replies[0][0])
        for name, value in global_state.items():
            expected = sum(n * arrays[name].astype(np.float64) for arrays, n in replies) / total
            got = value.numpy()
            if got.dtype.kind in "iub":
                np.testing.assert_array_equal(
                    got, np.rint(expected).astype(got.dtype), err_msg=f"round {server_round} {name}"
                )
            else:
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"round {server_round} {name}")
        # the replies differ (real local training), so the check above is not satisfied by any one of them
        first = next(k for k, v in replies[0][0].items() if v.dtype.kind == "f")
        assert not all(np.array_equal(replies[0][0][first], arrays[first]) for arrays, _ in replies[1:])


def test_a_plain_mean_would_differ_when_sites_hold_different_counts(learned):
    """Guards the check above: with unequal counts the unweighted mean is not what the server kept."""
    run_dir, _, log = learned
    replies = log[1]
    counts = [n for _, n in replies]
    if len(set(counts)) == 1:
        pytest.fail(f"the test federation should give the sites different training counts, got {counts}")
    global_state = torch.load(run_dir / "checkpoints" / "round-001.pt", weights_only=True)
    name = next(k for k, v in global_state.items() if v.is_floating_point() and v.numel() > 10)
    plain = np.mean([arrays[name] for arrays, _ in replies], axis=0)
    assert not np.allclose(global_state[name].numpy(), plain, rtol=1e-6, atol=1e-7)
