"""Stage 8: the global model on disk: per-round checkpoints and model bundles with provenance.

A bundle is a folder with ``model.pt`` (a PyTorch state dict) and ``model.json`` (architecture,
preprocessing pipeline, class names, training provenance), enough to rebuild the network and repeat
the exact preprocessing at inference.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import torch
from torch import nn

from models.factory import ModelConfig, build_model
from preprocessing.labels import DIAGNOSES
from preprocessing.transforms import PipelineConfig

BUNDLE_FORMAT = "fedct-model/1"


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace``: readers see the old file or the
    whole new one, never a part (also after a crash or power loss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def save_state(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write a state dict atomically (a crash never leaves a half-written checkpoint)."""
    buffer = io.BytesIO()
    torch.save({k: torch.as_tensor(v).clone() for k, v in state.items()}, buffer)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def write_bundle(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    model: ModelConfig,
    pipeline: PipelineConfig,
    provenance: Mapping[str, Any],
    risk_reference: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.pt``, ``model.json`` and ``model_card.md`` into ``folder``; return the folder.

    ``risk_reference`` (``{"quantiles": [low/intermediate cut, intermediate/high cut], ...}``) places a new
    patient's risk score relative to the training population.
    """
    folder = Path(folder)
    save_state(folder / "model.pt", state)
    from importlib.metadata import PackageNotFoundError, version

    try:
        fedct_version = version("fedct")
    except PackageNotFoundError:
        fedct_version = "unknown"
    meta = {
        "format": BUNDLE_FORMAT,
        "fedct_version": fedct_version,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": asdict(model),
        "pipeline": pipeline.to_dict(),
        "class_names": list(DIAGNOSES[: model.num_classes]),
        "provenance": dict(provenance),
        "risk_reference": dict(risk_reference) if risk_reference else None,
    }
    atomic_write_bytes(folder / "model.json", json.dumps(_finite(meta), indent=2, default=str, allow_nan=False).encode())
    atomic_write_bytes(folder / "model_card.md", model_card(meta).encode())
    return folder


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def model_card(meta: Mapping[str, Any]) -> str:
    """A short model card (Markdown): intended use, training data in aggregate, metrics per site, limitations."""
    prov = meta.get("provenance", {})
    metrics = prov.get("metrics", {})
    model = meta["model"]
    pipeline = meta["pipeline"]

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "n/a"

    lines = [
        f"# Model card: fedct {model['name']} (diagnosis + prognosis)",
        "",
        f"Created {meta['created_utc']} by fedct {meta['fedct_version']}; weights of round {prov.get('round_of_weights')} "
        f"of {prov.get('rounds_planned')} ({prov.get('strategy', 'FedAvg')}).",
        "",
        "## Intended use",
        "Research decision support for chest CT: probabilities of a COVID-19-like pattern, other pneumonia or normal "
        "lungs, and a relative risk score for a severe outcome. **Not for clinical use without local validation.** "
        "It does not replace a radiologist's read.",
        "",
        "## Training data (aggregate only)",
        f"Trained federated across {len(prov.get('sites', []))} site(s): {', '.join(prov.get('sites', [])) or 'n/a'}. "
        "Studies used for training per site: "
        + (", ".join(f"{s} {int(n)}" for s, n in sorted(metrics.get("training_studies", {}).items()) if n is not None) or "n/a")
        + ". No image or patient data left the sites.",
        f"Input: single-frame or Enhanced CT, resampled to {pipeline['target_spacing_mm']} mm, HU window "
        f"[{pipeline['hu_min']}, {pipeline['hu_max']}], {pipeline['input_size']} voxels (pipeline version {pipeline['pipeline_version']}).",
        "",
        "## Metrics of these weights (held-out test split of each site)",
        "| site | studies | diagnosis macro AUC | accuracy | prognosis C-index |",
        "|---|---|---|---|---|",
    ]
    for site, m in sorted(metrics.get("sites", {}).items()):
        lines.append(f"| {site} | {int(m.get('test-n') or 0)} | {fmt(m.get('test-auc-macro'))} | {fmt(m.get('test-accuracy'))} | "
                     f"{fmt(m.get('test-c-index'))} |")  # fmt: skip
    agg = metrics.get("aggregate", {})
    lines.append(f"| all (weighted mean of sites) | {int(agg.get('test-n') or 0)} | {fmt(agg.get('test-auc-macro'))} | "
                 f"{fmt(agg.get('test-accuracy'))} | {fmt(agg.get('test-c-index'))} |")  # fmt: skip
    lines += [
        "",
        "## Limitations",
        "- Small per-site test splits: metrics carry wide uncertainty.",
        "- Calibration across sites is not guaranteed (normalisation statistics are aggregated across sites, "
        "see bn-mode in the run config); check the "
        "operating point locally.",
        "- Trained on the data of the listed sites only; scanners, protocols and populations elsewhere may differ.",
        "",
    ]
    return "\n".join(lines)


def load_bundle(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a bundle and load its weights; return ``(model, metadata)``."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a model bundle (no model.json): {folder}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    model = build_model(ModelConfig(**meta["model"]))
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model, meta


def bundle_pipeline(meta: Mapping[str, Any]) -> PipelineConfig:
    """The preprocessing recorded in a bundle's metadata."""
    p = dict(meta["pipeline"])
    p.pop("pipeline_version", None)
    return PipelineConfig(
        target_spacing_mm=tuple(p["target_spacing_mm"]),
        input_size=tuple(p["input_size"]),
        hu_min=p["hu_min"],
        hu_max=p["hu_max"],
        body_threshold_hu=p["body_threshold_hu"],
    )


# --- resume state ---------------------------------------------------------------------------------------------

RUN_STATE_FORMAT = "fedct-run-state/1"


@dataclass(frozen=True)
class RunState:
    """Everything a restarted server needs to continue after ``server_round`` (the last completed round)."""

    server_round: int
    global_arrays: dict[str, np.ndarray]
    strategy_scalars: dict[str, Any]
    strategy_arrays: dict[str, dict[str, np.ndarray]]
    run_log: dict[str, Any]
    run_config: dict[str, Any]
    extra: dict[str, Any]


def save_run_state(state_dir: Path, state: RunState) -> Path:
    """Write ``state`` into ``state_dir``: ``round-NNN.npz`` (arrays), then ``state.json`` naming it with its SHA-256.

    Both are written atomically, and ``state.json`` last, so it always names a complete arrays file; older arrays
    files are removed afterwards.
    """
    state_dir = Path(state_dir)
    arrays: dict[str, np.ndarray] = {f"global::{k}": np.asarray(v) for k, v in state.global_arrays.items()}
    for attr, values in state.strategy_arrays.items():
        arrays.update({f"strategy::{attr}::{k}": np.asarray(v) for k, v in values.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    arrays_name = f"round-{state.server_round:03d}.npz"
    atomic_write_bytes(state_dir / arrays_name, data)
    meta = {
        "format": RUN_STATE_FORMAT,
        "round": state.server_round,
        "arrays_file": arrays_name,
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "strategy_scalars": state.strategy_scalars,
        "run_log": state.run_log,
        "run_config": state.run_config,
        "extra": state.extra,
    }
    path = atomic_write_bytes(state_dir / "state.json", json.dumps(_finite(meta), indent=1, default=str).encode())
    for old in state_dir.glob("round-*.npz"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return path


def load_run_state(state_dir: Path) -> RunState | None:
    """The state written by :func:`save_run_state`, or None when there is none. Temporary files are never read;
    an arrays file whose checksum differs from ``state.json`` is an error naming it."""
    state_dir = Path(state_dir)
    meta_path = state_dir / "state.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != RUN_STATE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {RUN_STATE_FORMAT!r}")
    arrays_path = state_dir / str(meta["arrays_file"])
    data = arrays_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["arrays_sha256"]:
        raise ValueError(f"{arrays_path} does not match the checksum recorded in {meta_path}; the state is damaged")
    global_arrays: dict[str, np.ndarray] = {}
    strategy_arrays: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for name in npz.files:
            kind, rest = name.split("::", 1)
            if kind == "global":
                global_arrays[rest] = npz[name]
            else:
                attr, key = rest.split("::", 1)
                strategy_arrays.setdefault(attr, {})[key] = npz[name]
    return RunState(
        server_round=int(meta["round"]),
        global_arrays=global_arrays,
        strategy_arrays=strategy_arrays,
        strategy_scalars=dict(meta["strategy_scalars"]),
        run_log=dict(meta["run_log"]),
        run_config=dict(meta["run_config"]),
        extra=dict(meta.get("extra") or {}),
    )
