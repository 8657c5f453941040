"""The site's configuration, read in one place.

Two sources, both plain Python by the time they get here:

- the site's own settings (``node_config``, set by hospital IT when starting the SuperNode, e.g.
  ``flower-supernode --node-config 'site-name="site-a" dicom-dir="/data/dicom" site-dir="/cache" device="cpu"'``;
  in simulation ``partition-id`` picks ``site-<id>`` under ``sim-data-root``/``sim-work-root`` of the run config);
- the round settings the server sends with every message (:class:`RoundSettings`), which the site admits
  (:meth:`SiteConfig.admit`) against its own limits (:mod:`fl_client.limits`) and its fixed split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fl_client.compute import ComputeOptionError, ComputeOptions
from fl_client.limits import SiteLimitError, SiteLimits
from models.factory import ModelConfig
from preprocessing.split import SplitConfig, site_split
from preprocessing.transforms import PipelineConfig

DEVICES = ("auto", "cpu", "cuda")
#: What happens to normalisation layers (BatchNorm etc.): averaged by the server, or kept at each site (FedBN).
BN_MODES = ("aggregate", "local")
#: Optional round-config keys and their defaults (older servers do not send them; FedProx adds proximal-mu).
OPTIONAL_ROUND_KEYS = {"bn-mode": "aggregate", "transport": "float32", "proximal-mu": 0.0, "evaluate-first": False}
#: ConfigRecord of a training reply that carries the evaluation of the received weights (``evaluate-first``).
EVALUATION_RECORD = "evaluate"
#: Node-config keys of the site's own split fractions (site env FEDCT_VAL_FRACTION / FEDCT_TEST_FRACTION).
SPLIT_NODE_KEYS = ("val-fraction", "test-fraction")

__all__ = ["SiteConfig", "SiteConfigError", "SiteLimitError", "SiteLimits", "RoundSettings", "parse_triple"]

log = logging.getLogger("fedct.client")


class SiteConfigError(ValueError):
    """A site setting is missing or wrong; the message names the setting."""


@dataclass(frozen=True)
class SiteConfig:
    """Where a site's data lives and how it computes."""

    site_name: str
    dicom_dir: Path
    site_dir: Path
    labels_csv: Path | None
    device: str = "auto"
    workers: int = 2
    #: What the server may ask of this site (site env ``FEDCT_MAX_*``); checked by :meth:`admit`.
    limits: SiteLimits = field(default_factory=SiteLimits)
    #: The site's own split fractions (site env ``FEDCT_VAL_FRACTION``/``FEDCT_TEST_FRACTION``); None: the first
    #: round's request is fixed instead (simulation, a SuperNode started by hand without them).
    split: SplitConfig | None = None
    #: Precision, loader workers, pinned memory, channels-last, GPU augmentation (``fl_client/compute.py``).
    compute: ComputeOptions = ComputeOptions()

    def __post_init__(self) -> None:
        if not self.site_name or not all(c.isalnum() or c in "-_." for c in self.site_name):
            raise SiteConfigError(f"site-name {self.site_name!r} must be letters, digits, '-', '_' or '.'")
        if self.device not in DEVICES:
            raise SiteConfigError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.workers < 1:
            raise SiteConfigError(f"num-workers must be >= 1, got {self.workers}")

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
        """Build from Flower's ``context.node_config`` and ``context.run_config`` (plain mappings)."""
        device = str(node_config.get("device", run_config.get("device", "auto")))
        workers = int(node_config.get("num-workers", 2))
        try:
            limits = SiteLimits.from_node_config(node_config)
        except ValueError as exc:
            raise SiteConfigError(str(exc)) from exc
        split = _split_from_node_config(node_config)
        try:
            compute = ComputeOptions.from_node_config(node_config)
        except ComputeOptionError as exc:
            raise SiteConfigError(str(exc)) from exc
        if "dicom-dir" in node_config:
            for key in ("site-name", "site-dir"):
                if key not in node_config:
                    raise SiteConfigError(f"node config has dicom-dir but no {key}")
            dicom_dir = Path(str(node_config["dicom-dir"]))
            labels = node_config.get("labels")
            return cls(
                site_name=str(node_config["site-name"]),
                dicom_dir=dicom_dir,
                site_dir=Path(str(node_config["site-dir"])),
                labels_csv=Path(str(labels)) if labels else None,
                device=device,
                workers=workers,
                limits=limits,
                split=split,
                compute=compute,
            )
        if "partition-id" in node_config:
            for key in ("sim-data-root", "sim-work-root"):
                if key not in run_config:
                    raise SiteConfigError(f"simulation needs run config {key!r} (folder of site-0, site-1, ...)")
            data_root = Path(str(run_config["sim-data-root"]))
            sites = sorted(p.name for p in data_root.glob("site-*") if p.is_dir()) if data_root.is_dir() else []
            partition = int(node_config["partition-id"])
            if partition >= len(sites):
                raise SiteConfigError(
                    f"partition-id {partition} but {data_root} has {len(sites)} site folder(s); "
                    "run `fedct synth` there or lower num-supernodes"
                )
            name = sites[partition]
            labels_csv = data_root / name / "labels.csv"
            return cls(
                site_name=name,
                dicom_dir=data_root / name / "dicom",
                site_dir=Path(str(run_config["sim-work-root"])) / name,
                labels_csv=labels_csv if labels_csv.is_file() else None,
                device=device,
                workers=workers,
                limits=limits,
                split=split,
                compute=compute,
            )
        raise SiteConfigError("node config needs dicom-dir, site-dir and site-name (or partition-id in simulation)")

    def admit(self, settings: RoundSettings) -> RoundSettings:
        """The round as this site runs it; called once per round before any study is read.

        - a request over one of the site's limits is refused (:class:`SiteLimitError`, code ``site_limit_exceeded``);
        - the split is the site's fixed one (``SITE_DIR/split.json``, :func:`preprocessing.split.site_split`): the
          server's fractions cannot re-split the site;
        - the preprocessing caches of other pipelines are trimmed to ``FEDCT_CACHE_MAX_GB``, least recently used
          first, never the one this round uses.
        """
        self.limits.check(input_size=settings.pipeline.input_size, spacing_mm=settings.pipeline.target_spacing_mm,
                          local_epochs=settings.local_epochs, batch_size=settings.batch_size)  # fmt: skip
        split = site_split(self.site_dir, site_choice=self.split, requested=settings.split)
        from preprocessing.cache import prune_caches  # MONAI-heavy; the ClientApp has it imported already

        removed = prune_caches(self.site_dir, keep=settings.pipeline, max_bytes=self.limits.cache_max_bytes)
        if removed:
            log.info("%s: removed %d older preprocessing cache(s) to stay under FEDCT_CACHE_MAX_GB=%g",
                     self.site_name, len(removed), self.limits.cache_max_gb)  # fmt: skip
        return settings if split == settings.split else replace(settings, split=split)


