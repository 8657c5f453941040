"""A run as a campaign of the consortium: where it starts (``init-from``), what it is compared with (the champion),
and its registration in the model registry (``model-registry``) when it ends.

No flwr here: the ServerApp calls :func:`prepare_campaign` before the first round (a refused ``init-from`` ends the
run before any site is contacted, with the reason), hands ``initial`` and ``champion`` to
:func:`fl_server.rounds.run_federation` (which evaluates the champion's weights on every site's splits in one
federated evaluation after the last round), then :func:`finish_campaign` registers ``model/final`` with its lineage
and records the promotion rule's decision against the champion (``models.registry``); the lineage also gets each
site's campaign counts from its training replies (:func:`site_campaign_counts`: new studies, feedback labels). Promotion itself is the
coordinator's act (``fedct models promote``), never automatic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING, getLogger
from pathlib import Path
from typing import Any

import numpy as np

from fedct.protocol import FEEDBACK_CONFLICTS, FEEDBACK_LABELS, NEW_STUDIES
from fl_server.config import ServerConfig
from models.bundle import BundleError, bundle_pipeline, load_bundle
from models.registry import ModelRegistry, RegistryError, lineage_from_bundle

__all__ = [
    "CampaignError",
    "CampaignStart",
    "bundle_arrays",
    "finish_campaign",
    "prepare_campaign",
    "site_campaign_counts",
]

NDArrays = dict[str, np.ndarray]
logger = getLogger("flwr")


class CampaignError(ValueError):
    """The run cannot start as configured: ``init-from`` names no version, or a bundle the run's model or pipeline
    cannot use. The message names the version and the reason."""


@dataclass(frozen=True)
class CampaignStart:
    """What :func:`prepare_campaign` found: the initial weights (None: seeded), the parent version, and the champion
    with its weights (None when there is none, or its weights do not fit this run: ``champion_problem`` says why)."""

    initial: NDArrays | None = None
    parent: str | None = None
    champion: str | None = None
    champion_arrays: NDArrays | None = None
    champion_problem: str | None = None

    @property
    def champion_pair(self) -> tuple[str, NDArrays] | None:
        """``(version, weights)`` for the run's final federated comparison, or None."""
        return (self.champion, self.champion_arrays) if self.champion and self.champion_arrays is not None else None


def bundle_arrays(folder: Path, config: ServerConfig) -> NDArrays:
    """A bundle's weights as the run's global arrays, refused (BundleError naming the reason) when its architecture
    differs from the run's model, its pipeline version from this code's (``models.bundle.load_bundle``), or its
    preprocessing settings (spacing, input size, HU window) from the run's."""
    model, meta = load_bundle(folder, expected_model=config.model)
    theirs, ours = bundle_pipeline(meta), config.pipeline
    if theirs != ours:
        raise BundleError(
            f"{folder}: trained on preprocessing {theirs.to_dict()}, the run config asks for {ours.to_dict()}; "
            "the weights would see inputs they were not trained on"
        )
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def prepare_campaign(config: ServerConfig) -> CampaignStart:
    """Before the first round: the ``init-from`` weights (CampaignError with the reason when refused) and the champion
    to compare with at the end (its weights, or why they cannot be evaluated by this run)."""
    if not config.model_registry:
        return CampaignStart()
    registry = ModelRegistry(Path(config.model_registry))
    initial, parent = None, None
    if config.init_from:
        try:
            parent = registry.resolve(config.init_from)
            initial = bundle_arrays(registry.bundle_path(parent), config)
        except (RegistryError, BundleError) as exc:
            raise CampaignError(f"init-from = {config.init_from!r} refused before the run starts: {exc}") from None
        logger.log(INFO, "fedct: starting from registry version %s (%s)", parent, registry.root)
    champion = registry.champion()
    if champion is None:
        return CampaignStart(initial=initial, parent=parent)
    if champion == parent:
        return CampaignStart(initial=initial, parent=parent, champion=champion, champion_arrays=initial)
    try:
        arrays = bundle_arrays(registry.bundle_path(champion), config)
    except (RegistryError, BundleError) as exc:
        problem = f"the champion {champion} cannot be evaluated by this run: {exc}"
        logger.log(WARNING, "fedct: %s", problem)
        return CampaignStart(initial=initial, parent=parent, champion=champion, champion_problem=problem)
    return CampaignStart(initial=initial, parent=parent, champion=champion, champion_arrays=arrays)


def _comparison(start: CampaignStart, evaluation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The lineage's ``champion_comparison``: the champion's per-site metrics from the run's federated evaluation."""
    if start.champion is None:
        return None
    if start.champion_problem:
        return {"champion": start.champion, "missing": start.champion_problem}
    if not evaluation or not evaluation.get("sites"):
        reason = (evaluation or {}).get("missing") or "no evaluation of the champion"
        return {"champion": start.champion, "missing": reason}
    return {
        "champion": start.champion,
        "round": evaluation.get("round"),
        "sites": evaluation["sites"],
        "aggregate": evaluation.get("aggregate", {}),
    }


def site_campaign_counts(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Per site, the campaign counts of its training replies in this run (``metrics.json``): studies new since its
    previous campaign, training studies labelled by clinician feedback, feedback conflicting with labels.csv (each
    None where the site's privacy floor withheld it or it did not send it; the first round it trained in)."""
    try:
        rounds = json.loads((Path(run_dir) / "metrics.json").read_text()).get("rounds") or []
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for entry in rounds:
        for site, metrics in ((entry.get("train") or {}).get("sites") or {}).items():
            if site in out or not isinstance(metrics, dict):
                continue
            out[site] = {key: _finite(metrics.get(key)) for key in (NEW_STUDIES, FEEDBACK_LABELS, FEEDBACK_CONFLICTS)}
    return dict(sorted(out.items()))


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def finish_campaign(
    config: ServerConfig,
    start: CampaignStart,
    run_dir: Path,
    *,
    aggregated_rounds: int,
    champion_evaluation: Mapping[str, Any] | None = None,
) -> str | None:
    """Register the run's ``model/final`` bundle (lineage: parent, run config, strategy, rounds, sites, counts,
    pipeline version, metrics per site, temperature, the champion comparison) and, when there is a champion, log the
    promotion rule's decision; return the new version (None without a registry or when no round was aggregated)."""
    if not config.model_registry:
        return None
    if aggregated_rounds == 0:
        logger.log(WARNING, "fedct: no round was aggregated; nothing registered in %s", config.model_registry)
        return None
    registry = ModelRegistry(Path(config.model_registry))
    final = Path(run_dir) / "model" / "final"
    _, meta = load_bundle(final, expected_model=config.model)
    lineage = lineage_from_bundle(
        meta,
        parent=start.parent,
        run_dir=str(Path(run_dir).resolve()),
        champion_comparison=_comparison(start, champion_evaluation),
        campaign_counts=site_campaign_counts(Path(run_dir)),
    )
    version = registry.register(
        final,
        lineage=lineage,
        who="fedct server",
        why=f"run {Path(run_dir).name} finished ({aggregated_rounds} aggregated round(s))",
    )
    logger.log(INFO, "fedct: registered the final model as %s in %s", version, registry.root)
    if registry.champion() is not None:
        decision = registry.record_decision(
            version, config.promotion_rule, who="fedct server", why="the run's final model against the champion"
        )
        logger.log(INFO, "fedct: %s", decision.summary())
    return version
