"""The server's run configuration, read in one place from Flower's run config.

Keys and defaults are those of ``[tool.flwr.app.config]`` in pyproject.toml (a test keeps the two equal); the
differential-privacy and secure-aggregation settings are declared once, by :class:`fl_server.privacy.PrivacyConfig`
(``ServerConfig.privacy``), and appear in the run config as flat keys;
override them with ``flwr run . --run-config 'num-server-rounds=10 model-name="smallcnn"'``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedct.protocol import BN_MODES, LOCAL_OPTIMISERS, RoundSettings, parse_axes, parse_triple
from fl_server.privacy import PrivacyConfig
from models.factory import PROFILE_FUSIONS, ModelConfig
from models.registry import PromotionRule
from models.weights import TRANSPORTS
from preprocessing.profile import ProfileSchema, read_schema
from preprocessing.profile_features import ProfileNormalisation
from preprocessing.split import SplitConfig
from preprocessing.transforms import PipelineConfig

#: Run-config keys meant for the sites (read by the site's config), not the server.
SITE_KEYS = frozenset({"sim-data-root", "sim-work-root", "device"})
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
LR_SCHEDULES = ("constant", "cosine", "step")
#: How a round's global model is evaluated: its own evaluate exchange, or inside the next round's train exchange.
EVALUATE_MODES = ("separate", "fused")
#: Keys that may change between a run and its resumption (everything else must match the saved state).
RESUMABLE_KEYS = frozenset({"num-server-rounds", "resume", "round-timeout-s", "run-dir", "min-sites"})
#: ``max-site-examples = 0``: the bound on a reply's ``num-examples`` (and on every other count a site reports).
DEFAULT_MAX_SITE_EXAMPLES = 100_000
#: A site's training count may grow to at most this factor times the count of its first accepted update; above
#: that it is clipped (a site honest in round 1 cannot take over the aggregate later).
EXAMPLES_GROWTH_FACTOR = 2.0
#: Environment variable naming the site registry JSON (``{"<node id>": "<site name>"}``) written by ``fedct server start``.
SITE_REGISTRY_ENV = "FEDCT_SITE_REGISTRY"
#: Longest site name the server records.
MAX_SITE_NAME = 64


def is_site_name(value: Any) -> bool:
    """True for a site name as a site may configure one (``fl_client.config``: letters, digits, '-', '_', '.'; here
    also at most 64 characters). Site names are written into metrics, logs and the model card, so nothing else
    (no free text) is accepted, from the registry or from a reply."""
    return isinstance(value, str) and 0 < len(value) <= MAX_SITE_NAME and all(c.isalnum() or c in "-_." for c in value)


def _as_bool(value: Any) -> bool:
    """TOML booleans, or the words true/false (what a shell override may carry)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run a federation."""

    num_server_rounds: int = 3
    local_epochs: int = 1
    learning_rate: float = 0.001
    batch_size: int = 4
    model_name: str = "densenet121"
    model_norm: str = "batch"
    # Test-time augmentation of every evaluation and prediction: the mean over the input and its mirror images along
    # these spatial axes ("0": left-right, the axis training flips; "": one view, the default: on step-matched FedAvg
    # the mirror did not help). README "Configuring a run".
    test_time_flips: str = ""
    clinical_covariates: bool = False
    loss_weight_diagnosis: float = 1.0
    loss_weight_prognosis: float = 0.5
    prognosis_horizon_days: float = 14.0
    input_size: str = "64,64,48"
    target_spacing_mm: str = "5.0,5.0,5.0"
    hu_min: float = -1000.0
    hu_max: float = 400.0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    min_sites: int = 2
    round_timeout_s: float = 3600.0
    seed: int = 0
    run_dir: str = "runs/flwr"
    resume: bool = False
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 0.001
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 1
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_step_rounds: int = 10
    lr_gamma: float = 0.5
    bn_mode: str = "aggregate"
    local_optimiser: str = "reset"
    transport: str = "float32"
    max_update_norm: float = 0.0
    update_zscore: float = 0.0
    evaluate_mode: str = "separate"
    # Bound on a reply's num-examples (its aggregation weight) and other counts; 0 = DEFAULT_MAX_SITE_EXAMPLES.
    max_site_examples: int = 0
    # Differential privacy and secure aggregation (README "Privacy options"): declared once, as the fields of
    # fl_server.privacy.PrivacyConfig; in the run config they are flat keys (dp-*, secure-aggregation, secagg-*).
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Clinical/molecular profile in the model (README "Clinical and molecular profiles"): "none", "late" or "film".
    profile_fusion: str = "none"
    # Probability that local training masks each measured profile value (teaches a fused model to cope with gaps).
    profile_dropout: float = 0.0
    # Privacy floor k of the sites' metrics (fl_client.metrics.floor_evaluation); sites may raise it, nobody lower it.
    metrics_min_count: int = 5
    # Continual improvement (models.registry, fl_server.campaign; README "Running a consortium over time"): the
    # coordinator's model registry folder ("" = none: the run registers nothing), the version (or "champion") whose
    # weights the run starts from ("" = the seeded initial weights), and the promotion rule the run's challenger is
    # judged by against the champion (a held-out test metric, per-site non-inferiority margin, overall min gain).
    model_registry: str = ""
    init_from: str = ""
    promotion_metric: str = "test-auc-macro"
    promotion_margin: float = 0.02
    promotion_min_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        if self.min_sites < 1:
            raise ValueError(f"min-sites must be >= 1, got {self.min_sites}")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round-timeout-s must be > 0, got {self.round_timeout_s}")
        choices = {
            "strategy": (self.strategy, STRATEGIES),
            "lr-schedule": (self.lr_schedule, LR_SCHEDULES),
            "bn-mode": (self.bn_mode, BN_MODES),
            "local-optimiser": (self.local_optimiser, LOCAL_OPTIMISERS),
            "transport": (self.transport, TRANSPORTS),
            "evaluate-mode": (self.evaluate_mode, EVALUATE_MODES),
            "profile-fusion": (self.profile_fusion, PROFILE_FUSIONS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} {value!r} is not one of {', '.join(allowed)}")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{key} must be in (0, 1], got {value}")
        for key, value in (
            ("proximal-mu", self.proximal_mu),
            ("lr-min", self.lr_min),
            ("max-update-norm", self.max_update_norm),
            ("update-zscore", self.update_zscore),
            ("num-malicious-nodes", self.num_malicious_nodes),
            ("max-site-examples", self.max_site_examples),
        ):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for key, value in (("server-learning-rate", self.server_learning_rate), ("server-tau", self.server_tau)):
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        for key, value in (("server-beta-1", self.server_beta_1), ("server-beta-2", self.server_beta_2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.metrics_min_count < 5:
            raise ValueError(f"metrics-min-count must be >= 5 (the sites' privacy floor), got {self.metrics_min_count}")
        if self.num_nodes_to_select < 1:
            raise ValueError(f"num-nodes-to-select must be >= 1, got {self.num_nodes_to_select}")
        if self.lr_step_rounds < 1:
            raise ValueError(f"lr-step-rounds must be >= 1, got {self.lr_step_rounds}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.lr_min > self.learning_rate:
            raise ValueError(f"lr-min ({self.lr_min}) must not exceed learning-rate ({self.learning_rate})")
        if self.strategy in ("krum", "multikrum") and self.min_sites < 2 * self.num_malicious_nodes + 3:
            raise ValueError(
                f"strategy {self.strategy} with num-malicious-nodes={self.num_malicious_nodes} needs min-sites >= "
                f"2*num-malicious-nodes+3 = {2 * self.num_malicious_nodes + 3}, got {self.min_sites}"
            )
        if self.evaluate_mode == "fused" and self.privacy.secure_aggregation:
            raise ValueError(
                'evaluate-mode = "fused" cannot be combined with secure-aggregation = true (the SecAgg+ '
                'round keeps its own evaluate exchange); use evaluate-mode = "separate"'
            )
        if self.init_from and not self.model_registry:
            raise ValueError(
                f"init-from = {self.init_from!r} names a registry version, but no model registry is configured "
                '(set model-registry = "<folder>")'
            )
        _ = self.promotion_rule  # validates promotion-metric, -margin and -min-gain with their own messages
        if self.profile_dropout and self.profile_fusion == "none":
            raise ValueError(f'profile-dropout = {self.profile_dropout} needs profile-fusion other than "none"')
        self.round_settings(1)  # validates model, pipeline and split settings with their own messages
        self.privacy.check_run(
            min_sites=self.min_sites, model_norm=self.model_norm, strategy=self.strategy, transport=self.transport
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerConfig:
        """Parse Flower's run config (kebab-case keys); unknown keys are an error naming the key."""
        known = {f.name.replace("_", "-"): f for f in _flat_fields()}
        privacy_names = {f.name for f in fields(PrivacyConfig)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in SITE_KEYS:
                continue
            if key not in known:
                raise ValueError(f"unknown run config key {key!r}; known keys: {', '.join(sorted(known))}")
            kind = {"int": int, "float": float, "str": str, "bool": _as_bool}[str(known[key].type)]
            try:
                values[known[key].name] = kind(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"run config {key}={value!r} is not a valid {known[key].type}") from exc
        privacy = PrivacyConfig(**{k: v for k, v in values.items() if k in privacy_names})
        return cls(privacy=privacy, **{k: v for k, v in values.items() if k not in privacy_names})

    @property
    def examples_bound(self) -> int:
        """The largest ``num-examples`` (or other count) a reply may carry unclipped (``max-site-examples``)."""
        return self.max_site_examples or DEFAULT_MAX_SITE_EXAMPLES

    @property
    def model(self) -> ModelConfig:
        """The network's configuration."""
        n_profile = 0 if self.profile_fusion == "none" else len(self.profile_schema.variables)
        return ModelConfig(
            name=self.model_name,
            norm=self.model_norm,
            covariates=self.clinical_covariates,
            profile_fusion=self.profile_fusion,
            profile_variables=n_profile,
            test_time_flips=parse_axes(self.test_time_flips, "test-time-flips"),
        )

    @property
    def profile_schema(self) -> ProfileSchema:
        """The consortium's profile schema the run fuses (the one shipped with fedct, ``configs/profile-schema.toml``)."""
        return _shipped_schema()

    @property
    def promotion_rule(self) -> PromotionRule:
        """The champion/challenger rule of ``promotion-metric``, ``promotion-margin``, ``promotion-min-gain``."""
        return PromotionRule(
            metric=self.promotion_metric, margin=self.promotion_margin, min_gain=self.promotion_min_gain
        )

    @property
    def pipeline(self) -> PipelineConfig:
        """The preprocessing every site applies."""
        return PipelineConfig(
            target_spacing_mm=parse_triple(self.target_spacing_mm, float, "target-spacing-mm"),
            input_size=parse_triple(self.input_size, int, "input-size"),
            hu_min=self.hu_min,
            hu_max=self.hu_max,
        )

    def learning_rate_at(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round`` (1-based) under ``lr-schedule``.

        constant: ``learning-rate``; cosine: from ``learning-rate`` at round 1 to ``lr-min`` at the last round;
        step: multiplied by ``lr-gamma`` every ``lr-step-rounds`` rounds (never below ``lr-min``).
        """
        r = max(server_round, 1)
        if self.lr_schedule == "cosine":
            progress = (r - 1) / max(self.num_server_rounds - 1, 1)
            return self.lr_min + 0.5 * (self.learning_rate - self.lr_min) * (
                1.0 + math.cos(math.pi * min(progress, 1.0))
            )
        if self.lr_schedule == "step":
            return max(self.learning_rate * self.lr_gamma ** ((r - 1) // self.lr_step_rounds), self.lr_min)
        return self.learning_rate

    def round_settings(
        self, server_round: int, *, evaluate_first: bool = False, profile: ProfileNormalisation | None = None
    ) -> RoundSettings:
        """What the sites are asked to do in ``server_round`` (``evaluate_first``: evaluate the received weights
        before training and reply with the evaluation, ``evaluate-mode = "fused"``; ``profile``: the pooled profile
        normalisation of a run with profile fusion)."""
        return RoundSettings(
            server_round=server_round,
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate_at(server_round),
            batch_size=self.batch_size,
            seed=self.seed,
            model=self.model,
            pipeline=self.pipeline,
            split=SplitConfig(val_fraction=self.val_fraction, test_fraction=self.test_fraction),
            loss_weights=(self.loss_weight_diagnosis, self.loss_weight_prognosis),
            horizon_days=self.prognosis_horizon_days,
            bn_mode=self.bn_mode,
            local_optimiser=self.local_optimiser,
            transport=self.transport,
            evaluate_first=evaluate_first,
            profile=profile,
            profile_dropout=self.profile_dropout,
        )

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case mapping, the inverse of :meth:`from_run_config` (recorded in provenance); the privacy
        settings as their flat ``dp-*``/``secagg-*`` keys."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "privacy":
                out.update(self.privacy.to_run_config())
            else:
                out[f.name.replace("_", "-")] = getattr(self, f.name)
        return out

    @property
    def run_path(self) -> Path:
        """The run folder (absolute)."""
        return Path(self.run_dir).resolve()


@functools.lru_cache(maxsize=1)
def _shipped_schema() -> ProfileSchema:
    return read_schema()


def _flat_fields() -> list[Field]:
    """The run-config settings as flat fields: ServerConfig's own, with PrivacyConfig's in place of ``privacy``."""
    out: list[Field] = []
    for f in fields(ServerConfig):
        out.extend(fields(PrivacyConfig) if f.name == "privacy" else [f])
    return out


class SiteRegistryError(ValueError):
    """The site registry named by ``FEDCT_SITE_REGISTRY`` cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class SiteRegistry:
    """Who each node is: the SuperLink's node registry (``site-keys/<name>.pub`` registered as node id → name).

    Written by ``fedct server start`` as JSON ``{"<node id>": "<site name>"}`` and named by ``FEDCT_SITE_REGISTRY``.
    The round loop takes every site name it records from here; a reply from a node that is not in it, or one whose
    ``site`` record claims another name, is rejected.
    """

    path: Path
    names: Mapping[int, str] = field(default_factory=dict)
    mtime_ns: int = 0

    @classmethod
    def load(cls, path: Path) -> SiteRegistry:
        """Read and check the registry file (SiteRegistryError naming the file and the problem)."""
        path = Path(path)
        try:
            stat = path.stat()
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SiteRegistryError(
                f"{SITE_REGISTRY_ENV}={path}: cannot read the site registry ({exc.strerror})"
            ) from exc
        except ValueError as exc:
            raise SiteRegistryError(f"{SITE_REGISTRY_ENV}={path}: the site registry is not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise SiteRegistryError(
                f'{SITE_REGISTRY_ENV}={path}: the site registry must be a JSON object {{"<node id>": "<site name>"}}'
            )
        names: dict[int, str] = {}
        for key, name in raw.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise SiteRegistryError(f"{SITE_REGISTRY_ENV}={path}: node id {key!r} is not a decimal number")
            if not is_site_name(name):
                raise SiteRegistryError(
                    f"{SITE_REGISTRY_ENV}={path}: the name of node {key} is not a site name "
                    f"(letters, digits, '-', '_', '.'; at most {MAX_SITE_NAME})"
                )
            names[int(key)] = name
        return cls(path=path, names=names, mtime_ns=stat.st_mtime_ns)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SiteRegistry | None:
        """The registry named by ``FEDCT_SITE_REGISTRY``, or None when the variable is unset (simulation, demo)."""
        value = (os.environ if environ is None else environ).get(SITE_REGISTRY_ENV, "").strip()
        return cls.load(Path(value)) if value else None

    def refreshed(self) -> SiteRegistry:
        """This registry, re-read if its file changed since (a site registered while the run goes on); unchanged when
        the file cannot be read now."""
        try:
            if self.path.stat().st_mtime_ns == self.mtime_ns:
                return self
            return SiteRegistry.load(self.path)
        except (OSError, SiteRegistryError):
            return self
