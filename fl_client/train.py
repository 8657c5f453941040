"""Stage 6: local training and evaluation at a site. Plain PyTorch/MONAI; never imports flwr.

The loss is ``w_diagnosis * cross-entropy + w_prognosis * Cox partial likelihood``; a study whose diagnosis or
outcome is unknown is masked out of that term (never guessed).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from torch import nn

from fl_client.config import RoundSettings, SiteConfig
from fl_client.metrics import (
    choose_operating_points,
    classification_metrics,
    risk_histogram,
    score_histograms,
    survival_metrics,
)
from models.factory import MultiTaskNet, ModelOutput, build_model, covariate_vector, norm_state_keys
from preprocessing.cache import make_dataset
from preprocessing.ingest import SiteManifest, prepare_site


class NoTrainingData(RuntimeError):
    """The site has no training studies for this round; the server sees only the reason code below."""

    code = "no_training_data"


@dataclass(frozen=True)
class TrainResult:
    """What a local training round produced, besides the weights."""

    num_examples: int
    loss: float
    diagnosis_loss: float
    prognosis_loss: float
    steps: int
    seconds: float


@dataclass(frozen=True)
class Predictions:
    """Model outputs and targets of one split (NaN / -1 where a target is unknown)."""

    probs: np.ndarray
    labels: np.ndarray
    risk: np.ndarray
    time: np.ndarray
    event: np.ndarray


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
    items = [entry.item() for entry in manifest.split(split, labelled_only=False)]
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


def _model(settings: RoundSettings, state: Mapping[str, torch.Tensor], device: torch.device) -> MultiTaskNet:
    model = build_model(settings.model)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.to(device)


def forward(model: MultiTaskNet, batch: Mapping[str, Any], device: torch.device) -> ModelOutput:
    """Run the model on a collated batch (fusing covariates when the model uses them)."""
    images = batch["image"].to(device, non_blocking=True)
    covariates = None
    if model.n_covariates:
        covariates = covariate_vector(torch.as_tensor(batch["age"]), torch.as_tensor(batch["sex"])).to(device)
    return model(images, covariates)


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event (Breslow's handling of ties).

    Studies with unknown time or event (NaN) are masked; with no event in the batch the loss is 0 (and still
    part of the graph).
    """
    time, event = time.to(risk.device, risk.dtype), event.to(risk.device, risk.dtype)
    known = ~(torch.isnan(time) | torch.isnan(event))
    risk, time, event = risk[known], time[known], event[known]
    if event.sum() <= 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(risk, dim=0)
    # Breslow: every study tied at a time shares the risk set of the last of them in this order.
    tied_last = torch.searchsorted(-time, -time, right=True) - 1
    log_risk_set = log_risk_set[tied_last]
    return -((risk - log_risk_set) * event).sum() / event.sum()


def multitask_loss(
    output: ModelOutput, batch: Mapping[str, Any], *, weights: tuple[float, float], device: torch.device
) -> tuple[torch.Tensor, float, float]:
    """Weighted sum of the masked diagnosis and prognosis losses; also returns both parts as floats."""
    labels = torch.as_tensor(batch["label"], dtype=torch.long).to(device)
    known = labels >= 0
    diagnosis = nn.functional.cross_entropy(output.logits.float()[known], labels[known]) if known.any() else output.logits.sum() * 0.0
    prognosis = cox_partial_likelihood(output.risk.float(), torch.as_tensor(batch["time"]), torch.as_tensor(batch["event"]))
    total = weights[0] * diagnosis + weights[1] * prognosis
    return total, float(diagnosis.detach()), float(prognosis.detach())


