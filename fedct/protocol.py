"""The wire contract between the server (``fl_server``) and the sites (``fl_client``), in one neutral place.

Both sides import this module; neither imports the other. It holds what crosses the wire and nothing else:

- record names of a message's ``RecordDict`` (:data:`CONFIG_RECORD`, :data:`ARRAYS_RECORD`, :data:`METRICS_RECORD`,
  :data:`SITE_RECORD`, :data:`EVALUATION_RECORD`, :data:`INDEX_RECORD`);
- the round settings the server sends with every message (:class:`RoundSettings`: ``to_record``/``from_record``);
- metric keys and key prefixes both sides name (:data:`NUM_EXAMPLES`, :data:`VAL_PREFIX`, ...), and the agreed
  range and bins of the risk-score histogram (:data:`RISK_RANGE`, :data:`RISK_BINS`);
- the calibration contract: the temperature grid, the ECE bins and the keys of the calibration statistics
  (:data:`CALIBRATION_TEMPERATURES`, :data:`CALIBRATION_BINS`, :data:`VAL_CALIBRATION_NLL`, :func:`reliability_key`).

The packed-weights encoding itself is :mod:`fedct.transport` (it needs torch and flwr; this module needs neither).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from preprocessing.pipeline import PipelineConfig
from preprocessing.profile_features import ProfileNormalisation
from preprocessing.split import SplitConfig

if TYPE_CHECKING:  # models.factory imports torch; `fedct ingest` parses its options here without it
    from models.factory import ModelConfig

# --- record names ------------------------------------------------------------------------------------------------

#: ConfigRecord of a server message carrying the round settings (Flower's strategies' ``configrecord_key``).
CONFIG_RECORD = "config"
#: ArrayRecord of the model's weights (both directions).
ARRAYS_RECORD = "arrays"
#: MetricRecord of a reply's metrics (what the strategy aggregates).
METRICS_RECORD = "metrics"
#: ConfigRecord naming the replying site (key :data:`SITE_NAME_FIELD`).
SITE_RECORD = "site"
SITE_NAME_FIELD = "name"
#: ConfigRecord of a training reply that carries the evaluation of the received weights (``evaluate-first``).
EVALUATION_RECORD = "evaluate"
#: ConfigRecord carrying the index of packed weights (``models.weights``); ``arrays-key`` names the ArrayRecord.
INDEX_RECORD = "weights-index"

#: The champion message (``query.champion``, sent at the start of a run with a model registry): the champion's
#: ``model.pt`` as one uint8 array in the ArrayRecord :data:`CHAMPION_RECORD`, and a ConfigRecord of the same name with
#: ``version``, ``content-sha256``, ``model.json`` and ``registry.json`` (text). The reply: :data:`SITE_RECORD` and
#: :data:`CHAMPION_RECORD` (``version``, ``content-sha256`` of what the site stored).
CHAMPION_MESSAGE = "query.champion"
CHAMPION_RECORD = "champion"
CHAMPION_FILE_RECORD = "champion-file"
#: Training-reply counts of a campaign (aggregate, under the privacy floor): studies new since the site's previous
#: campaign, training studies labelled by clinician feedback, feedback that disagrees with labels.csv.
NEW_STUDIES = "train-new-studies"
FEEDBACK_LABELS = "train-feedback-labels"
FEEDBACK_CONFLICTS = "train-feedback-conflicts"

# --- metric keys -------------------------------------------------------------------------------------------------

#: A reply's aggregation weight: training studies (train reply) or validation studies (evaluate reply).
NUM_EXAMPLES = "num-examples"
#: Split prefixes of metric keys (``val-auc-macro``, ``test-c-index``, ``train-loss``).
TRAIN_PREFIX, VAL_PREFIX, TEST_PREFIX = "train-", "val-", "test-"
#: Training-reply metrics.
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_DIAGNOSIS = "train-loss-diagnosis"
TRAIN_LOSS_PROGNOSIS = "train-loss-prognosis"
TRAIN_SECONDS = "train-seconds"
#: Histogram of the training studies' risk scores (evaluate reply), over :data:`RISK_BINS` bins of :data:`RISK_RANGE`.
TRAIN_HIST_RISK = "train-hist-risk"
#: Metric names after the split prefix.
AUC_MACRO = "auc-macro"
BALANCED_ACCURACY = "balanced-accuracy"
C_INDEX = "c-index"
TD_AUC = "td-auc"
LOSS = "loss"
#: Site name a SecAgg+ site puts into its legacy fit metrics (the legacy workflow has no ``site`` record).
SITE_NAME_METRIC = "site-name"
#: Range and bins of the risk-score histogram every site sends (log-risk is clipped into the range).
RISK_RANGE = (-8.0, 8.0)
RISK_BINS = 160

# --- calibration (temperature scaling of the diagnosis head, ``models.calibration``) --------------------------------

#: Temperatures at which every site sums its validation studies' negative log-likelihood: 41 values, log-spaced
#: from 0.25 to 8 (the server adds the sites' sums and takes the minimum).
CALIBRATION_TEMPERATURES = tuple(0.25 * 32.0 ** (i / 40) for i in range(41))
#: Equal-width bins of the top-label confidence for the expected calibration error (ECE).
CALIBRATION_BINS = 15
#: Metric names after the split prefix that are lists summed element-wise across sites (not counts): they start so.
CALIBRATION_PREFIX = "calib-"
#: Evaluate reply: summed NLL of the labelled validation studies at each of :data:`CALIBRATION_TEMPERATURES`.
VAL_CALIBRATION_NLL = "val-calib-nll"
#: Round-config key of the calibration message: the temperature whose calibrated test probabilities the site bins.
CALIBRATION_TEMPERATURE = "calibration-temperature"
#: Reliability fields (per bin: studies, summed confidence, summed correct calls) before (T = 1) and after (T).
RELIABILITY_FIELDS = ("count", "confidence", "correct")
CALIBRATION_STAGES = ("before", "after")


def reliability_key(stage: str, field: str, *, prefix: str = TEST_PREFIX) -> str:
    """Metric key of one reliability list of the calibration reply, e.g. ``test-calib-after-count``."""
    if stage not in CALIBRATION_STAGES or field not in RELIABILITY_FIELDS:
        raise ValueError(
            f"no reliability list {stage!r}/{field!r} (stages {CALIBRATION_STAGES}, fields {RELIABILITY_FIELDS})"
        )
    return f"{prefix}{CALIBRATION_PREFIX}{stage}-{field}"


# --- clinical/molecular profile (issue #24) -------------------------------------------------------------------------

#: Config key of the profile-statistics request (an evaluate message without weights, before round 1): the site
#: answers with :data:`preprocessing.profile_features.STAT_KEYS` (aggregates above the privacy floor) only.
PROFILE_STATISTICS = "profile-statistics"
#: Config key naming the schema (``"<name> v<version>"``) and its variables (comma-separated) the server pools over.
PROFILE_SCHEMA = "profile-schema"
PROFILE_VARIABLES = "profile-variables"
#: Round-config keys of the profile fusion and of the pooled normalisation (lists in schema order), sent with every
#: training and evaluation message of a run with ``profile-fusion`` other than "none".
PROFILE_FUSION = "profile-fusion"
PROFILE_MEAN, PROFILE_STD, PROFILE_COUNT = "profile-mean", "profile-std", "profile-count"
#: Round-config key: probability that training masks each measured profile value (robustness to missing exports).
PROFILE_DROPOUT = "profile-dropout"

# --- out-of-distribution reference (issue #23.4, ``models.ood``) -----------------------------------------------------

#: Config key of the feature-statistics requests after the last round (an evaluate message with the model's weights):
#: ``"moments"`` asks for count / sum / sum of squares of the pooled image features over the training and validation
#: studies; ``"distances"`` (with :data:`OOD_MEAN` and :data:`OOD_VAR`) for the moments of the studies' distances.
OOD_STATISTICS = "ood-statistics"
OOD_MOMENTS, OOD_DISTANCES = "moments", "distances"
#: Config keys of the ``distances`` request: the pooled per-feature mean and variance (lists of F numbers).
OOD_MEAN, OOD_VAR = "ood-mean", "ood-var"
#: Reply keys: studies counted (0: below the privacy floor, nothing else sent), per-feature sums, sums of squares.
OOD_COUNT, OOD_SUM, OOD_SUMSQ = "ood-n", "ood-sum", "ood-sumsq"
#: Reply keys of the ``distances`` request: ``[studies, sum, sum of squares]`` of log10(distance) of the validation
#: and of the training studies (an empty list below the privacy floor).
OOD_VAL_LOG, OOD_TRAIN_LOG = "ood-val-log-distance", "ood-train-log-distance"

# --- round settings ----------------------------------------------------------------------------------------------

#: What happens to normalisation layers (BatchNorm etc.): averaged by the server, or kept at each site (FedBN).
BN_MODES = ("aggregate", "local")
#: What a site's optimiser starts each round from: a fresh Adam (``reset``) or the moments it ended its previous
#: round of the same run with (``keep``; kept in the site's work folder, never sent).
LOCAL_OPTIMISERS = ("reset", "keep")
#: Optional round-config keys and their defaults (older servers do not send them; FedProx adds proximal-mu).
OPTIONAL_ROUND_KEYS = {
    "bn-mode": "aggregate",
    "transport": "float32",
    "proximal-mu": 0.0,
    "evaluate-first": False,
    "local-optimiser": "reset",
    "test-time-flips": "",  # a server that does not send it evaluates one view
}
#: Round-config key asking the site to evaluate the received weights before training (``evaluate-mode = "fused"``).
EVALUATE_FIRST = "evaluate-first"


class BadRoundConfig(ValueError):
    """The server's round config cannot be used (a site reports reason code ``bad_round_config``)."""

    code = "bad_round_config"


