"""Training-loop benchmark: time per step split into data wait and compute, for the default model.

fedct's own loop (``fl_client.train.train_model``) runs over a site's cached, augmented dataset; the loader is
wrapped so that the time spent waiting for each batch (cache read + augmentation + collation) and the time from
receiving a batch to asking for the next (forward, loss, backward, optimiser step) are recorded per step. On a
GPU (when one is present) the step is synchronised before it is timed, the GPU's busy fraction is taken from the
profiler's kernel times, and a compute-only step is timed with mixed precision on and off.

Writes ``train_loop.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import SMALL_RUN_CONFIG, BenchOptions, summarise, self_peak_rss_mib, synthetic_sites, write_result


class TimedLoader:
    """Wraps a DataLoader: records per step the data wait (inside ``next``) and the compute (between batches)."""

    def __init__(self, loader: Any, *, synchronize: Callable[[], None] = lambda: None) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.synchronize = synchronize
        self.waits: list[float] = []
        self.computes: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        handed_out: float | None = None
        while True:
            if handed_out is not None:
                self.synchronize()
                self.computes.append(time.perf_counter() - handed_out)
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            handed_out = time.perf_counter()
            self.waits.append(handed_out - t0)
            yield batch


def _settings(options: BenchOptions) -> dict[str, Any]:
    if options.tiny:
        return {"patients": 6, "epochs": 1, "run_config": SMALL_RUN_CONFIG, "small": True}
    if options.quick:
        return {"patients": 10, "epochs": 1, "run_config": {}, "small": False}
    return {"patients": 30, "epochs": 2, "run_config": {}, "small": False}


def _profile_gpu(model: Any, loader: Any, *, device: Any, loss_weights: tuple[float, float]) -> dict[str, Any]:
    """GPU busy fraction over one epoch: the profiler's summed CUDA kernel time / wall time."""
    import torch

    from fl_client.train import train_model

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        train_model(model, loader, epochs=1, lr=1e-4, device=device, loss_weights=loss_weights)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernel_us = 0.0
    for event in prof.key_averages():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernel_us += float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return {"wall_seconds": wall, "kernel_seconds": kernel_us / 1e6, "gpu_busy_fraction": kernel_us / 1e6 / wall if wall else None}


def _amp_steps(model: Any, batch: Any, *, device: Any, loss_weights: tuple[float, float], steps: int) -> dict[str, Any]:
    """Compute-only step time (forward, loss, backward, Adam) with autocast on and off, same batch, GPU synchronised."""
    import torch

    from fl_client.train import forward, multitask_loss

    out: dict[str, Any] = {}
    for amp in (False, True):
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", enabled=amp):
                output = forward(model, batch, device)
            loss, _, _ = multitask_loss(output, batch, weights=loss_weights, device=device)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            torch.cuda.synchronize()
            if i:  # the first step pays for cuDNN autotuning and allocation
                times.append(time.perf_counter() - t0)
        out["amp_on" if amp else "amp_off"] = {"step_seconds": summarise(times),
                                                "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20}  # fmt: skip
    out["speedup_amp"] = (out["amp_off"]["step_seconds"]["median"] or 0) / (out["amp_on"]["step_seconds"]["median"] or 1)
    return out


def run(options: BenchOptions) -> Path:
    """Run the benchmark and write ``train_loop.json``; returns its path."""
    import torch
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from fl_client.train import train_model
    from fl_server.config import ServerConfig
    from models.factory import build_model
    from preprocessing.cache import make_dataset
    from preprocessing.ingest import prepare_site

    started = time.perf_counter()
    cfg = _settings(options)
    out = Path(options.out)
    work = out / "work" / "train_loop"
    data_root = synthetic_sites(work / "data", sites=1, patients_per_site=cfg["patients"], seed=0, small=cfg["small"])
    config = ServerConfig.from_run_config({**cfg["run_config"], "run-dir": str(work / "run")})
    settings = config.round_settings(1)
    site = data_root / "site-0"
    manifest = prepare_site(site / "dicom", work / "sites" / "site-0", labels_csv=site / "labels.csv", pipeline=settings.pipeline,
                            split=settings.split)  # fmt: skip
    items = [e.item() for e in manifest.studies]  # every study: the benchmark is about speed, not generalisation
    dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=True)
    arms: dict[str, Any] = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device_name in devices:
        device = torch.device(device_name)
        set_determinism(seed=0)
        model = build_model(settings.model).to(device)
        loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, num_workers=0, pin_memory=device.type == "cuda")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        timed = TimedLoader(loader, synchronize=sync)
        result = train_model(model, timed, epochs=cfg["epochs"], lr=settings.learning_rate, device=device,
                             loss_weights=settings.loss_weights)  # fmt: skip
        waits, computes = timed.waits[1:], timed.computes[1:]  # the first step pays for warm-up (allocation, cache files)
        if not computes:
            waits, computes = timed.waits, timed.computes
        wait_total, compute_total = sum(waits), sum(computes)
        arm: dict[str, Any] = {
            "device": device_name,
            "amp": device.type == "cuda",
            "steps_timed": len(computes),
            "steps_total": result.steps,
            "first_step_seconds": (timed.waits[0] + timed.computes[0]) if timed.computes else None,
            "data_wait_seconds": summarise(waits),
            "compute_seconds": summarise(computes),
            "step_seconds_mean": (wait_total + compute_total) / len(computes) if computes else None,
            "data_wait_fraction": wait_total / (wait_total + compute_total) if (wait_total + compute_total) else None,
            "samples_per_second": settings.batch_size * len(computes) / (wait_total + compute_total) if computes else None,
            "train_model_seconds": result.seconds,
        }
        if device.type == "cuda":
            arm["profile"] = _profile_gpu(model, DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, num_workers=0,
                                                            pin_memory=True), device=device, loss_weights=settings.loss_weights)  # fmt: skip
            batch = next(iter(loader))
            arm["amp_comparison"] = _amp_steps(model, batch, device=device, loss_weights=settings.loss_weights, steps=5)
            arm["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        arms[device_name] = arm
    payload = {
        "what": "fl_client.train.train_model over a site's cached, augmented dataset (num_workers=0, as fedct trains); per step: "
        "data wait = time inside the loader's next(), compute = forward + loss + backward + Adam step until the next batch is "
        "asked for (GPU synchronised first). The first step is reported apart (warm-up).",
        "model": settings.model.name,
        "input_size": list(settings.pipeline.input_size),
        "batch_size": settings.batch_size,
        "studies": len(items),
        "epochs": cfg["epochs"],
        "torch_threads": torch.get_num_threads(),
        "arms": arms,
        "gpu": "none on this machine: the cuda arm (busy fraction, AMP on/off) runs where torch.cuda.is_available()"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "peak_rss_mib": self_peak_rss_mib(),
    }
    return write_result(out, "train_loop", payload, options=options, started=started)
