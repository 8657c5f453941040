"""Stage 6: local training and evaluation at a site. Plain PyTorch/MONAI; never imports flwr."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from torch import nn

from fl_client.config import RoundSettings, SiteConfig
from fl_client.metrics import classification_metrics
from models.factory import build_model
from preprocessing.cache import make_dataset
from preprocessing.ingest import SiteManifest, prepare_site


@dataclass(frozen=True)
class TrainResult:
    """What a local training round produced, besides the weights."""

    num_examples: int
    loss: float
    steps: int
    seconds: float


@dataclass(frozen=True)
class Predictions:
    """Class probabilities and true labels of one split."""

    probs: np.ndarray
    labels: np.ndarray


def select_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available to PyTorch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_site(site: SiteConfig, settings: RoundSettings) -> SiteManifest:
    """The site's prepared studies for this round's pipeline (ingested on first use)."""
    return prepare_site(
        site.dicom_dir, site.site_dir, labels_csv=site.labels_csv, pipeline=settings.pipeline, split=settings.split,
        workers=site.workers,
    )  # fmt: skip


def _loader(manifest: SiteManifest, split: str, settings: RoundSettings, *, train: bool, device: torch.device) -> DataLoader:
    items = [entry.item() for entry in manifest.split(split)]
    dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=train)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + settings.server_round)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=0,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def _model(settings: RoundSettings, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    model = build_model(settings.model)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.to(device)


def train_model(model: nn.Module, loader: DataLoader, *, epochs: int, lr: float, device: torch.device) -> TrainResult:
    """Train ``model`` in place for ``epochs`` over ``loader`` (cross-entropy, Adam; AMP on CUDA)."""
    use_amp = device.type == "cuda"
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    total, steps, seen = 0.0, 0, 0
    for _ in range(epochs):
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = torch.as_tensor(batch["label"], dtype=torch.long).to(device, non_blocking=True)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = criterion(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
            steps += 1
    return TrainResult(
        num_examples=len(loader.dataset), loss=total / max(seen, 1), steps=steps, seconds=time.perf_counter() - t0
    )


def recalibrate_batch_norm(model: nn.Module, loader: DataLoader, *, device: torch.device) -> bool:
    """Recompute BatchNorm running statistics for the final weights (one pass, no augmentation).

    The running averages kept during a short local round lag behind the weights; sent as they are,
    FedAvg averages stale statistics and the global model collapses to one class at evaluation.
    Returns False when the model has no BatchNorm layer.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    images = (batch["image"].to(device, non_blocking=True) for batch in loader)
    torch.optim.swa_utils.update_bn(images, model, device=device)
    return True


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, *, device: torch.device) -> Predictions:
    """Softmax probabilities for every study in ``loader``."""
    model.eval()
    probs, labels = [], []
    for batch in loader:
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            logits = model(batch["image"].to(device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(np.asarray(batch["label"]))
    if not probs:
        return Predictions(np.zeros((0, 0)), np.zeros((0,), dtype=np.int64))
    return Predictions(np.concatenate(probs), np.concatenate(labels).astype(np.int64))


def train_round(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One federated round at a site: load global weights, train on the train split, return new weights."""
    set_determinism(seed=settings.seed * 1000 + settings.server_round)
    device = select_device(site.device)
    manifest = load_site(site, settings)
    loader = _loader(manifest, "train", settings, train=True, device=device)
    if len(loader.dataset) == 0:
        raise RuntimeError(f"site {site.site_name} has no labelled training studies (see {site.site_dir}/ingest_report.json)")
    model = _model(settings, state, device)
    result = train_model(model, loader, epochs=settings.local_epochs, lr=settings.learning_rate, device=device)
    recalibrate_batch_norm(model, _loader(manifest, "train", settings, train=False, device=device), device=device)
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return new_state, result


def evaluate_round(site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of the global weights on the site's validation and test splits (keys ``val-*``, ``test-*``)."""
    set_determinism(seed=settings.seed)
    device = select_device(site.device)
    manifest = load_site(site, settings)
    model = _model(settings, state, device)
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        loader = _loader(manifest, split, settings, train=False, device=device)
        preds = predict(model, loader, device=device)
        n_classes = settings.model.num_classes
        probs = preds.probs if len(preds.labels) else np.zeros((0, n_classes))
        site_metrics = classification_metrics(probs, preds.labels, manifest.class_names[:n_classes])
        metrics.update({f"{split}-{k}": v for k, v in site_metrics.items()})
    return metrics
