"""fl_server.strategy: Flower's strategies built from the run config; their cross-round state saved and restored."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum

from fl_server.config import STRATEGIES, ServerConfig
from fl_server.strategy import build_strategy, load_strategy_state, strategy_state

EXPECTED = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_configured_strategy_is_flowers_class_with_the_sampling_settings(name):
    strategy = build_strategy(ServerConfig(strategy=name, min_sites=3, fraction_train=0.5))
    assert type(strategy) is EXPECTED[name]
    assert strategy.min_train_nodes == strategy.min_evaluate_nodes == strategy.min_available_nodes == 3
    assert strategy.fraction_train == 0.5


def test_strategy_parameters_come_from_the_run_config():
    cfg = dict(server_learning_rate=0.05, server_beta_1=0.8, server_beta_2=0.95, server_tau=0.01, learning_rate=0.002)
    adam = build_strategy(ServerConfig(strategy="fedadam", **cfg))
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau, adam.eta_l) == (0.05, 0.8, 0.95, 0.01, 0.002)
    assert build_strategy(ServerConfig(strategy="fedprox", proximal_mu=0.3)).proximal_mu == 0.3
    assert build_strategy(ServerConfig(strategy="fedtrimmedavg", trim_beta=0.1)).beta == 0.1
    krum = build_strategy(ServerConfig(strategy="multikrum", min_sites=5, num_malicious_nodes=1, num_nodes_to_select=2))
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (1, 2)


def _reply(arrays, n, node):
    """A train reply as a SuperNode would send it (metadata set explicitly: no Flower run is active here)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content=content, metadata=metadata)


def test_fedadam_moments_survive_a_save_and_restore():
    config = ServerConfig(strategy="fedadam")
    strategy = build_strategy(config)
    global_arrays = {"w": np.zeros(4, np.float32), "n": np.array(0, np.int64)}  # 0-d: moments become numpy scalars
    for server_round in (1, 2):
        strategy.current_arrays = dict(global_arrays)
        replies = [
            _reply(
                {"w": np.full(4, 0.1 * server_round * i, np.float32), "n": np.array(3 * server_round, np.int64)}, 10, i
            )
            for i in (1, 2)
        ]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        global_arrays = {k: aggregated[k].numpy() for k in global_arrays}
    scalars, arrays = strategy_state(strategy)
    assert set(arrays) >= {"m_t", "v_t"} and scalars["eta"] == config.server_learning_rate
    fresh = build_strategy(config)
    assert fresh.m_t is None
    load_strategy_state(fresh, scalars, arrays)
    for attr in ("m_t", "v_t"):
        assert set(getattr(fresh, attr)) == {"w", "n"}
        assert np.array_equal(getattr(fresh, attr)["n"], getattr(strategy, attr)["n"])
        assert np.array_equal(getattr(fresh, attr)["w"], getattr(strategy, attr)["w"])
        assert getattr(fresh, attr)["w"] is not getattr(strategy, attr)["w"]


def test_restored_state_does_not_override_the_current_sampling_settings():
    scalars, arrays = strategy_state(build_strategy(ServerConfig(strategy="fedavg", min_sites=2)))
    fresh = build_strategy(ServerConfig(strategy="fedavg", min_sites=3))
    load_strategy_state(fresh, scalars, arrays)
    assert fresh.min_train_nodes == 3


def test_a_wrapped_strategy_is_captured_under_its_attribute():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    inner = build_strategy(ServerConfig(strategy="fedadam"))
    inner.m_t = {"w": np.ones(2)}
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        inner, noise_multiplier=0.1, num_sampled_clients=2, clipped_count_stddev=1.0
    )
    wrapper.clipping_norm = 0.37  # moved by adaptive clipping during a run
    scalars, arrays = strategy_state(wrapper)
    assert scalars["clipping_norm"] == 0.37 and "strategy.m_t" in arrays
    fresh = DifferentialPrivacyServerSideAdaptiveClipping(
        build_strategy(ServerConfig(strategy="fedadam")),
        noise_multiplier=0.1,
        clipped_count_stddev=1.0,
        num_sampled_clients=2,
    )
    load_strategy_state(fresh, scalars, arrays)
    assert fresh.clipping_norm == 0.37 and np.array_equal(fresh.strategy.m_t["w"], np.ones(2))
