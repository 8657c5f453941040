"""Stage 6: local training and evaluation at a site. Plain PyTorch/MONAI; never imports flwr.

The loss is ``w_diagnosis * cross-entropy + w_prognosis * Cox partial likelihood``; a study whose diagnosis or
outcome is unknown is masked out of that term (never guessed).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from torch import nn

from fedct.files import atomic_write_bytes
from fedct.protocol import RELIABILITY_FIELDS, TEST_PREFIX, VAL_CALIBRATION_NLL, BadRoundConfig, reliability_key
from fl_client.compute import Compute, ComputeOptions, resolve_compute
from fl_client.config import RoundSettings, SiteConfig
from fl_client.metrics import (
    choose_operating_points,
    classification_metrics,
    risk_histogram,
    score_histograms,
    survival_metrics,
)
from models.calibration import apply_temperature, nll_grid, reliability_bins
from models.factory import ModelOutput, MultiTaskNet, as_plain_tensor, build_model, covariate_vector, norm_state_keys
from preprocessing.cache import make_dataset
from preprocessing.ingest import SiteManifest
from preprocessing.profile_features import SiteProfile, attach_profile
from preprocessing.transforms import BatchAugment


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
    """Model outputs and targets of one split (NaN / -1 where a target is unknown); ``logits`` are the diagnosis
    head's raw outputs (``probs`` is their softmax), for calibration."""

    probs: np.ndarray
    labels: np.ndarray
    risk: np.ndarray
    time: np.ndarray
    event: np.ndarray
    logits: np.ndarray | None = None


def select_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available to PyTorch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_site(site: SiteConfig, settings: RoundSettings) -> SiteManifest:
    """The site's prepared studies for this round's pipeline (ingested on first use), with clinician feedback as
    training labels when the site opted in (``fl_client.campaign.site_manifest``)."""
    from fl_client.campaign import site_manifest

    return site_manifest(site, settings)[0]


def site_compute(site: SiteConfig) -> Compute:
    """The site's compute settings resolved for its device (precision, channels-last, loader, augmentation)."""
    return resolve_compute(site.compute, select_device(site.device))


def make_loader(dataset: Any, *, batch_size: int, shuffle: bool, compute: Compute, seed: int) -> DataLoader:
    """A DataLoader with the site's loader settings (workers, persistent workers, pinned memory)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        num_workers=compute.loader_workers,
        persistent_workers=compute.persistent_workers and compute.loader_workers > 0,
        pin_memory=compute.pin_memory,
        generator=generator,
    )


def site_profile(site: SiteConfig, settings: RoundSettings) -> SiteProfile | None:
    """The site's profile table when the round's model fuses one and the site has an export (else None: every
    variable missing for every study). The site's schema is the shipped one; the server's must name the same variables."""
    if settings.model.profile_fusion == "none" or site.profile_dir is None:
        return None
    return SiteProfile.read(site.profile_dir)


def _loader(
    manifest: SiteManifest,
    split: str,
    settings: RoundSettings,
    *,
    train: bool,
    compute: Compute,
    profile: SiteProfile | None = None,
) -> DataLoader:
    entries = manifest.split(split, labelled_only=False)
    items = [entry.item() for entry in entries]
    if (
        settings.model.profile_fusion != "none"
    ):  # the normalised profile joins the targets; the image cache key is unchanged
        if settings.profile is None:
            raise BadRoundConfig("the round fuses the profile but carries no profile normalisation")
        items = attach_profile(items, [entry.series for entry in entries], profile, settings.profile)
    # With gpu-augment the loader yields the cached (deterministic) images and the training step augments on the GPU.
    dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=train and not compute.gpu_augment)
    return make_loader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=train,
        compute=compute,
        seed=settings.seed * 1000 + settings.server_round,
    )


def batch_augment(settings: RoundSettings, compute: Compute) -> BatchAugment | None:
    """The on-device augmentation of a training round (None when the loader augments, i.e. off the GPU)."""
    if not compute.gpu_augment:
        return None
    return BatchAugment(settings.pipeline, seed=settings.seed * 1000 + settings.server_round)


def _model(settings: RoundSettings, state: Mapping[str, torch.Tensor], compute: Compute) -> MultiTaskNet:
    model = build_model(settings.model)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return prepare_model(model, compute)


def prepare_model(model: MultiTaskNet, compute: Compute) -> MultiTaskNet:
    """Move ``model`` to the compute device (in place), in channels_last_3d memory format when that is set."""
    model = model.to(compute.device)
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def autocast(compute: Compute | None, device: torch.device) -> AbstractContextManager:
    """Mixed-precision context of ``compute`` (bf16 or fp16 autocast), or nothing for fp32."""
    dtype = compute.autocast_dtype if compute is not None else None
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def model_input(
    images: torch.Tensor,
    device: torch.device,
    *,
    channels_last: bool = False,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A batch's images as the network takes them: a plain tensor (MONAI metadata stays in the loader) on
    ``device``, augmented there when ``augment`` is given, in channels_last_3d layout when asked."""
    images = as_plain_tensor(images).to(device, non_blocking=True)
    if augment is not None:
        images = augment(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last_3d)
    return images


