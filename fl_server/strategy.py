"""Flower's own aggregation strategies (``flwr.serverapp.strategy``), chosen and parameterised by the run config.

``strategy`` = fedavg | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | krum | multikrum. Every strategy
samples ``max(fraction-train * connected, min-sites)`` sites per round; the round loop (``fl_server.rounds``) makes sure
at least ``min-sites`` are connected before asking, so Flower's sampling never waits.

Resume support: :func:`strategy_state` / :func:`load_strategy_state` capture what a strategy learns across rounds
(FedAdam/FedYogi keep their moments ``m_t``/``v_t`` as attributes of the object; wrappers such as Flower's DP
strategies keep the wrapped strategy in ``.strategy`` and their own running values, e.g. an adaptive clipping norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fl_server.config import ServerConfig

#: Strategies that move the global model with a server-side optimiser (their update of normalisation statistics
#: is replaced by the plain weighted mean, see fl_server.rounds).
SERVER_OPTIMISERS = ("fedadam", "fedyogi")
#: Strategy attributes set from the current run config, never from a saved state.
SAMPLING_ATTRIBUTES = frozenset(
    {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes"}
)


def _no_metrics(_records: list[RecordDict], _weight_key: str) -> MetricRecord:
    """Metrics are aggregated by fl_server.run_log, not by the strategy."""
    return MetricRecord()


def build_strategy(config: ServerConfig) -> Strategy:
    """The Flower strategy named by ``config.strategy`` with its run-config parameters."""
    common: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites,
        "min_available_nodes": config.min_sites,
        "train_metrics_aggr_fn": _no_metrics,
        "evaluate_metrics_aggr_fn": _no_metrics,
    }
    optimiser = {
        "eta": config.server_learning_rate,
        "eta_l": config.learning_rate,
        "beta_1": config.server_beta_1,
        "beta_2": config.server_beta_2,
        "tau": config.server_tau,
    }
    name = config.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, **optimiser)
    if name == "fedyogi":
        return FedYogi(**common, **optimiser)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=config.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=config.num_malicious_nodes)
    if name == "multikrum":
        return MultiKrum(
            **common, num_malicious_nodes=config.num_malicious_nodes, num_nodes_to_select=config.num_nodes_to_select
        )
    raise ValueError(f"strategy {name!r} is not supported")


def _is_array_dict(value: Any) -> bool:
    # numpy scalars too: arithmetic on 0-d arrays (e.g. FedAdam's moments of num_batches_tracked) returns them
    return (
        isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray | np.generic) for v in value.values())
    )


def strategy_state(strategy: Any) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """What a strategy object carries from round to round: ``(scalars, array dicts)``.

    Scalars are its int/float/str/bool/None attributes, array dicts its ``{name: ndarray}`` attributes (``m_t``,
    ``v_t``, ``current_arrays``). A wrapped strategy (attribute ``strategy``) is captured under ``strategy.``.
    """
    scalars: dict[str, Any] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}

    def walk(obj: Any, prefix: str) -> None:
        for attr, value in vars(obj).items():
            if isinstance(value, bool | int | float | str) or value is None:
                scalars[prefix + attr] = value
            elif _is_array_dict(value):
                arrays[prefix + attr] = {k: np.array(v, copy=True) for k, v in value.items()}
            elif isinstance(value, Strategy):
                walk(value, f"{prefix}{attr}.")

    walk(strategy, "")
    return scalars, arrays


def load_strategy_state(
    strategy: Any, scalars: Mapping[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    """Put a state captured by :func:`strategy_state` back on a freshly built strategy of the same kind."""

    def target(path: str) -> tuple[Any, str]:
        obj = strategy
        *parents, attr = path.split(".")
        for parent in parents:
            obj = getattr(obj, parent)
        return obj, attr

    for path, value in scalars.items():
        obj, attr = target(path)
        if attr in SAMPLING_ATTRIBUTES:  # follow the current run config (min-sites may change on resume)
            continue
        if hasattr(obj, attr):
            setattr(obj, attr, value)
    for path, value in arrays.items():
        obj, attr = target(path)
        setattr(obj, attr, {k: np.array(v, copy=True) for k, v in value.items()})
