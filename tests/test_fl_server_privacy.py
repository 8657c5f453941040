"""Differential privacy: settings checked before the run, the accountant, and real Flower simulations with
Flower's DP wrappers (server-side fixed clipping; client-side adaptive clipping with Flower's mod at the sites)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.simulation import run_simulation
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedct.demo import simulation_backend_config
from fedct.transport import decode_content
from fl_client.client_app import build_client_app
from fl_server.config import ServerConfig
from fl_server.privacy import PrivacyConfig, SiteLevelAccountant, privacy_summary, round_privacy, wrap_strategy
from fl_server.server_app import build_server_app
from fl_server.strategy import load_strategy_state, strategy_state
from models.bundle import load_bundle

DP_RUN = {**TINY_RUN_CONFIG, "model-norm": "group", "min-sites": 2}


# --- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dp-mode": "server-fixed", "dp-clipping-norm": 1.0}, "dp-noise-multiplier"),
        ({"dp-mode": "server-fixed", "dp-noise-multiplier": -1.0, "dp-clipping-norm": 1.0}, "dp-noise-multiplier"),
        ({"dp-mode": "client-fixed", "dp-noise-multiplier": 1.0}, "dp-clipping-norm"),
        ({"dp-mode": "server-fixed", "dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "dp-delta": 1.0}, "dp-delta"),
        ({"dp-mode": "server-fixed", "dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "dp-delta": 0.0}, "dp-delta"),
        ({"dp-mode": "gaussian"}, "dp-mode"),
        ({"dp-mode": "server-fixed", "dp-noise-multiplier": math.nan, "dp-clipping-norm": 1.0}, "dp-noise-multiplier"),
        # Flower's adaptive clipping needs noise < 2 * clipped-count stddev, by default sampled sites / 20.
        (
            {"dp-mode": "server-adaptive", "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.1},
            "dp-clipped-count-stddev",
        ),
        (
            {
                "dp-mode": "client-adaptive",
                "dp-noise-multiplier": 1.0,
                "dp-clipping-norm": 0.1,
                "dp-target-quantile": 1.5,
            },
            "dp-target-quantile",
        ),
    ],
)
def test_dp_without_needed_or_with_nonsense_parameters_fails_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        ServerConfig.from_run_config({**DP_RUN, **overrides})


def test_client_side_dp_refuses_lossy_transport():
    with pytest.raises(ValueError, match="transport"):
        ServerConfig.from_run_config(
            {
                **DP_RUN,
                "dp-mode": "client-fixed",
                "dp-noise-multiplier": 1.0,
                "dp-clipping-norm": 1.0,
                "transport": "float16",
            }
        )
    ServerConfig.from_run_config(
        {
            **DP_RUN,
            "dp-mode": "server-fixed",
            "dp-noise-multiplier": 1.0,
            "dp-clipping-norm": 1.0,
            "transport": "float16",
        }
    )


def test_dp_refuses_batchnorm_models():
    with pytest.raises(ValueError, match="model-norm"):
        ServerConfig.from_run_config(
            {
                **DP_RUN,
                "model-norm": "batch",
                "dp-mode": "server-fixed",
                "dp-noise-multiplier": 1.0,
                "dp-clipping-norm": 1.0,
            }
        )


def test_dp_refuses_non_mean_strategies():
    config = PrivacyConfig(dp_mode="server-fixed", dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
    with pytest.raises(ValueError, match="strategy"):
        config.check_run(min_sites=3, model_norm="group", strategy="fedmedian")
    with pytest.raises(ValueError, match="FedAvg"):
        wrap_strategy(FedMedian(), config, expected_sites=3)


def test_adaptive_dp_with_enough_count_noise_is_accepted():
    config = ServerConfig.from_run_config(
        {
            **DP_RUN,
            "dp-mode": "client-adaptive",
            "dp-noise-multiplier": 1.0,
            "dp-clipping-norm": 0.1,
            "dp-clipped-count-stddev": 1.0,
        }
    )
    assert config.privacy.dp_enabled and config.privacy.clipped_count_stddev(2) == 1.0


def test_dp_off_leaves_the_strategy_alone_and_defaults_are_off():
    strategy = FedAvg()
    assert wrap_strategy(strategy, ServerConfig().privacy, expected_sites=2) is strategy
    assert strategy.weighted_by_key == "num-examples"


# --- accountant -----------------------------------------------------------------------------------------------------


def test_accountant_matches_dp_accountings_known_gaussian_value():
    # dp-accounting's own test (rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian): one Gaussian release
    # with noise multiplier 4.530877117 (no subsampling) is exactly (1, 1e-6)-DP.
    accountant = SiteLevelAccountant(noise_multiplier=4.530877117, delta=1e-6)
    entry = accountant.compose_round(1, sampled=3, available=3, clipping_norm=1.0)
    assert entry.sampling_rate == 1.0
    assert entry.epsilon == pytest.approx(1.0, abs=1e-3)


def _dp_accounting_epsilon(noise: float, *, rate: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` releases of a Gaussian mechanism, Poisson-subsampled at ``rate`` (none at 1.0), straight from
    Google's dp-accounting RDP accountant (independent of fedct's and Flower's accountant code)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise)
    if rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("noise", "sampled", "available", "rounds"), [(1.0, 4, 4, 5), (0.8, 2, 4, 10), (2.0, 3, 10, 30)]
)
def test_epsilon_equals_dp_accountings_with_and_without_subsampling(noise, sampled, available, rounds):
    accountant = SiteLevelAccountant(noise_multiplier=noise, delta=1e-5)
    for r in range(1, rounds + 1):
        entry = accountant.compose_round(r, sampled=sampled, available=available, clipping_norm=1.0)
    expected = _dp_accounting_epsilon(noise, rate=sampled / available, rounds=rounds, delta=1e-5)
    assert entry.epsilon == pytest.approx(expected, rel=1e-3)
    if sampled < available:  # subsampling is really accounted for: without it ε would be clearly larger
        assert _dp_accounting_epsilon(noise, rate=1.0, rounds=rounds, delta=1e-5) > 1.2 * entry.epsilon


def test_epsilon_grows_with_rounds_and_shrinks_with_sampling():
    everyone = SiteLevelAccountant(noise_multiplier=1.0, delta=1e-5)
    eps = [everyone.compose_round(r, sampled=4, available=4, clipping_norm=1.0).epsilon for r in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    half = SiteLevelAccountant(noise_multiplier=1.0, delta=1e-5)
    eps_half = [half.compose_round(r, sampled=2, available=4, clipping_norm=1.0).epsilon for r in (1, 2, 3)]
    assert all(h < e for h, e in zip(eps_half, eps, strict=True))
    assert half.summary()["epsilon"] == eps_half[-1] and half.summary()["releases"] == 3


def test_the_accountant_survives_a_resume_through_the_strategy_state():
    config = PrivacyConfig(dp_mode="server-fixed", dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
    reference = SiteLevelAccountant(noise_multiplier=1.0, delta=config.dp_delta)
    eps = [reference.compose_round(r, sampled=2, available=3, clipping_norm=1.0).epsilon for r in (1, 2)]
    before = wrap_strategy(FedAvg(), config, expected_sites=2)
    before.privacy_ledger = reference.ledger()  # what two aggregated rounds leave on the wrapper
    scalars, arrays = strategy_state(before)  # fl_server.strategy's resume state
    after = wrap_strategy(FedAvg(), config, expected_sites=2)
    assert round_privacy(after, 2)["dp-releases"] == 0
    load_strategy_state(after, scalars, arrays)
    assert round_privacy(after, 2)["dp-epsilon"] == pytest.approx(eps[1])
    assert privacy_summary(after)["releases"] == 2


def test_fewer_available_sites_never_understate_the_sampling_rate():
    accountant = SiteLevelAccountant(noise_multiplier=1.0, delta=1e-5)
    accountant.compose_round(1, sampled=2, available=5, clipping_norm=1.0)
    entry = accountant.compose_round(2, sampled=2, available=3, clipping_norm=1.0)  # two sites went offline
    assert entry.sampling_rate >= 2 / 3
    with pytest.raises(ValueError, match="sampled"):
        accountant.compose_round(3, sampled=4, available=3, clipping_norm=1.0)


# --- real simulations -----------------------------------------------------------------------------------------------


def recording_mod(folder: Path):
    """Client mod (inside the privacy mods) saving every training reply's weights per site and round."""

    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error() and "arrays" in reply.content:
            rnd = int(msg.content["config"]["server-round"])
            site = str(reply.content["site"]["name"])
            arrays = decode_content(reply.content)["arrays"]  # packed weights (fedct.transport) or per tensor
            np.savez(
                folder / f"{site}-round{rnd}.npz", **dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
            )
        return reply

    return mod