def forward(
    model: MultiTaskNet,
    batch: Mapping[str, Any],
    device: torch.device,
    *,
    channels_last: bool = False,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ModelOutput:
    """Run the model on a collated batch (fusing covariates and the profile when the model uses them).

    The one path for training, evaluation, BatchNorm recalibration and the benchmarks: see :func:`model_input`.
    """
    images = model_input(batch["image"], device, channels_last=channels_last, augment=augment)
    covariates = None
    if model.n_covariates:
        covariates = covariate_vector(torch.as_tensor(batch["age"]), torch.as_tensor(batch["sex"])).to(
            device, non_blocking=True
        )
    profile = None
    if model.n_profile:  # (B, 2V) z-scores and presence flags (preprocessing.profile_features)
        profile = torch.as_tensor(batch["profile"], dtype=torch.float32).to(device, non_blocking=True)
    return model(images, covariates, profile)


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event (Breslow's handling of ties).

    Studies with unknown time or event (NaN) are masked; with no event in the batch the loss is 0 (and still
    part of the graph).
    """
    # Masks and the "any event?" test are decided on the host copy of the targets, so that a CUDA step never waits
    # for the GPU here (boolean indexing of a device tensor would synchronise).
    time = torch.as_tensor(time).detach().to("cpu", risk.dtype)
    event = torch.as_tensor(event).detach().to("cpu", risk.dtype)
    known = torch.nonzero(~(torch.isnan(time) | torch.isnan(event))).squeeze(1)
    time, event = time[known], event[known]
    if event.sum() <= 0:
        return risk.sum() * 0.0
    risk = risk.index_select(0, known.to(risk.device, non_blocking=True))
    time, event = time.to(risk.device, non_blocking=True), event.to(risk.device, non_blocking=True)
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    log_risk_set = torch.logcumsumexp(risk, dim=0)
    # Breslow: every study tied at a time shares the risk set of the last of them in this order.
    tied_last = torch.searchsorted(-time, -time, right=True) - 1
    log_risk_set = log_risk_set[tied_last]
    return -((risk - log_risk_set) * event).sum() / event.sum()


def loss_terms(
    output: ModelOutput, batch: Mapping[str, Any], *, weights: tuple[float, float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted sum of the masked diagnosis and prognosis losses, and both parts, as tensors on ``device``.

    Nothing here reads a value back from the device, so a CUDA step runs without waiting for the GPU.
    """
    labels = torch.as_tensor(batch["label"], dtype=torch.long).detach().cpu()
    known = torch.nonzero(labels >= 0).squeeze(1)
    if len(known):
        logits = output.logits.float().index_select(0, known.to(device, non_blocking=True))
        diagnosis = nn.functional.cross_entropy(logits, labels[known].to(device, non_blocking=True))
    else:
        diagnosis = output.logits.sum() * 0.0
    prognosis = cox_partial_likelihood(
        output.risk.float(), torch.as_tensor(batch["time"]), torch.as_tensor(batch["event"])
    )
    total = weights[0] * diagnosis + weights[1] * prognosis
    return total, diagnosis.detach(), prognosis.detach()


def multitask_loss(
    output: ModelOutput, batch: Mapping[str, Any], *, weights: tuple[float, float], device: torch.device
) -> tuple[torch.Tensor, float, float]:
    """Weighted sum of the masked diagnosis and prognosis losses; also returns both parts as floats."""
    total, diagnosis, prognosis = loss_terms(output, batch, weights=weights, device=device)
    return total, float(diagnosis), float(prognosis)


def train_model(
    model: MultiTaskNet,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    loss_weights: tuple[float, float] = (1.0, 0.5),
    proximal_mu: float = 0.0,
    compute: Compute | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    profile_dropout: float = 0.0,
    optimiser: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` over ``loader`` (Adam).

    ``optimiser``: an Adam over ``model.parameters()`` to continue (e.g. the site's from its previous round,
    :func:`local_optimiser`); its learning rate is set to ``lr``. Default: a fresh Adam.

    ``compute`` sets the precision (bf16 autocast; fp16 autocast with GradScaler; fp32) and the memory format; by
    default the automatic settings of ``device`` (:func:`fl_client.compute.resolve_compute`). ``augment`` is applied
    to each batch on the device (GPU augmentation; the loader then yields unaugmented images).
    With ``proximal_mu`` > 0 (FedProx) the loss gets ``mu/2 * ||w - w_start||^2`` over the trainable parameters,
    ``w_start`` being the weights the round began with (the global model): local training is pulled toward it.
    The step never reads a value back from the GPU (the running loss stays on the device until the end), so the
    host queues the next batch while the GPU computes.
    ``profile_dropout`` (a model fusing the profile): each measured profile value of each study is masked with this
    probability in every step (:func:`drop_profile_values`), as if the site had not measured it.
    """
    compute = compute if compute is not None else resolve_compute(ComputeOptions(), device)
    if compute.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if optimiser is None:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for group in optimiser.param_groups:  # this round's rate (lr-schedule), whatever a continued state held
        group["lr"] = lr
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    scaler = torch.amp.GradScaler(device.type, enabled=compute.grad_scaler)
    model.train()
    t0 = time.perf_counter()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    steps, seen = 0, 0
    for _ in range(epochs):
        for batch in loader:
            optimiser.zero_grad(set_to_none=True)
            if profile_dropout > 0 and "profile" in batch:
                batch = {**batch, "profile": drop_profile_values(torch.as_tensor(batch["profile"]), profile_dropout)}
            with autocast(compute, device):
                output = forward(model, batch, device, channels_last=compute.channels_last, augment=augment)
            loss, diagnosis, prognosis = loss_terms(output, batch, weights=loss_weights, device=device)
            if anchor:
                loss = loss + proximal_term(model, anchor, proximal_mu)
            if compute.grad_scaler:
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                optimiser.step()
            n = len(batch["label"])
            totals += torch.stack([loss.detach(), diagnosis, prognosis]).to(torch.float64) * n
            seen += n
            steps += 1
    mean = totals.cpu().numpy() / max(seen, 1)
    return TrainResult(
        num_examples=len(loader.dataset),
        loss=float(mean[0]),
        diagnosis_loss=float(mean[1]),
        prognosis_loss=float(mean[2]),
        steps=steps,
        seconds=time.perf_counter() - t0,
    )


def drop_profile_values(profile: torch.Tensor, p: float) -> torch.Tensor:
    """The (B, 2V) profile input with each value masked with probability ``p``: its z-score and presence flag set to 0,
    exactly what the model sees for an unmeasured value (torch's global generator: seeded per round)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"profile dropout must be in [0, 1), got {p}")
    n = profile.shape[1] // 2
    keep = (torch.rand(profile.shape[0], n) >= p).to(profile.dtype)
    return profile * torch.cat([keep, keep], dim=1)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * sum ||w - w_anchor||^2`` over ``model.parameters()`` (in that order)."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
    return 0.5 * mu * total


def local_norm_path(site: SiteConfig, settings: RoundSettings) -> Path:
    """Where a site keeps its own normalisation layers under ``bn-mode = local`` (FedBN), per architecture."""
    model = settings.model
    fusion = "" if model.profile_fusion == "none" else f"-{model.profile_fusion}"  # unchanged name without a profile
    return site.site_dir / "fedbn" / f"{model.name}-{model.norm}-{model.num_classes}-{int(model.covariates)}{fusion}.pt"


def with_local_norm(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def local_optimiser_path(site: SiteConfig, settings: RoundSettings) -> Path:
    """Where a site keeps its Adam moments between rounds under ``local-optimiser = keep``, per architecture."""
    return site.site_dir / "optimiser" / local_norm_path(site, settings).name


def local_optimiser(site: SiteConfig, settings: RoundSettings, model: nn.Module, *, lr: float) -> torch.optim.Optimizer:
    """The Adam a round trains with: under ``local-optimiser = keep`` from round 2 on, the site's own from its
    previous round (moments of the same parameters); otherwise, or when the saved state does not fit the model,
    a fresh one. A run's first round always starts fresh, so a new run never inherits an old run's moments."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    path = local_optimiser_path(site, settings)
    if settings.local_optimiser != "keep" or settings.server_round <= 1 or not path.is_file():
        return optimiser
    try:
        optimiser.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError):
        # another model's moments or an unreadable file: start fresh, replaced after this round
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    return optimiser


def save_local_optimiser(site: SiteConfig, settings: RoundSettings, optimiser: torch.optim.Optimizer) -> Path | None:
    """Keep the round's final Adam moments at the site (``local-optimiser = keep``); atomic write, never sent."""
    if settings.local_optimiser != "keep":
        return None
    buffer = io.BytesIO()
    torch.save(optimiser.state_dict(), buffer)
    return atomic_write_bytes(local_optimiser_path(site, settings), buffer.getvalue())


def recalibrate_batch_norm(
    model: nn.Module, loader: Any, *, device: torch.device, compute: Compute | None = None
) -> bool:
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
            channels_last = compute is not None and compute.channels_last
            with autocast(compute, device):
                if isinstance(self.inner, MultiTaskNet):
                    return forward(self.inner, batch, device, channels_last=channels_last)
                return self.inner(model_input(batch["image"], device, channels_last=channels_last))

    wrapper = _Images(model)
    torch.optim.swa_utils.update_bn(([batch] for batch in loader), wrapper, device=None)
    return True


@torch.no_grad()
def predict(model: MultiTaskNet, loader: Any, *, device: torch.device, compute: Compute | None = None) -> Predictions:
    """Diagnosis probabilities and risk scores for every study in ``loader``, with its targets.

    Same path as training (:func:`forward`, ``compute``'s precision and memory format; default: automatic for
    ``device``); outputs are read back once, at the end.
    """
    compute = compute if compute is not None else resolve_compute(ComputeOptions(), device)
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("probs", "labels", "risk", "time", "event", "logits")}
    outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        with autocast(compute, device):
            output = forward(model, batch, device, channels_last=compute.channels_last)
        n = len(batch["label"])
        logits = output.logits.float()
        outputs.append((torch.softmax(logits, dim=1), output.risk.float(), logits))
        parts["labels"].append(np.asarray(batch["label"], dtype=np.int64).reshape(n))
        parts["time"].append(np.asarray(batch.get("time", [math.nan] * n), dtype=np.float64).reshape(n))
        parts["event"].append(np.asarray(batch.get("event", [math.nan] * n), dtype=np.float64).reshape(n))
    parts["probs"] = [probs.cpu().numpy() for probs, _, _ in outputs]
    parts["risk"] = [risk.cpu().numpy() for _, risk, _ in outputs]
    parts["logits"] = [logits.cpu().numpy() for _, _, logits in outputs]
    if not parts["probs"]:
        n_classes = model.diagnosis.out_features
        return Predictions(
            np.zeros((0, n_classes)),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, n_classes)),
        )
    return Predictions(**{k: np.concatenate(v) for k, v in parts.items()})


def train_round(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One federated round at a site: load global weights, train on the train split, return new weights."""
    settings = site.admit(settings)  # the site's limits, its fixed split, its cache cap (fl_client/config.py)
    set_determinism(seed=settings.seed * 1000 + settings.server_round)
    compute = site_compute(site)
    device = compute.device
    manifest = load_site(site, settings)
    profile = site_profile(site, settings)
    loader = _loader(manifest, "train", settings, train=True, compute=compute, profile=profile)
    if len(loader.dataset) == 0:
        raise NoTrainingData(f"site {site.site_name} has no training studies (see {site.site_dir}/ingest_report.json)")
    model = _model(settings, with_local_norm(site, settings, state), compute)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimiser = local_optimiser(site, settings, model, lr=settings.learning_rate)
    result = train_model(
        model,
        loader,
        epochs=settings.local_epochs,
        lr=settings.learning_rate,
        device=device,
        loss_weights=settings.loss_weights,
        proximal_mu=settings.proximal_mu,
        compute=compute,
        augment=batch_augment(settings, compute),
        profile_dropout=settings.profile_dropout,
        optimiser=optimiser,
    )
    save_local_optimiser(site, settings, optimiser)
    recalibrate_batch_norm(
        model,
        _loader(manifest, "train", settings, train=False, compute=compute, profile=profile),
        device=device,
        compute=compute,
    )
    save_local_norm(site, settings, model)
    record_round_stats(site, settings, result, compute)
    new_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return new_state, result


#: Per-round training figures a site keeps for itself (JSON lines in its work folder; never sent anywhere).
TRAIN_STATS_NAME = "train-stats.jsonl"


def record_round_stats(site: SiteConfig, settings: RoundSettings, result: TrainResult, compute: Compute) -> Path:
    """Append this round's training figures (time, steps, device, precision, peak GPU memory) to the site's
    ``train-stats.jsonl``: hospital IT sees what a round costs; the GPU simulation benchmark reads each site's memory."""
    peak = torch.cuda.max_memory_allocated(compute.device) / 2**20 if compute.device.type == "cuda" else None
    line = {
        "round": settings.server_round,
        "device": compute.device.type,
        "precision": compute.precision,
        "examples": result.num_examples,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "peak_gpu_memory_mib": None if peak is None else round(peak, 1),
    }
    path = site.site_dir / TRAIN_STATS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return path


def split_metrics(
    preds: Predictions, class_names: tuple[str, ...], *, thresholds: Mapping[str, float], horizon_days: float
) -> dict:
    """Diagnosis, calibration, operating-point, prognosis metrics and score histograms of one split."""
    known = preds.labels >= 0
    metrics: dict[str, Any] = classification_metrics(
        preds.probs[known], preds.labels[known], class_names, thresholds=thresholds
    )
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
    compute = site_compute(site)
    device = compute.device
    manifest = load_site(site, settings)
    model = _model(settings, with_local_norm(site, settings, state), compute)
    class_names = tuple(manifest.class_names[: settings.model.num_classes])
    profile = site_profile(site, settings)
    preds = {
        split: predict(
            model,
            _loader(manifest, split, settings, train=False, compute=compute, profile=profile),
            device=device,
            compute=compute,
        )
        for split in ("val", "test")
    }
    val_known = preds["val"].labels >= 0
    thresholds = choose_operating_points(preds["val"].probs[val_known], preds["val"].labels[val_known], class_names)
    metrics: dict[str, Any] = {}
    for split, p in preds.items():
        values = split_metrics(p, class_names, thresholds=thresholds, horizon_days=settings.horizon_days)
        metrics.update({f"{split}-{k}": v for k, v in values.items()})
    # summed NLL at each grid temperature: the server fits the temperature of these weights from the sites' sums
    metrics[VAL_CALIBRATION_NLL] = nll_grid(preds["val"].logits[val_known], preds["val"].labels[val_known])
    train = predict(
        model,
        _loader(manifest, "train", settings, train=False, compute=compute, profile=profile),
        device=device,
        compute=compute,
    )
    metrics.update({f"train-{k}": v for k, v in risk_histogram(train.risk).items()})
    return metrics


def calibration_round(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, torch.Tensor], *, temperature: float
) -> dict[str, Any]:
    """Calibration statistics of the global weights on the site's held-out test split at ``temperature``.

    Reliability bins of the top-label confidence (:func:`models.calibration.reliability_bins`) before (T = 1) and
    after temperature scaling (keys :func:`fedct.protocol.reliability_key`), and the calibrated split's ``test-n``,
    ``test-loss``, ``test-brier``, ``test-accuracy``. Raw, before the privacy floor
    (:func:`fl_client.metrics.floor_calibration`).
    """
    settings = site.admit(settings)
    set_determinism(seed=settings.seed)
    compute = site_compute(site)
    manifest = load_site(site, settings)
    model = _model(settings, with_local_norm(site, settings, state), compute)
    class_names = tuple(manifest.class_names[: settings.model.num_classes])
    preds = predict(
        model,
        _loader(manifest, "test", settings, train=False, compute=compute, profile=site_profile(site, settings)),
        device=compute.device,
        compute=compute,
    )
    known = preds.labels >= 0
    logits, labels = preds.logits[known], preds.labels[known]
    metrics: dict[str, Any] = {}
    for stage, t in (("before", 1.0), ("after", temperature)):
        probs = apply_temperature(logits, t) if len(logits) else np.zeros((0, len(class_names)))
        for field, values in zip(RELIABILITY_FIELDS, reliability_bins(probs, labels), strict=True):
            metrics[reliability_key(stage, field)] = values
    calibrated = apply_temperature(logits, temperature) if len(logits) else np.zeros((0, len(class_names)))
    scalars = classification_metrics(calibrated, labels, class_names)
    metrics.update({f"{TEST_PREFIX}{k}": scalars[k] for k in ("n", "loss", "brier", "accuracy")})
    return metrics
