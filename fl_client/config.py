"""The site's configuration, read in one place.

Two sources, both plain Python by the time they get here:

- the site's own settings (``node_config``, set by hospital IT when starting the SuperNode, e.g.
  ``flower-supernode --node-config 'site-name="site-a" dicom-dir="/data/dicom" site-dir="/cache" device="cpu"'``;
  in simulation ``partition-id`` picks ``site-<id>`` under ``sim-data-root``/``sim-work-root`` of the run config);
- the round settings the server sends with every message (:class:`fedct.protocol.RoundSettings`, the wire
  contract; re-exported here), which the site admits
  (:meth:`SiteConfig.admit`) against its own limits (:mod:`fl_client.limits`) and its fixed split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedct.protocol import RoundSettings, parse_triple
from fl_client.compute import ComputeOptionError, ComputeOptions
from fl_client.limits import SiteLimitError, SiteLimits
from preprocessing.labels import FeedbackSetting
from preprocessing.split import SplitConfig, site_split

DEVICES = ("auto", "cpu", "cuda")
#: Node-config keys of the site's own split fractions (site env FEDCT_VAL_FRACTION / FEDCT_TEST_FRACTION).
SPLIT_NODE_KEYS = ("val-fraction", "test-fraction")

__all__ = [
    "RoundSettings",
    "SiteConfig",
    "SiteConfigError",
    "SiteLimitError",
    "SiteLimits",
    "feedback_setting",
    "parse_triple",
]

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
    #: Folder of the site's profile export (``profile-mapping.toml`` and the table it names, README "Clinical and
    #: molecular profiles"): node config ``profile-dir``, else the labels file's folder when it holds a mapping;
    #: None: the site has no profile (every variable missing).
    profile_dir: Path | None = None
    #: Clinician feedback as training labels (site env ``FEDCT_FEEDBACK_LABELS=yes``, node config ``feedback-labels``;
    #: in simulation run config ``sim-feedback-labels``): the review page's database and the conflict rule; None: off.
    feedback: FeedbackSetting | None = None

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
            site_dir = Path(str(node_config["site-dir"]))
            return cls(
                feedback=feedback_setting(node_config, site_dir, "feedback-"),
                profile_dir=_profile_dir(node_config.get("profile-dir"), Path(str(labels)).parent if labels else None),
                site_name=str(node_config["site-name"]),
                dicom_dir=dicom_dir,
                site_dir=site_dir,
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
            site_dir = Path(str(run_config["sim-work-root"])) / name
            return cls(
                feedback=feedback_setting(run_config, site_dir, "sim-feedback-"),
                profile_dir=_profile_dir(node_config.get("profile-dir"), data_root / name),
                site_name=name,
                dicom_dir=data_root / name / "dicom",
                site_dir=site_dir,
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
        self.limits.check(
            input_size=settings.pipeline.input_size,
            spacing_mm=settings.pipeline.target_spacing_mm,
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
        )
        split = site_split(self.site_dir, site_choice=self.split, requested=settings.split)
        from preprocessing.cache import prune_caches  # MONAI-heavy; the ClientApp has it imported already

        removed = prune_caches(self.site_dir, keep=settings.pipeline, max_bytes=self.limits.cache_max_bytes)
        if removed:
            log.info(
                "%s: removed %d older preprocessing cache(s) to stay under FEDCT_CACHE_MAX_GB=%g",
                self.site_name,
                len(removed),
                self.limits.cache_max_gb,
            )
        return settings if split == settings.split else replace(settings, split=split)


def feedback_setting(config: Mapping[str, Any], site_dir: Path, prefix: str) -> FeedbackSetting | None:
    """The site's opt-in to feedback labels: ``<prefix>labels`` yes/no (default no), ``<prefix>db`` (default
    ``SITE_DIR/feedback.sqlite``), ``<prefix>conflict`` (``labels`` or ``feedback``)."""
    enabled = str(config.get(f"{prefix}labels", "no")).strip().lower()
    if enabled not in ("yes", "no", "true", "false", "1", "0"):
        raise SiteConfigError(f"{prefix}labels={enabled!r} must be yes or no (FEDCT_FEEDBACK_LABELS)")
    if enabled in ("no", "false", "0"):
        return None
    db = config.get(f"{prefix}db")
    try:
        return FeedbackSetting(
            db=Path(str(db)) if db else site_dir / "feedback.sqlite",
            conflict=str(config.get(f"{prefix}conflict", "labels")),
        )
    except ValueError as exc:
        raise SiteConfigError(f"{exc} (FEDCT_FEEDBACK_CONFLICT)") from exc


def _profile_dir(configured: Any, default: Path | None) -> Path | None:
    """The configured profile folder (it must hold ``profile-mapping.toml``), else ``default`` when it holds one."""
    from preprocessing.profile import MAPPING_NAME

    if configured:
        folder = Path(str(configured))
        if not (folder / MAPPING_NAME).is_file():
            raise SiteConfigError(f"profile-dir {folder}: no {MAPPING_NAME} there (FEDCT_PROFILE_DIR)")
        return folder
    return default if default is not None and (default / MAPPING_NAME).is_file() else None


def _split_from_node_config(node_config: Mapping[str, Any]) -> SplitConfig | None:
    """The site's split fractions from the node config (both keys or neither)."""
    present = [k for k in SPLIT_NODE_KEYS if k in node_config]
    if not present:
        return None
    if len(present) != len(SPLIT_NODE_KEYS):
        raise SiteConfigError(
            f"node config has {present[0]} but not {[k for k in SPLIT_NODE_KEYS if k not in present][0]}"
        )
    try:
        return SplitConfig(
            val_fraction=float(node_config["val-fraction"]), test_fraction=float(node_config["test-fraction"])
        )
    except ValueError as exc:
        raise SiteConfigError(f"site split (FEDCT_VAL_FRACTION, FEDCT_TEST_FRACTION): {exc}") from exc
