"""Stage 8: the global model on disk: per-round checkpoints and model bundles with provenance.

A bundle is a folder with ``model.pt`` (a PyTorch state dict) and ``model.json`` (architecture,
preprocessing pipeline, class names, training provenance), enough to rebuild the network and repeat
the exact preprocessing at inference.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.factory import ModelConfig, build_model
from preprocessing.labels import DIAGNOSES
from preprocessing.transforms import PipelineConfig

BUNDLE_FORMAT = "fedct-model/1"


def save_state(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write a state dict atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({k: torch.as_tensor(v).clone() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    return path


def write_bundle(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    model: ModelConfig,
    pipeline: PipelineConfig,
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``folder``; return the folder."""
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
    }
    tmp = folder / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str, allow_nan=False))
    os.replace(tmp, folder / "model.json")
    return folder


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