@dataclass(frozen=True)
class RoundSettings:
    """What the server asks a site to do in one round (sent in the message's ConfigRecord)."""

    server_round: int
    local_epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    model: ModelConfig
    pipeline: PipelineConfig
    split: SplitConfig
    loss_weights: tuple[float, float] = (1.0, 0.5)  # diagnosis, prognosis
    horizon_days: float = 14.0
    bn_mode: str = "aggregate"
    transport: str = "float32"
    proximal_mu: float = 0.0
    #: ``evaluate-mode = "fused"``: evaluate the received (previous round's global) weights before training and
    #: send the evaluation with the training reply (record key ``evaluate-first``).
    evaluate_first: bool = False
    #: The pooled profile normalisation (``profile-fusion`` other than "none"); None before the server has pooled the
    #: sites' statistics (a site refuses to train or evaluate a profile model without it).
    profile: ProfileNormalisation | None = None
    #: ``profile-dropout``: probability that local training masks each measured profile value of a study (0 = never).
    profile_dropout: float = 0.0
    #: ``local-optimiser``: ``reset`` (a fresh Adam every round) or ``keep`` (the site's Adam moments carried over
    #: from its previous round of the same run).
    local_optimiser: str = "reset"

    def __post_init__(self) -> None:
        if not 0.0 <= self.profile_dropout < 1.0:
            raise ValueError(f"profile-dropout must be in [0, 1), got {self.profile_dropout}")
        if self.profile is not None and len(self.profile.variables) != self.model.profile_variables:
            raise ValueError(
                f"profile normalisation has {len(self.profile.variables)} variables, the model fuses "
                f"{self.model.profile_variables}"
            )
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn-mode {self.bn_mode!r} is not one of {', '.join(BN_MODES)}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.local_optimiser not in LOCAL_OPTIMISERS:
            raise ValueError(f"local-optimiser {self.local_optimiser!r} is not one of {', '.join(LOCAL_OPTIMISERS)}")
        if len(self.loss_weights) != 2 or any(w < 0 for w in self.loss_weights) or sum(self.loss_weights) <= 0:
            raise ValueError(f"loss weights must be two non-negative numbers, not both 0, got {self.loss_weights}")
        if self.horizon_days <= 0:
            raise ValueError(f"prognosis-horizon-days must be > 0, got {self.horizon_days}")
        if self.local_epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning-rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")

    def to_record(self) -> dict[str, Any]:
        """Flat scalars for a Flower ConfigRecord (and, for a profile model, the normalisation as lists)."""
        record: dict[str, Any] = {
            "server-round": self.server_round,
            "local-epochs": self.local_epochs,
            "learning-rate": self.learning_rate,
            "batch-size": self.batch_size,
            "seed": self.seed,
            "model-name": self.model.name,
            "model-norm": self.model.norm,
            "num-classes": self.model.num_classes,
            "clinical-covariates": self.model.covariates,
            "loss-weight-diagnosis": self.loss_weights[0],
            "loss-weight-prognosis": self.loss_weights[1],
            "prognosis-horizon-days": self.horizon_days,
            "input-size": ",".join(str(v) for v in self.pipeline.input_size),
            "target-spacing-mm": ",".join(str(v) for v in self.pipeline.target_spacing_mm),
            "hu-min": self.pipeline.hu_min,
            "hu-max": self.pipeline.hu_max,
            "val-fraction": self.split.val_fraction,
            "test-fraction": self.split.test_fraction,
            "bn-mode": self.bn_mode,
            "transport": self.transport,
            "proximal-mu": self.proximal_mu,
            EVALUATE_FIRST: self.evaluate_first,
            "local-optimiser": self.local_optimiser,
            "test-time-flips": ",".join(str(a) for a in self.model.test_time_flips),
        }
        if self.model.profile_fusion != "none":
            record[PROFILE_FUSION] = self.model.profile_fusion
            record[PROFILE_DROPOUT] = self.profile_dropout
            if self.profile is not None:
                record[PROFILE_SCHEMA] = self.profile.schema
                record[PROFILE_VARIABLES] = ",".join(self.profile.variables)
                record[PROFILE_MEAN] = [float(v) for v in self.profile.mean]
                record[PROFILE_STD] = [float(v) for v in self.profile.std]
                record[PROFILE_COUNT] = [int(v) for v in self.profile.count]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundSettings:
        """Inverse of :meth:`to_record`; a missing key is a protocol error naming the key."""
        from models.factory import ModelConfig

        missing = [k for k in cls.keys() if k not in record]
        if missing:
            raise ValueError(f"round config from the server lacks {', '.join(missing)}")
        fusion = str(record.get(PROFILE_FUSION, "none"))
        profile = None
        if fusion != "none" and PROFILE_VARIABLES in record:
            try:
                profile = ProfileNormalisation.from_dict(
                    {
                        "variables": [v for v in str(record[PROFILE_VARIABLES]).split(",") if v],
                        "mean": list(record.get(PROFILE_MEAN, [])),
                        "std": list(record.get(PROFILE_STD, [])),
                        "count": list(record.get(PROFILE_COUNT, [])),
                        "schema": str(record.get(PROFILE_SCHEMA, "")),
                    }
                )
            except ValueError as exc:
                raise BadRoundConfig(f"round config's profile normalisation: {exc}") from None
        n_profile = len(profile.variables) if profile is not None else 0
        if fusion != "none" and profile is None:
            raise BadRoundConfig(
                f"round config asks for profile-fusion {fusion!r} but carries no profile normalisation"
            )
        return cls(
            server_round=int(record["server-round"]),
            local_epochs=int(record["local-epochs"]),
            learning_rate=float(record["learning-rate"]),
            batch_size=int(record["batch-size"]),
            seed=int(record["seed"]),
            model=ModelConfig(
                name=str(record["model-name"]),
                norm=str(record["model-norm"]),
                num_classes=int(record["num-classes"]),
                covariates=bool(record["clinical-covariates"]),
                profile_fusion=fusion,
                profile_variables=n_profile,
                test_time_flips=parse_axes(
                    str(record.get("test-time-flips", OPTIONAL_ROUND_KEYS["test-time-flips"])), "test-time-flips"
                ),
            ),
            pipeline=PipelineConfig(
                target_spacing_mm=parse_triple(str(record["target-spacing-mm"]), float, "target-spacing-mm"),
                input_size=parse_triple(str(record["input-size"]), int, "input-size"),
                hu_min=float(record["hu-min"]),
                hu_max=float(record["hu-max"]),
            ),
            split=SplitConfig(val_fraction=float(record["val-fraction"]), test_fraction=float(record["test-fraction"])),
            loss_weights=(float(record["loss-weight-diagnosis"]), float(record["loss-weight-prognosis"])),
            horizon_days=float(record["prognosis-horizon-days"]),
            bn_mode=str(record.get("bn-mode", OPTIONAL_ROUND_KEYS["bn-mode"])),
            transport=str(record.get("transport", OPTIONAL_ROUND_KEYS["transport"])),
            proximal_mu=float(record.get("proximal-mu", OPTIONAL_ROUND_KEYS["proximal-mu"])),
            evaluate_first=bool(record.get(EVALUATE_FIRST, OPTIONAL_ROUND_KEYS[EVALUATE_FIRST])),
            local_optimiser=str(record.get("local-optimiser", OPTIONAL_ROUND_KEYS["local-optimiser"])),
            profile=profile,
            profile_dropout=float(record.get(PROFILE_DROPOUT, 0.0)),
        )

    @staticmethod
    def keys() -> tuple[str, ...]:
        """The required keys of the round config record (``OPTIONAL_ROUND_KEYS`` may be absent)."""
        return (
            "server-round",
            "local-epochs",
            "learning-rate",
            "batch-size",
            "seed",
            "model-name",
            "model-norm",
            "num-classes",
            "clinical-covariates",
            "loss-weight-diagnosis",
            "loss-weight-prognosis",
            "prognosis-horizon-days",
            "input-size",
            "target-spacing-mm",
            "hu-min",
            "hu-max",
            "val-fraction",
            "test-fraction",
        )


def parse_axes(text: str, name: str) -> tuple[int, ...]:
    """Parse ``"0"``, ``"0,1"`` or ``""`` (none) into spatial axes; the error names the setting (the axes' range and
    repetitions are :class:`models.factory.ModelConfig`'s to check)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated spatial axes (0, 1, 2) or empty, got {text!r}") from exc


def parse_triple(text: str, kind: type, name: str) -> tuple:
    """Parse ``"64,64,48"`` into a 3-tuple of ``kind``; the error names the setting."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"{name} must be three comma-separated numbers, got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{name} must be three comma-separated numbers, got {text!r}") from exc