def _simulate(root: Path, run_dir: Path, server_config: dict, replies: Path, **site_overrides) -> None:
    site_config = {
        "sim-data-root": str(root / "data"),
        "sim-work-root": str(root / "sites"),
        **{k: v for k, v in server_config.items() if k.startswith("dp-")},
        **site_overrides,
    }
    replies.mkdir(parents=True, exist_ok=True)
    run_simulation(
        server_app=build_server_app({**server_config, "run-dir": str(run_dir)}),
        client_app=build_client_app(site_config, mods=[recording_mod(replies)]),
        num_supernodes=2,
        backend_config=simulation_backend_config(),
    )


NOISE, CLIP = 1.0, 0.05


@pytest.fixture(scope="module")
def server_fixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    tiny_federation(root / "data", sites=2, patients_per_site=8)
    config = {
        **DP_RUN,
        "num-server-rounds": 2,
        "dp-mode": "server-fixed",
        "dp-noise-multiplier": NOISE,
        "dp-clipping-norm": CLIP,
        "dp-delta": 1e-4,
    }
    _simulate(root, root / "run", config, root / "replies")
    return root / "run", root / "replies"


def test_epsilon_of_every_round_is_in_metrics_json_and_grows(server_fixed_run):
    run_dir, _ = server_fixed_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    eps = [r["privacy"]["dp-epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]
    # Both sites sampled every round: r composed Gaussian mechanisms, computed by dp-accounting directly.
    assert eps == pytest.approx(
        [_dp_accounting_epsilon(NOISE, rate=1.0, rounds=r, delta=1e-4) for r in (1, 2)], rel=1e-3
    )
    for entry in rounds:
        assert entry["privacy"]["dp-sampled-sites"] == 2 and entry["privacy"]["dp-sampling-rate"] == 1.0
        assert entry["privacy"]["dp-released"] is True
        # Sites are averaged uniformly under DP (the weight the wrapper adds), not by their study counts.
        assert {s["dp-uniform-weight"] for s in entry["train"]["sites"].values()} == {1.0}


def test_bundle_provenance_records_the_final_epsilon(server_fixed_run):
    run_dir, _ = server_fixed_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    provenance = load_bundle(run_dir / "model" / "final")[1]["provenance"]
    assert provenance["privacy"]["epsilon"] == pytest.approx(rounds[-1]["privacy"]["dp-epsilon"])
    assert provenance["privacy"]["delta"] == 1e-4 and provenance["privacy"]["releases"] == 2
    card = (run_dir / "model" / "final" / "model_card.md").read_text()
    assert f"ε = {provenance['privacy']['epsilon']:.3g}, δ = 0.0001" in card


def test_noise_of_the_configured_size_is_added_to_the_clipped_mean(server_fixed_run):
    run_dir, replies = server_fixed_run
    before = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=True)
    after = torch.load(run_dir / "checkpoints" / "round-001.pt", weights_only=True)
    names = list(before)
    sites = sorted(replies.glob("*-round1.npz"))
    assert len(sites) == 2
    clipped = []
    for path in sites:
        with np.load(path) as data:
            update = [data[k].copy() for k in names]
        compute_clip_model_update(update, [before[k].numpy() for k in names], CLIP)  # Flower's clipping, as the server
        clipped.append(update)
    mean = [(a + b) / 2 for a, b in zip(*clipped, strict=True)]  # uniform mean
    residual = np.concatenate([(after[k].numpy() - m).ravel() for k, m in zip(names, mean, strict=True)])
    expected_std = NOISE * CLIP / 2
    # ~100k parameters: the sample standard deviation is within 1 % of the truth with overwhelming probability.
    assert residual.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(residual.mean()) < 0.01 * expected_std * 10


@pytest.fixture(scope="module")
def client_adaptive_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-client")
    tiny_federation(root / "data", sites=2, patients_per_site=8)
    config = {
        **DP_RUN,
        "num-server-rounds": 2,
        "dp-mode": "client-adaptive",
        "dp-noise-multiplier": 0.5,
        "dp-clipping-norm": 0.05,
        "dp-clipped-count-stddev": 1.0,
    }
    _simulate(root, root / "run", config, root / "replies")
    return root / "run", root / "replies"


def test_client_side_adaptive_clipping_runs_at_the_sites(client_adaptive_run):
    run_dir, _ = client_adaptive_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        # norm_bit comes from Flower's adaptiveclipping_mod at each site: the site clipped its own update.
        assert all("norm_bit" in m for m in entry["train"]["sites"].values())
    clips = [r["privacy"]["dp-clipping-norm"] for r in rounds]
    assert clips[0] == pytest.approx(0.05) and clips[1] != pytest.approx(0.05)  # the norm adapted after round 1
    assert 0 < rounds[0]["privacy"]["dp-epsilon"] < rounds[1]["privacy"]["dp-epsilon"]


def test_a_site_that_does_not_clip_is_caught_and_nothing_is_released(tmp_path):
    tiny_federation(tmp_path / "data", sites=2, patients_per_site=8)
    config = {
        **DP_RUN,
        "num-server-rounds": 1,
        "dp-mode": "client-fixed",
        "dp-noise-multiplier": 1.0,
        "dp-clipping-norm": 0.01,
    }
    _simulate(tmp_path, tmp_path / "run", config, tmp_path / "replies", **{"dp-mode": "off"})  # sites not told to clip
    (entry,) = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert entry["skipped"] and "above the clipping norm" in entry["skip_reason"]
    assert entry["privacy"]["dp-releases"] == 0 and entry["privacy"]["dp-released"] is False
    before = torch.load(tmp_path / "run" / "checkpoints" / "round-000.pt", weights_only=True)
    after = torch.load(tmp_path / "run" / "checkpoints" / "round-001.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the global model was kept
