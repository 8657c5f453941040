"""Observability of a running federation: TensorBoard event files and PNG figures, refreshed after every round.

The ServerApp calls :func:`observe_round` at the end of each round with the rounds recorded so far (the
``rounds`` list of :class:`fl_server.run_log.RunLog`, the same entries as in ``metrics.json``). It writes

- ``RUN_DIR/tensorboard/``: one scalar per round for every aggregate metric (``aggregate/<metric>``) and every
  site's metric (``site/<site>/<metric>``) of the train and evaluate sections (``tensorboard --logdir RUN_DIR``);
- ``RUN_DIR/learning_curves.png``: losses, macro AUC and C-index per round, aggregated and per site (the run's
  one learning-curve plotter, :func:`plot_learning_curves`; ``curves.png`` at the end of a run is the same figure);
- ``RUN_DIR/site_metrics.png``: the latest round's validation and test metrics per site, side by side.

Rounds already written to TensorBoard are not written again (the last written round is kept in
``tensorboard/last_round.txt``), so calling it after every round with the whole list is cheap.
Plain Python + matplotlib + torch.utils.tensorboard; no flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedct.protocol import AUC_MACRO, BALANCED_ACCURACY, C_INDEX, LOSS, TEST_PREFIX, TRAIN_LOSS, VAL_PREFIX

TENSORBOARD_FOLDER = "tensorboard"
LEARNING_CURVES = "learning_curves.png"
SITE_METRICS = "site_metrics.png"
_MARKER = "last_round.txt"

#: Metrics drawn per site in ``site_metrics.png`` (key after the split prefix, title).
SITE_PANEL_METRICS = (
    (AUC_MACRO, "macro AUC"),
    (BALANCED_ACCURACY, "balanced accuracy"),
    (C_INDEX, "C-index"),
    (LOSS, "loss"),
)


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite scalar metrics (histogram lists and undefined values left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _check_rounds(rounds: Sequence[Mapping[str, Any]]) -> None:
    for i, entry in enumerate(rounds):
        if not isinstance(entry, Mapping) or "round" not in entry:
            raise ValueError(
                f"rounds[{i}] must be a round entry of metrics.json (a mapping with 'round'), got {entry!r:.80}"
            )
        for section in ("train", "evaluate"):
            if section in entry and not isinstance(entry[section], Mapping):
                raise ValueError(f"rounds[{i}]['{section}'] must be a mapping with 'aggregate' and 'sites'")


def write_tensorboard(run_dir: Path, rounds: Sequence[Mapping[str, Any]]) -> int:
    """Append the rounds not yet written to ``RUN_DIR/tensorboard``; return how many rounds were written."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(run_dir) / TENSORBOARD_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / _MARKER
    last = int(marker.read_text().strip() or 0) if marker.is_file() else 0
    new = [r for r in rounds if int(r["round"]) > last]
    if not new:
        return 0
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for entry in new:
            step = int(entry["round"])
            for section in ("train", "evaluate"):
                part = entry.get(section) or {}
                for key, value in _scalars(part.get("aggregate", {})).items():
                    writer.add_scalar(f"aggregate/{key}", value, step)
                for site, metrics in sorted((part.get("sites") or {}).items()):
                    for key, value in _scalars(metrics).items():
                        writer.add_scalar(f"site/{site}/{key}", value, step)
            if isinstance(entry.get("seconds"), int | float):
                writer.add_scalar("round/seconds", float(entry["seconds"]), step)
        writer.flush()
    finally:
        writer.close()
    marker.write_text(str(max(int(r["round"]) for r in new)))
    return len(new)


def _series(rounds: Sequence[Mapping[str, Any]], section: str, key: str, site: str | None = None) -> list[float]:
    out = []
    for entry in rounds:
        part = entry.get(section) or {}
        source = part.get("aggregate", {}) if site is None else (part.get("sites") or {}).get(site, {})
        value = source.get(key)
        out.append(float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan)
    return out