def _split_from_node_config(node_config: Mapping[str, Any]) -> SplitConfig | None:
    """The site's split fractions from the node config (both keys or neither)."""
    present = [k for k in SPLIT_NODE_KEYS if k in node_config]
    if not present:
        return None
    if len(present) != len(SPLIT_NODE_KEYS):
        raise SiteConfigError(f"node config has {present[0]} but not {[k for k in SPLIT_NODE_KEYS if k not in present][0]}")
    try:
        return SplitConfig(val_fraction=float(node_config["val-fraction"]), test_fraction=float(node_config["test-fraction"]))
    except ValueError as exc:
        raise SiteConfigError(f"site split (FEDCT_VAL_FRACTION, FEDCT_TEST_FRACTION): {exc}") from exc


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

    def __post_init__(self) -> None:
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn-mode {self.bn_mode!r} is not one of {', '.join(BN_MODES)}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
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

    def to_record(self) -> dict[str, int | float | str]:
        """Flat scalars for a Flower ConfigRecord."""
        return {
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
            "evaluate-first": self.evaluate_first,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundSettings:
        """Inverse of :meth:`to_record`; a missing key is a protocol error naming the key."""
        missing = [k for k in cls.keys() if k not in record]
        if missing:
            raise ValueError(f"round config from the server lacks {', '.join(missing)}")
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
            evaluate_first=bool(record.get("evaluate-first", OPTIONAL_ROUND_KEYS["evaluate-first"])),
        )

    @staticmethod
    def keys() -> tuple[str, ...]:
        """The required keys of the round config record (``OPTIONAL_ROUND_KEYS`` may be absent)."""
        return (
            "server-round", "local-epochs", "learning-rate", "batch-size", "seed", "model-name", "model-norm",
            "num-classes", "clinical-covariates", "loss-weight-diagnosis", "loss-weight-prognosis", "prognosis-horizon-days",
            "input-size", "target-spacing-mm", "hu-min", "hu-max", "val-fraction", "test-fraction",
        )  # fmt: skip


def parse_triple(text: str, kind: type, name: str) -> tuple:
    """Parse ``"64,64,48"`` into a 3-tuple of ``kind``; the error names the setting."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"{name} must be three comma-separated numbers, got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"{name} must be three comma-separated numbers, got {text!r}") from exc