def train_model(
    model: MultiTaskNet,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    loss_weights: tuple[float, float] = (1.0, 0.5),
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` over ``loader`` (Adam; mixed precision on CUDA).

    With ``proximal_mu`` > 0 (FedProx) the loss gets ``mu/2 * ||w - w_start||^2`` over the trainable parameters,
    ``w_start`` being the weights the round began with (the global model): local training is pulled toward it.
    """
    use_amp = device.type == "cuda"
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.train()
    t0 = time.perf_counter()
    totals = np.zeros(3)
    steps, seen = 0, 0
    for _ in range(epochs):
        for batch in loader:
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                output = forward(model, batch, device)
            loss, diagnosis, prognosis = multitask_loss(output, batch, weights=loss_weights, device=device)
            if anchor:
                loss = loss + proximal_term(model, anchor, proximal_mu)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            n = len(batch["label"])
            totals += np.array([float(loss.detach()), diagnosis, prognosis]) * n
            seen += n
            steps += 1
    mean = totals / max(seen, 1)
    return TrainResult(num_examples=len(loader.dataset), loss=float(mean[0]), diagnosis_loss=float(mean[1]),
                       prognosis_loss=float(mean[2]), steps=steps, seconds=time.perf_counter() - t0)  # fmt: skip


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * sum ||w - w_anchor||^2`` over ``model.parameters()`` (in that order)."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
    return 0.5 * mu * total


def local_norm_path(site: SiteConfig, settings: RoundSettings) -> Path:
    """Where a site keeps its own normalisation layers under ``bn-mode = local`` (FedBN), per architecture."""
    model = settings.model
    return site.site_dir / "fedbn" / f"{model.name}-{model.norm}-{model.num_classes}-{int(model.covariates)}.pt"


def with_local_norm(site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The received global weights with the site's own normalisation layers substituted (FedBN).

    Before the site's first round under ``bn-mode = local`` there is nothing saved and the global ones are used.
    A saved file whose keys or shapes do not fit the model is ignored (and replaced after this round).
    """
    merged = {k: torch.as_tensor(v) for k, v in state.items()}
    path = local_norm_path(site, settings)
    if settings.bn_mode != "local" or not path.is_file():
        return merged
    local = torch.load(path, weights_only=True)
    if all(k in merged and merged[k].shape == v.shape for k, v in local.items()):
        merged.update({k: v.to(merged[k].dtype) for k, v in local.items()})
    return merged


def save_local_norm(site: SiteConfig, settings: RoundSettings, model: nn.Module) -> Path | None:
    """Keep the site's normalisation layers after local training (``bn-mode = local``); atomic write."""
    if settings.bn_mode != "local":
        return None
    keys = norm_state_keys(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}
    path = local_norm_path(site, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def recalibrate_batch_norm(model: nn.Module, loader: Any, *, device: torch.device) -> bool:
    """Recompute BatchNorm running statistics for the final weights (one pass, no augmentation).

    The running averages kept during a short local round lag behind the weights; sent as they are,
    FedAvg averages stale statistics and the global model collapses to one class at evaluation.
    Returns False when the model has no BatchNorm layer.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False

    class _Images(nn.Module):  # update_bn feeds the first element of each batch to the module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: Mapping[str, Any]) -> Any:
            return forward(self.inner, batch, device) if isinstance(self.inner, MultiTaskNet) else self.inner(batch["image"].to(device))

    wrapper = _Images(model)
    torch.optim.swa_utils.update_bn(([batch] for batch in loader), wrapper, device=None)
    return True


@torch.no_grad()
def predict(model: MultiTaskNet, loader: Any, *, device: torch.device) -> Predictions:
    """Diagnosis probabilities and risk scores for every study in ``loader``, with its targets."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("probs", "labels", "risk", "time", "event")}
    for batch in loader:
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            output = forward(model, batch, device)
        n = len(batch["label"])
        parts["probs"].append(torch.softmax(output.logits.float(), dim=1).cpu().numpy())
        parts["risk"].append(output.risk.float().cpu().numpy())
        parts["labels"].append(np.asarray(batch["label"], dtype=np.int64).reshape(n))
        parts["time"].append(np.asarray(batch.get("time", [math.nan] * n), dtype=np.float64).reshape(n))
        parts["event"].append(np.asarray(batch.get("event", [math.nan] * n), dtype=np.float64).reshape(n))
    if not parts["probs"]:
        n_classes = model.diagnosis.out_features
        return Predictions(np.zeros((0, n_classes)), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0))
    return Predictions(**{k: np.concatenate(v) for k, v in parts.items()})


def train_round(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One federated round at a site: load global weights, train on the train split, return new weights."""
    settings = site.admit(settings)  # the site's limits, its fixed split, its cache cap (fl_client/config.py)
    set_determinism(seed=settings.seed * 1000 + settings.server_round)
    device = select_device(site.device)
    manifest = load_site(site, settings)
    loader = _loader(manifest, "train", settings, train=True, device=device)
    if len(loader.dataset) == 0:
        raise NoTrainingData(f"site {site.site_name} has no training studies (see {site.site_dir}/ingest_report.json)")
    model = _model(settings, with_local_norm(site, settings, state), device)
    result = train_model(model, loader, epochs=settings.local_epochs, lr=settings.learning_rate, device=device,
                         loss_weights=settings.loss_weights, proximal_mu=settings.proximal_mu)  # fmt: skip
    recalibrate_batch_norm(model, _loader(manifest, "train", settings, train=False, device=device), device=device)
    save_local_norm(site, settings, model)
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return new_state, result


def split_metrics(preds: Predictions, class_names: tuple[str, ...], *, thresholds: Mapping[str, float], horizon_days: float) -> dict:
    """Diagnosis, calibration, operating-point, prognosis metrics and score histograms of one split."""
    known = preds.labels >= 0
    metrics: dict[str, Any] = classification_metrics(preds.probs[known], preds.labels[known], class_names, thresholds=thresholds)
    metrics.update(survival_metrics(preds.risk, preds.time, preds.event, horizon_days=horizon_days))
    metrics.update(score_histograms(preds.probs[known], preds.labels[known], class_names))
    return metrics


def evaluate_round(site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Metrics of the global weights on the site's validation and test splits (keys ``val-*``, ``test-*``).

    Operating points (one per class, Youden's J) are chosen on validation and applied to both splits. The
    histogram of the training studies' risk scores (``train-hist-risk``) lets the server place future
    patients in risk groups relative to the training population.
    """
    settings = site.admit(settings)  # the site's limits, its fixed split, its cache cap (fl_client/config.py)
    set_determinism(seed=settings.seed)
    device = select_device(site.device)
    manifest = load_site(site, settings)
    model = _model(settings, with_local_norm(site, settings, state), device)
    class_names = tuple(manifest.class_names[: settings.model.num_classes])
    preds = {split: predict(model, _loader(manifest, split, settings, train=False, device=device), device=device)
             for split in ("val", "test")}  # fmt: skip
    val_known = preds["val"].labels >= 0
    thresholds = choose_operating_points(preds["val"].probs[val_known], preds["val"].labels[val_known], class_names)
    metrics: dict[str, Any] = {}
    for split, p in preds.items():
        values = split_metrics(p, class_names, thresholds=thresholds, horizon_days=settings.horizon_days)
        metrics.update({f"{split}-{k}": v for k, v in values.items()})
    train = predict(model, _loader(manifest, "train", settings, train=False, device=device), device=device)
    metrics.update({f"train-{k}": v for k, v in risk_histogram(train.risk).items()})
    return metrics