def plot_learning_curves(run_dir: Path, rounds: Sequence[Mapping[str, Any]], *, name: str = LEARNING_CURVES) -> Path:
    """The one learning-curve figure of a run (``RUN_DIR/<name>``, default ``learning_curves.png``; the run's end
    also writes it as ``curves.png``, :meth:`fl_server.run_log.RunLog.plot`): train/validation loss, macro AUC
    (validation and test of all sites, validation of the pooled predictions when sent, validation per site) and
    validation C-index per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [int(r["round"]) for r in rounds]
    sites = sorted({s for r in rounds for s in ((r.get("evaluate") or {}).get("sites") or {})})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss, ax_auc, ax_c = axes
    ax_loss.plot(x, _series(rounds, "train", TRAIN_LOSS), "o-", color="black", label="train, all sites")
    ax_loss.plot(x, _series(rounds, "evaluate", VAL_PREFIX + LOSS), "s--", color="grey", label="validation, all sites")
    for site in sites:
        ax_loss.plot(x, _series(rounds, "train", TRAIN_LOSS, site), ".-", alpha=0.6, label=f"train, {site}")
    ax_auc.plot(x, _series(rounds, "evaluate", TEST_PREFIX + AUC_MACRO), "s--", color="grey", label="test, all sites")
    pooled = _series(rounds, "evaluate", f"{VAL_PREFIX}pooled-{AUC_MACRO}")
    if any(math.isfinite(v) for v in pooled):
        ax_auc.plot(x, pooled, "^:", linewidth=2, color="tab:purple", label="validation, pooled predictions")
    for ax, key, title in (
        (ax_auc, VAL_PREFIX + AUC_MACRO, "Diagnosis: validation macro AUC"),
        (ax_c, VAL_PREFIX + C_INDEX, "Prognosis: validation C-index"),
    ):
        ax.plot(x, _series(rounds, "evaluate", key), "o-", linewidth=2.5, color="black", label="all sites")
        for site in sites:
            ax.plot(x, _series(rounds, "evaluate", key, site), ".-", alpha=0.7, label=site)
        ax.axhline(0.5, color="red", linestyle=":", linewidth=1, label="chance")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(title)
    ax_loss.set_title("Loss")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if x:
            ax.set_xticks(x)
    fig.tight_layout()
    path = Path(run_dir) / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_site_metrics(run_dir: Path, rounds: Sequence[Mapping[str, Any]]) -> Path:
    """``site_metrics.png``: the latest round's validation and test metrics, one group of bars per site (and all sites)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    latest = rounds[-1] if rounds else {"round": 0}
    evaluate = latest.get("evaluate") or {}
    groups = [("all", evaluate.get("aggregate", {}))] + sorted((evaluate.get("sites") or {}).items())
    fig, axes = plt.subplots(1, len(SITE_PANEL_METRICS), figsize=(4 * len(SITE_PANEL_METRICS), 3.8))
    positions = np.arange(len(groups))
    for ax, (name, title) in zip(axes, SITE_PANEL_METRICS, strict=True):
        for offset, split in ((-0.2, "val"), (0.2, "test")):
            values = [m.get(f"{split}-{name}") for _, m in groups]
            heights = [float(v) if isinstance(v, int | float) and math.isfinite(v) else 0.0 for v in values]
            bars = ax.bar(positions + offset, heights, width=0.4, label="validation" if split == "val" else "test")
            for bar, v in zip(bars, values, strict=True):
                if not (isinstance(v, int | float) and math.isfinite(v)):
                    ax.text(bar.get_x() + bar.get_width() / 2, 0.02, "n/a", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(positions, [g for g, _ in groups], rotation=30, fontsize=8)
        ax.set_title(title)
        if name != "loss":
            ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Per-site metrics of the global model after round {latest.get('round', 0)}")
    fig.tight_layout()
    path = Path(run_dir) / SITE_METRICS
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def observe_round(run_dir: Path, rounds: list[dict]) -> None:
    """After a round: TensorBoard scalars of the new rounds, ``learning_curves.png`` and ``site_metrics.png``."""
    if not isinstance(rounds, list):
        raise ValueError(f"rounds must be the list of round entries of metrics.json, got {type(rounds).__name__}")
    _check_rounds(rounds)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_tensorboard(run_dir, rounds)
    if rounds:
        plot_learning_curves(run_dir, rounds)
        plot_site_metrics(run_dir, rounds)
