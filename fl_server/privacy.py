"""Client-level differential privacy and secure aggregation settings of a run, and the privacy accountant.

DP uses Flower's strategy wrappers (``flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}Side{Fixed,
Adaptive}Clipping``); for the client-side modes the sites apply the matching Flower mods
(``fl_client.privacy``). What fedct adds around them:

- the settings are validated before the run starts, each error naming the run-config key;
- the sites' updates are averaged **uniformly** while DP is on: Flower calibrates the noise to
  ``noise-multiplier * clip / sampled-sites``, the sensitivity of an unweighted mean of clipped updates. A mean
  weighted by study counts would let one large site move the model by more than ``clip / sampled-sites``;
- the number of sampled sites is read from each round's actual sample (and replies), not fixed up front, so
  the noise matches the mean it protects; adaptive modes noise with the norm the updates were clipped to;
- client-side modes: the server checks each update is within the clipping norm (ValueError: the round is skipped);
- after every round in which a noised aggregate was released, an RDP accountant (Flower's ``RdpAccountant``, a
  wrapper of Google's ``dp-accounting``) composes one Poisson-subsampled Gaussian mechanism with sampling rate
  ``sampled sites / available sites`` and the configured noise multiplier, and reports ε at ``dp-delta``.

Accounting model: add-or-remove-one-site neighbouring relation, Poisson sampling with rate q (the standard
DP-FedAvg analysis, McMahan et al. 2018). Flower samples a fixed number of sites without replacement; with every
site sampled (the default, q = 1) the two coincide exactly. Only the released model weights are accounted:
evaluation metrics and training metrics (loss, counts) that sites send are not privatised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import get_norm

#: Values of the ``dp-mode`` run-config key.
DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
#: Modes where the sites clip their own update (with Flower's fixedclipping_mod / adaptiveclipping_mod).
CLIENT_SIDE_MODES = ("client-fixed", "client-adaptive")
#: Metric the wrapper adds to every reply while DP is on, so that FedAvg averages the sites uniformly.
UNIFORM_WEIGHT_KEY = "dp-uniform-weight"
#: Model normalisations without integer buffers (BatchNorm's ``num_batches_tracked`` cannot be clipped or noised).
DP_MODEL_NORMS = ("group", "instance")
#: Aggregations whose output is the (uniform) mean DP noise is calibrated for.
MEAN_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation settings (run-config keys ``dp-*``, ``secure-aggregation``,
    ``secagg-*``), declared here only: ``ServerConfig.privacy`` holds one, and pyproject's run-config defaults repeat
    these (tests/test_fl_server_config.py keeps them equal). Checked on construction; :meth:`check_run` checks them
    against the rest of the run."""

    dp_mode: str = "off"
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.0
    dp_delta: float = 1e-5
    dp_target_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    secure_aggregation: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_max_weight: float = 1000.0
    secagg_clipping_range: float = 8.0

    def __post_init__(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp-mode={self.dp_mode!r} is not one of {', '.join(DP_MODES)}")
        finite = {
            name: getattr(self, name)
            for name in (
                "dp_noise_multiplier",
                "dp_clipping_norm",
                "dp_delta",
                "dp_target_quantile",
                "dp_clip_norm_lr",
                "dp_clipped_count_stddev",
                "secagg_max_weight",
                "secagg_clipping_range",
            )
        }
        for name, value in finite.items():
            if not math.isfinite(value):
                raise ValueError(f"{_key(name)} must be a finite number, got {value!r}")
        if self.dp_enabled:
            if self.dp_noise_multiplier <= 0:
                raise ValueError(
                    f"dp-mode={self.dp_mode} needs dp-noise-multiplier > 0 (the Gaussian noise's standard "
                    f"deviation in units of the clipping norm), got {self.dp_noise_multiplier}"
                )
            if self.dp_clipping_norm <= 0:
                what = "initial clipping norm" if self.dp_mode.endswith("adaptive") else "clipping norm"
                raise ValueError(
                    f"dp-mode={self.dp_mode} needs dp-clipping-norm > 0 (the {what}: bound on the L2 norm "
                    f"of a site's update), got {self.dp_clipping_norm}"
                )
            if not 0 < self.dp_delta < 1:
                raise ValueError(
                    f"dp-delta must be strictly between 0 and 1 (typically below 1/number of sites), "
                    f"got {self.dp_delta}"
                )
            if not 0 <= self.dp_target_quantile <= 1:
                raise ValueError(f"dp-target-quantile must be in [0, 1], got {self.dp_target_quantile}")
            if self.dp_clip_norm_lr <= 0:
                raise ValueError(f"dp-clip-norm-lr must be > 0, got {self.dp_clip_norm_lr}")
            if self.dp_clipped_count_stddev < 0:
                raise ValueError(
                    f"dp-clipped-count-stddev must be >= 0 (0 = sampled sites / 20), got {self.dp_clipped_count_stddev}"
                )
        if self.secure_aggregation:
            if self.secagg_num_shares < 3:
                raise ValueError(
                    f"secagg-num-shares must be >= 3 (each site's key is split among itself and its "
                    f"neighbours), got {self.secagg_num_shares}"
                )
            if not 2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares:
                raise ValueError(
                    f"secagg-reconstruction-threshold must be >= 2 and < secagg-num-shares "
                    f"({self.secagg_num_shares}), got {self.secagg_reconstruction_threshold}"
                )
            if self.secagg_max_weight <= 0:
                raise ValueError(f"secagg-max-weight must be > 0, got {self.secagg_max_weight}")
            if self.secagg_clipping_range <= 0:
                raise ValueError(f"secagg-clipping-range must be > 0, got {self.secagg_clipping_range}")
            if self.dp_enabled:
                raise ValueError(
                    f"secure-aggregation=true cannot be combined with dp-mode={self.dp_mode}: SecAgg+ "
                    "runs on Flower's legacy workflow, where fedct does not wire the DP wrappers; "
                    'set dp-mode="off" or secure-aggregation=false'
                )

    @property
    def dp_enabled(self) -> bool:
        """True when a DP mode is configured."""
        return self.dp_mode != "off"

    def check_run(
        self, *, min_sites: int, model_norm: str, strategy: str = "fedavg", transport: str = "float32"
    ) -> None:
        """Check the settings against the rest of the run (ValueError naming the keys involved)."""
        if self.dp_enabled:
            if self.dp_mode in CLIENT_SIDE_MODES and transport != "float32":
                raise ValueError(
                    f'dp-mode={self.dp_mode} needs transport="float32": the sites clip their update before '
                    f"it is rounded to {transport}, and that rounding of the weights would add to the "
                    "update's norm beyond the clipping norm (server-side modes clip after decoding)"
                )
            if strategy.lower() not in MEAN_STRATEGIES:
                raise ValueError(
                    f"dp-mode={self.dp_mode} needs strategy fedavg or fedprox (DP noise is calibrated to a "
                    f"mean of clipped updates), got strategy={strategy!r}"
                )
            if model_norm not in DP_MODEL_NORMS:
                raise ValueError(
                    f"dp-mode={self.dp_mode} needs model-norm {' or '.join(DP_MODEL_NORMS)}: BatchNorm's "
                    f"integer batch counter cannot be clipped or noised, got model-norm={model_norm!r}"
                )
            if self.dp_mode.endswith("adaptive"):
                stddev = self.clipped_count_stddev(min_sites)
                if self.dp_noise_multiplier >= 2 * stddev:
                    raise ValueError(
                        f"dp-mode={self.dp_mode} with dp-noise-multiplier={self.dp_noise_multiplier} needs "
                        f"dp-clipped-count-stddev > {self.dp_noise_multiplier / 2} (Flower's adaptive clipping spends "
                        f"part of the privacy on the clipped-site count); the default, sampled sites / 20, is "
                        f"{stddev:g} with min-sites={min_sites}: set dp-clipped-count-stddev or lower the noise"
                    )
        if self.secure_aggregation:
            if min_sites < 2:
                raise ValueError(
                    f"secure-aggregation=true needs min-sites >= 2 (SecAgg+ sums at least two sites), got {min_sites}"
                )
            if strategy.lower() not in MEAN_STRATEGIES:
                raise ValueError(
                    f"secure-aggregation=true needs strategy fedavg or fedprox: the server only sees the "
                    f"sum of the sites' updates, which robust aggregations (median, trimmed mean, Krum) "
                    f"and server optimisers cannot use; got strategy={strategy!r}"
                )

    def clipped_count_stddev(self, sampled_sites: int) -> float:
        """The noise on the clipped-site count of adaptive clipping (``dp-clipped-count-stddev``, 0 = sites / 20)."""
        return self.dp_clipped_count_stddev or sampled_sites / 20

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case run-config keys and values."""
        return {_key(name): getattr(self, name) for name in self.__dataclass_fields__}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclass(frozen=True)
class RoundPrivacy:
    """Privacy spent after one round (what goes into metrics.json)."""

    round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float
    sampled_sites: int
    available_sites: int
    sampling_rate: float
    releases: int

    def to_json(self) -> dict[str, Any]:
        """Kebab-case JSON entry."""
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-clipping-norm": self.clipping_norm,
            "dp-sampled-sites": self.sampled_sites,
            "dp-available-sites": self.available_sites,
            "dp-sampling-rate": self.sampling_rate,
            "dp-releases": self.releases,
        }


class SiteLevelAccountant:
    """ε after each round for the sampled Gaussian mechanism, by Flower's RDP accountant (``dp-accounting``).

    The population (available sites) is fixed when the first round is composed. If fewer sites are available in a
    later round, the round's sample size is scaled up (rounded up) so its rate is never below the true
    ``sampled / available``: the reported ε then stays an upper bound.
    """

    def __init__(self, *, noise_multiplier: float, delta: float) -> None:
        from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)
        from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self._make = lambda population: RdpAccountant(
            _flwr_privacy_config(delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON)
        )
        self._accountant: Any = None
        self.history: list[RoundPrivacy] = []

    def compose_round(self, server_round: int, *, sampled: int, available: int, clipping_norm: float) -> RoundPrivacy:
        """Account one released aggregate of ``sampled`` out of ``available`` sites; return ε so far."""
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        if sampled < 1 or available < sampled:
            raise ValueError(f"round {server_round}: {sampled} sampled of {available} available sites")
        if self._accountant is None:
            self._accountant = self._make(available)
        population = self._accountant.config.population_size
        sample = min(population, math.ceil(sampled * population / available))
        self._accountant.compose(
            GaussianPrivacyEvent(self.noise_multiplier, sample_size=sample, population_size=population)
        )
        spent = self._accountant.get_privacy_spent(self.delta)
        entry = RoundPrivacy(
            round=server_round,
            epsilon=float(spent.epsilon),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            clipping_norm=float(clipping_norm),
            sampled_sites=sampled,
            available_sites=available,
            sampling_rate=sample / population,
            releases=spent.num_releases,
        )
        self.history.append(entry)
        return entry

    def ledger(self) -> str:
        """The composed rounds as JSON (round, sampled, available, clipping norm): enough to rebuild the accountant."""
        return json.dumps([[r.round, r.sampled_sites, r.available_sites, r.clipping_norm] for r in self.history])

    @classmethod
    def replay(cls, ledger: str, *, noise_multiplier: float, delta: float) -> SiteLevelAccountant:
        """An accountant with the rounds of ``ledger`` composed again (e.g. after a resumed run)."""
        accountant = cls(noise_multiplier=noise_multiplier, delta=delta)
        for server_round, sampled, available, clip in json.loads(ledger):
            accountant.compose_round(
                int(server_round), sampled=int(sampled), available=int(available), clipping_norm=float(clip)
            )
        return accountant

    def summary(self) -> dict[str, Any]:
        """What the model bundle records: the final ε and how it was computed."""
        last = self.history[-1] if self.history else None
        return {
            "epsilon": last.epsilon if last else 0.0,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "releases": last.releases if last else 0,
            "accountant": "RDP (flwr.serverapp.RdpAccountant / dp-accounting), Poisson-subsampled Gaussian, "
            "add-or-remove-one site, sampling rate = sampled sites / available sites",
            "per_round": [
                {"round": r.round, "epsilon": r.epsilon, "sampling_rate": r.sampling_rate} for r in self.history
            ],
        }


def _flwr_privacy_config(delta: float, population: int, relation: Any, sampling: Any) -> Any:
    from flwr.supercore.privacy_accounting import PrivacyConfig as FlwrPrivacyConfig

    return FlwrPrivacyConfig(
        target_delta=delta, population_size=population, neighboring_relation=relation, sampling_method=sampling
    )


class _FedctDP:
    """Mixin over Flower's DP wrappers: uniform mean, sample size from the round, the accountant.

    It must come first in the bases so its methods run around the Flower wrapper's.
    """

    site_accountant: SiteLevelAccountant
    num_sampled_clients: int
    clipping_norm: float

    def _fedct_init(self, accountant: SiteLevelAccountant) -> None:
        self.site_accountant = accountant  # (Flower's wrappers have their own ``accountant``, left unused: None)
        # A plain string attribute, so fl_server.strategy's resume state saves and restores it with the strategy.
        self.privacy_ledger = accountant.ledger()
        self._sample: dict[int, tuple[int, int]] = {}
        self._sent: dict[int, list[np.ndarray]] = {}  # client-side modes: the global weights each round started from
        self.last_round: RoundPrivacy | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_train; remembers how many sites were sampled out of how many available."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._sample[server_round] = (len(messages), len(list(grid.get_node_ids())))
        if messages:
            self.num_sampled_clients = len(messages)
        if isinstance(self, ClientFixedDP | ClientAdaptiveDP):
            self._sent = {server_round: arrays.to_numpy_ndarrays()}
        return messages

    def _check_site_clipping(self, server_round: int, replies: list[Message], clip: float) -> None:
        """Client-side modes: every update must already be clipped (a site without the clipping mod would otherwise
        break the guarantee silently). ValueError, so the round loop skips the round with this reason."""
        sent = self._sent.pop(server_round, None)
        if sent is None:
            return
        limit = clip * (1 + 1e-3) + 1e-6 * get_norm(sent)  # float32 arithmetic of global + clipped update - global
        for reply in replies:
            received = next(iter(reply.content.array_records.values())).to_numpy_ndarrays()
            norm = get_norm([np.subtract(r, g, dtype=np.float64) for r, g in zip(received, sent, strict=True)])
            if norm > limit:
                raise ValueError(
                    f"round {server_round}: node {reply.metadata.src_node_id} sent an update of norm {norm:.4g} "
                    f"above the clipping norm {clip:.4g}; with client-side DP every site must clip (is "
                    f"dp-mode set to a client-* mode in the sites' run config?); not aggregated"
                )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping, uniform mean and noise over the error-free replies; then one accountant step."""
        accountant = self.synced_accountant()
        ok = [r for r in replies if not r.has_error()]
        sampled, available = self._sample.pop(server_round, (len(ok), len(ok)))
        self.last_round = None
        if not ok:
            return None, None
        for reply in ok:
            for record in reply.content.metric_records.values():
                record[UNIFORM_WEIGHT_KEY] = 1.0
        # Noise calibrated to the mean actually computed: clip / (sites whose update is averaged).
        self.num_sampled_clients = len(ok)
        # Adaptive modes update the norm during aggregation; the noise must use the norm the updates were clipped to.
        clip_used = self._clip_used = self.clipping_norm
        self._check_site_clipping(server_round, ok, clip_used)
        inner = self.strategy  # type: ignore[attr-defined]
        weighted_by, inner.weighted_by_key = inner.weighted_by_key, UNIFORM_WEIGHT_KEY
        try:
            arrays, metrics = super().aggregate_train(server_round, ok)  # type: ignore[misc]
        finally:
            inner.weighted_by_key = weighted_by  # evaluation metrics stay weighted as without DP
        if arrays is not None:
            self.last_round = accountant.compose_round(
                server_round,
                sampled=max(sampled, len(ok)),
                available=max(available, sampled, len(ok)),
                clipping_norm=clip_used,
            )
            self.privacy_ledger = accountant.ledger()
        return arrays, metrics

    def synced_accountant(self) -> SiteLevelAccountant:
        """The accountant, rebuilt from ``privacy_ledger`` when that was restored from a saved run state."""
        if self.privacy_ledger != self.site_accountant.ledger():
            self.site_accountant = SiteLevelAccountant.replay(
                self.privacy_ledger,
                noise_multiplier=self.site_accountant.noise_multiplier,
                delta=self.site_accountant.delta,
            )
        return self.site_accountant

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Flower's Gaussian noise, with the clipping norm of this round's clipping (Flower's adaptive wrappers would
        use the norm already adapted for the next round, which can be up to exp(clip-norm-lr/2) smaller)."""
        next_norm, self.clipping_norm = self.clipping_norm, self._clip_used
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]
        finally:
            self.clipping_norm = next_norm


class ServerFixedDP(_FedctDP, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with fedct's uniform mean and accountant."""


class ClientFixedDP(_FedctDP, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping with fedct's uniform mean and accountant."""


class ServerAdaptiveDP(_FedctDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with fedct's uniform mean and accountant."""


class ClientAdaptiveDP(_FedctDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with fedct's uniform mean and accountant."""


def wrap_strategy(strategy: Strategy, config: PrivacyConfig, *, expected_sites: int) -> Strategy:
    """``strategy`` inside the Flower DP wrapper of ``config.dp_mode`` (unchanged when DP is off).

    ``strategy`` must aggregate with ``FedAvg.aggregate_train`` (FedAvg, FedProx); while it aggregates training
    replies its weighting key is switched to a uniform weight. ``expected_sites`` (e.g. min-sites) only seeds the wrapper; each round uses its sample.
    """
    if not config.dp_enabled:
        return strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ValueError(
            f"dp-mode={config.dp_mode} needs a strategy that aggregates like FedAvg (fedavg, fedprox), "
            f"got {type(strategy).__name__}"
        )
    accountant = SiteLevelAccountant(noise_multiplier=config.dp_noise_multiplier, delta=config.dp_delta)
    z, clip, n = config.dp_noise_multiplier, config.dp_clipping_norm, max(1, expected_sites)
    wrapped: _FedctDP
    if config.dp_mode == "server-fixed":
        wrapped = ServerFixedDP(strategy, z, clip, n)
    elif config.dp_mode == "client-fixed":
        wrapped = ClientFixedDP(strategy, z, clip, n)
    else:
        cls = ServerAdaptiveDP if config.dp_mode == "server-adaptive" else ClientAdaptiveDP
        wrapped = cls(
            strategy,
            z,
            n,
            initial_clipping_norm=clip,
            target_clipped_quantile=config.dp_target_quantile,
            clip_norm_lr=config.dp_clip_norm_lr,
            clipped_count_stddev=config.clipped_count_stddev(n),
        )
    wrapped._fedct_init(accountant)
    return wrapped  # type: ignore[return-value]


def round_privacy(strategy: Strategy, server_round: int) -> dict[str, Any] | None:
    """The privacy entry of ``server_round`` for metrics.json (None without DP).

    ``dp-epsilon`` is cumulative; ``dp-released`` says whether this round released a noised aggregate.
    """
    if not isinstance(strategy, _FedctDP):
        return None
    accountant = strategy.synced_accountant()
    last = accountant.history[-1] if accountant.history else None
    if last is None:
        return {"dp-epsilon": 0.0, "dp-delta": accountant.delta, "dp-releases": 0, "dp-released": False}
    return {**last.to_json(), "dp-released": last.round == server_round}


def privacy_round_extras(strategy: Strategy) -> Callable[[Any], Mapping[str, Any]]:
    """``run_federation(round_extras=...)``: ``{"privacy": ...}`` for each round's metrics.json entry (nothing
    without DP)."""

    def extras(report: Any) -> Mapping[str, Any]:
        entry = round_privacy(strategy, report.server_round)
        return {"privacy": entry} if entry is not None else {}

    return extras


def privacy_summary(strategy: Strategy) -> dict[str, Any] | None:
    """The run's privacy record for the model bundle's provenance (None without DP)."""
    return strategy.synced_accountant().summary() if isinstance(strategy, _FedctDP) else None
