"""Training-loop benchmark: fedct's own loop against the compute-only limit of the same network, size and batch.

Per device arm, in one run:

- **loop**: ``fl_client.train.train_model`` over a site's cached dataset with fedct's settings for that device
  (``fl_client.compute``: loader workers, pinned memory, precision, channels-last, augmentation on the GPU or in
  the loader). The loader is wrapped so that the time the training process waits inside ``next()`` (data wait) and
  the time from receiving a batch to asking for the next (host time of the step) are recorded; the GPU is
  synchronised once, at the end (a sync per step would stop the host from queueing ahead, which is how the loop
  runs). ``samples_per_second`` = samples after the warm-up steps / their wall time.
- **limit**: the same ``train_model`` on plain tensors already on the device (no loader, no augmentation), same
  network, input size, batch, precision and memory format: what the network can do at best.
- **ratio** = loop / limit.
- on CUDA, **GPU busy**: the profiler's CUDA activity (kernels, copies; union of intervals) / wall time over a
  second pass of the loop; ``nvidia-smi``'s utilisation sampled during the timed pass when it is there.

``--profile gpu`` times ``configs/run-gpu.toml`` (128x128x96 at 2.5 mm, batch 16); the default profile times the
CPU default (64x64x48 at 5 mm, batch 4). This module never imports flwr (the GPU machines run it without).

Writes ``train_loop.json`` (``train_loop-gpu.json`` for the gpu profile).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.common import SMALL_RUN_CONFIG, BenchOptions, self_peak_rss_mib, summarise, synthetic_sites, write_result
from fedct.processes import stop_process

#: The named GPU preset (a run config file; README "Configuring a run").
GPU_PRESET = Path(__file__).resolve().parent.parent / "configs" / "run-gpu.toml"
PROFILES = ("default", "gpu")


class TimedLoader:
    """Wraps a DataLoader: per batch the data wait (inside ``next``) and the host time until the next request.

    ``synchronize`` is called once by :meth:`finish` (not per step): the last step's time then includes the work
    the device still had queued.
    """

    def __init__(self, loader: Any, *, synchronize: Callable[[], None] = lambda: None) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.synchronize = synchronize
        self.requests: list[float] = []
        self.handouts: list[float] = []
        self.sizes: list[int] = []
        self.end: float | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        yield from self._timed(iter(self.loader))

    def _timed(self, iterator: Iterator[Any]) -> Iterator[Any]:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.end = t0
                return
            self.requests.append(t0)
            self.handouts.append(time.perf_counter())
            self.sizes.append(len(batch["label"]) if isinstance(batch, Mapping) and "label" in batch else 1)
            yield batch

    def finish(self) -> None:
        """Mark the end of the timed work (after synchronising the device)."""
        self.synchronize()
        self.end = time.perf_counter()

    @property
    def waits(self) -> list[float]:
        """Seconds spent inside ``next()`` per batch."""
        return [h - r for r, h in zip(self.requests, self.handouts)]

    @property
    def computes(self) -> list[float]:
        """Seconds from handing out each batch to the next request (the last: to :meth:`finish`)."""
        ends = self.requests[1:] + ([self.end] if self.end is not None else [])
        return [e - h for h, e in zip(self.handouts, ends)]

    def summary(self, *, warmup: int) -> dict[str, Any]:
        """Figures over the steps after the first ``warmup`` (all steps when there are no more)."""
        waits, computes, sizes = self.waits, self.computes, self.sizes[: len(self.computes)]
        skip = warmup if len(computes) > warmup else 0
        waits, computes, sizes = waits[skip:], computes[skip:], sizes[skip:]
        wall = sum(waits) + sum(computes)
        return {
            "steps_total": len(self.handouts),
            "steps_timed": len(computes),
            "warmup_steps": skip,
            "data_wait_seconds": summarise(waits),
            "compute_seconds": summarise(computes),
            "step_seconds_mean": wall / len(computes) if computes else None,
            "data_wait_fraction": sum(waits) / wall if wall else None,
            "samples_per_second": sum(sizes) / wall if wall else None,
            "timed_seconds": wall,
        }


class _Batches:
    """The same device-resident batch ``steps`` times, looking like a loader to ``train_model``."""

    def __init__(self, batch: Mapping[str, Any], steps: int) -> None:
        self.batch, self.steps = batch, steps
        self.dataset = range(steps * len(batch["label"]))

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def profile_run_config(profile: str) -> dict[str, Any]:
    """The run-config entries timed by ``profile`` (``default``: none, the defaults; ``gpu``: configs/run-gpu.toml)."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    if profile == "default":
        return {}
    with GPU_PRESET.open("rb") as f:
        return tomllib.load(f)


def bench_settings(run_config: Mapping[str, Any]) -> Any:
    """Round settings of ``run_config`` for the keys the benchmark uses (model, input, batch, learning rate, seed).

    Built without ``fl_server.config`` (which imports flwr); a test checks it agrees with ``ServerConfig``.
    """
    from fedct.protocol import RoundSettings, parse_triple
    from models.factory import ModelConfig
    from preprocessing.split import SplitConfig
    from preprocessing.transforms import PipelineConfig

    model, pipeline = ModelConfig(), PipelineConfig()
    return RoundSettings(
        server_round=1,
        local_epochs=int(run_config.get("local-epochs", 1)),
        learning_rate=float(run_config.get("learning-rate", 0.001)),
        batch_size=int(run_config.get("batch-size", 4)),
        seed=int(run_config.get("seed", 0)),
        model=ModelConfig(
            name=str(run_config.get("model-name", model.name)),
            norm=str(run_config.get("model-norm", model.norm)),
            covariates=bool(run_config.get("clinical-covariates", False)),
        ),
        pipeline=PipelineConfig(
            input_size=parse_triple(str(run_config.get("input-size", "64,64,48")), int, "input-size"),
            target_spacing_mm=parse_triple(
                str(run_config.get("target-spacing-mm", "5.0,5.0,5.0")), float, "target-spacing-mm"
            ),
            hu_min=float(run_config.get("hu-min", pipeline.hu_min)),
            hu_max=float(run_config.get("hu-max", pipeline.hu_max)),
        ),
        split=SplitConfig(),
        loss_weights=(
            float(run_config.get("loss-weight-diagnosis", 1.0)),
            float(run_config.get("loss-weight-prognosis", 0.5)),
        ),
    )


def options_from_environment() -> Any:
    """The compute settings a site would set in its site.env (``FEDCT_PRECISION``, ``FEDCT_LOADER_WORKERS``, ...),
    read from this process's environment: the benchmark times them (unset: automatic)."""
    import os

    from fl_client.compute import NODE_KEYS, ComputeOptions

    return ComputeOptions.from_node_config(
        {node: os.environ[env] for node, (env, _) in NODE_KEYS.items() if os.environ.get(env)}
    )


def _plan(options: BenchOptions) -> dict[str, Any]:
    plan = _size_plan(options)
    if options.patients and not options.tiny:
        plan["patients"] = options.patients
    return plan


def _size_plan(options: BenchOptions) -> dict[str, Any]:
    run_config = profile_run_config(options.profile)
    if options.tiny:
        # Test-suite size whatever the profile: the small network and volumes, the profile's loader/precision path.
        return {
            "patients": 6,
            "epochs": 1,
            "run_config": {**run_config, **SMALL_RUN_CONFIG},
            "small": True,
            "limit_steps": 3,
            "ab_steps": 1,
        }
    if options.profile == "gpu":
        if options.quick:
            return {
                "patients": 24,
                "epochs": 3,
                "run_config": run_config,
                "small": False,
                "limit_steps": 10,
                "ab_steps": 5,
            }
        return {
            "patients": 96,
            "epochs": 4,
            "run_config": run_config,
            "small": False,
            "limit_steps": 30,
            "ab_steps": 10,
        }
    if options.quick:
        return {"patients": 10, "epochs": 1, "run_config": run_config, "small": False, "limit_steps": 3, "ab_steps": 3}
    return {"patients": 30, "epochs": 2, "run_config": run_config, "small": False, "limit_steps": 8, "ab_steps": 5}


def _devices(options: BenchOptions) -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    if options.devices == "cuda":
        if not cuda:
            raise RuntimeError("--devices cuda: no CUDA GPU is available to PyTorch")
        return ["cuda"]
    if options.devices == "cpu":
        return ["cpu"]
    if options.profile == "gpu" and not options.tiny:
        # The GPU profile on 2 CPU cores is minutes per step: time it where it is meant to run.
        return ["cuda"] if cuda else ["cpu"]
    return ["cpu"] + (["cuda"] if cuda else [])


class _UtilisationSampler:
    """``nvidia-smi``'s GPU utilisation (percent of time a kernel ran) sampled every 100 ms in the background."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _UtilisationSampler:
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self._process = subprocess.Popen(
                    [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0", "-lms", "100"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError:
                self._process = None
        if self._process is not None:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            stop_process(self._process, grace_s=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fraction(self) -> float | None:
        """Mean utilisation as a fraction (the first sample dropped: it covers time before the loop)."""
        samples = self.samples[1:] or self.samples
        return sum(samples) / len(samples) / 100 if samples else None


def interval_union(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the ``(start, end)`` intervals (overlaps counted once)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _busy_union_seconds(prof: Any) -> tuple[float, float, int]:
    """(union of CUDA activity intervals, summed CUDA kernel self time, number of device events) of a profile."""
    import torch

    intervals = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    ]
    kernel = 0.0
    for event in prof.key_averages():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernel += float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return interval_union(intervals) / 1e6, kernel / 1e6, len(intervals)


def _profile_gpu(model: Any, loader: Any, *, settings: Any, compute: Any, augment: Any) -> dict[str, Any]:
    """GPU busy fraction over one more pass of fedct's loop: the profiler's CUDA activity (union) / wall time."""
    import torch

    from fl_client.train import train_model

    union = kernel = wall = 0.0
    n_events, activities = 0, "CUDA"
    for activities in ("CUDA", "CPU+CUDA"):  # CUDA activity alone costs the host least; some builds want CPU too
        kinds = [torch.profiler.ProfilerActivity.CUDA]
        if activities == "CPU+CUDA":
            kinds.insert(0, torch.profiler.ProfilerActivity.CPU)
        timed = TimedLoader(loader, synchronize=torch.cuda.synchronize)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=kinds) as prof:
            train_model(
                model,
                timed,
                epochs=1,
                lr=1e-5,
                device=compute.device,
                loss_weights=settings.loss_weights,
                compute=compute,
                augment=augment,
            )
            timed.finish()
        wall = time.perf_counter() - t0
        union, kernel, n_events = _busy_union_seconds(prof)
        if n_events:
            break
    samples = sum(timed.sizes)
    return {
        "what": "one epoch of fedct's loop under torch.profiler (CUDA activity only); busy = union of device activity "
        "intervals / wall time; the profiler itself slows the host a little, so this is a lower bound",
        "activities": activities,
        "wall_seconds": wall,
        "device_busy_seconds": union,
        "kernel_seconds_summed": kernel,
        "device_events": n_events,
        "samples": samples,
        "samples_per_second_profiled": samples / wall if wall else None,
        "gpu_busy_fraction": union / wall if wall and n_events else None,
        "device_busy_seconds_per_sample": union / samples if samples and n_events else None,
    }


def _synthetic_batch(settings: Any, device: Any, *, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    n = settings.batch_size
    return {
        "image": torch.rand((n, settings.model.in_channels, *settings.pipeline.input_size), generator=g).to(device),
        "label": torch.randint(0, settings.model.num_classes, (n,), generator=g),
        "time": torch.rand(n, generator=g, dtype=torch.float64) * 30,
        "event": (torch.rand(n, generator=g) < 0.5).to(torch.float64),
        "age": torch.full((n,), 60.0),
        "sex": torch.ones(n),
    }


def compute_limit(settings: Any, compute: Any, *, steps: int, warmup: int = 3) -> dict[str, Any]:
    """fedct's ``train_model`` on one plain, device-resident batch repeated: no loader, no augmentation, no metadata.

    Same network, input size, batch, precision and memory format as the loop; the GPU is synchronised at the end.
    """
    import torch

    from fl_client.train import prepare_model, train_model
    from models.factory import build_model

    model = prepare_model(build_model(settings.model), compute)
    batch = _synthetic_batch(settings, compute.device, seed=1)
    if compute.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    train_model(
        model,
        _Batches(batch, warmup),
        epochs=1,
        lr=1e-5,
        device=compute.device,
        loss_weights=settings.loss_weights,
        compute=compute,
    )
    result = train_model(
        model,
        _Batches(batch, steps),
        epochs=1,
        lr=1e-5,
        device=compute.device,
        loss_weights=settings.loss_weights,
        compute=compute,
    )
    out = {
        "steps": steps,
        "seconds": result.seconds,
        "samples_per_second": steps * settings.batch_size / result.seconds,
        "precision": compute.precision,
        "channels_last": compute.channels_last,
    }
    if compute.device.type == "cuda":
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def metatensor_ab(settings: Any, compute: Any, *, steps: int) -> dict[str, Any]:
    """One training step, interleaved A/B on the same batch: main before #18 (the batch's MONAI ``MetaTensor`` goes
    through the network, metadata tracked on every operation) against now (plain tensor). Same precision and memory
    format for both, so the difference is the MetaTensor alone; the device is synchronised after every step."""
    import statistics

    import torch
    from monai.data import MetaTensor

    from fl_client.train import autocast, forward, loss_terms, prepare_model
    from models.factory import ModelOutput, build_model

    model = prepare_model(build_model(settings.model), compute).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-6)
    batch = _synthetic_batch(settings, torch.device("cpu"), seed=3)
    affine = torch.diag(torch.tensor([*settings.pipeline.target_spacing_mm, 1.0], dtype=torch.float64))
    meta = {**batch, "image": MetaTensor(batch["image"], affine=affine)}
    sync = torch.cuda.synchronize if compute.device.type == "cuda" else (lambda: None)

    def step(old: bool) -> float:
        sync()
        t0 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with autocast(compute, compute.device):
            if old:
                images = meta["image"].to(compute.device)
                if compute.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last_3d)
                features = model.dropout(model.backbone(images))
                output = ModelOutput(model.diagnosis(features), model.prognosis(features).squeeze(1))
            else:
                output = forward(model, meta, compute.device, channels_last=compute.channels_last)
        loss, _, _ = loss_terms(output, meta, weights=settings.loss_weights, device=compute.device)
        loss.backward()
        optimiser.step()
        sync()
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up
    times: dict[str, list[float]] = {"metatensor": [], "plain": []}
    for _ in range(steps):
        times["metatensor"].append(step(True))
        times["plain"].append(step(False))
    old, new = statistics.median(times["metatensor"]), statistics.median(times["plain"])
    return {
        "steps_each": steps,
        "metatensor_step_seconds": summarise(times["metatensor"]),
        "plain_step_seconds": summarise(times["plain"]),
        "speedup_plain_over_metatensor": old / new if new else None,
    }


def _augment_cost(augment: Any, settings: Any, device: Any, *, reps: int = 5) -> dict[str, Any]:
    """Seconds to augment one batch on the device (per-sample MONAI transforms), synchronised."""
    import torch

    images = _synthetic_batch(settings, device, seed=2)["image"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    augment(images)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        augment(images)
    sync()
    return {"seconds_per_batch": (time.perf_counter() - t0) / reps}


def _arm(
    device_name: str, *, dataset: Any, plain_dataset: Any, settings: Any, plan: Mapping[str, Any]
) -> dict[str, Any]:
    """One device: fedct's loop, its compute-only limit, the ratio (and the GPU's busy fraction on CUDA)."""
    import torch
    from monai.utils import set_determinism

    from fl_client.compute import ComputeOptions, resolve_compute
    from fl_client.train import batch_augment, make_loader, prepare_model, train_model
    from models.factory import build_model

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    compute = resolve_compute(options_from_environment(), device)
    set_determinism(seed=0)  # as train_round does (cuDNN deterministic, no autotuning)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = prepare_model(build_model(settings.model), compute)
    augment = batch_augment(settings, compute)
    loader = make_loader(
        plain_dataset if compute.gpu_augment else dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        compute=compute,
        seed=0,
    )
    timed = TimedLoader(loader, synchronize=sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _UtilisationSampler() if cuda else _NoSampler() as sampler:
        result = train_model(
            model,
            timed,
            epochs=plan["epochs"],
            lr=settings.learning_rate,
            device=device,
            loss_weights=settings.loss_weights,
            compute=compute,
            augment=augment,
        )
        timed.finish()
    warmup = 2 if cuda else 1  # the first steps pay for worker start, allocation, cuDNN set-up, cache reads
    arm: dict[str, Any] = {
        "device": device_name,
        "compute": compute.summary(),
        **timed.summary(warmup=warmup),
        "first_step_seconds": (timed.waits[0] + timed.computes[0]) if timed.computes else None,
        "train_model_seconds": result.seconds,
    }
    if cuda:
        arm["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        arm["gpu_busy_fraction_nvidia_smi"] = sampler.fraction()
        try:
            arm["profile"] = _profile_gpu(model, loader, settings=settings, compute=compute, augment=augment)
        except Exception as exc:  # noqa: BLE001 - a profiler that fails must not lose the loop's figures
            arm["profile"] = {
                "error": f"{type(exc).__name__}: {exc}",
                "gpu_busy_fraction": None,
                "device_busy_seconds_per_sample": None,
            }
        arm["gpu_busy_fraction"] = arm["profile"]["gpu_busy_fraction"]
        per_sample = arm["profile"]["device_busy_seconds_per_sample"]
        arm["gpu_busy_fraction_unprofiled_estimate"] = (
            per_sample * arm["samples_per_second"] if per_sample and arm["samples_per_second"] else None
        )
    if augment is not None:
        arm["gpu_augment_cost"] = _augment_cost(augment, settings, device)
    del loader, timed  # stop persistent workers before the limit runs
    arm["limit"] = compute_limit(settings, compute, steps=plan["limit_steps"])
    if cuda:
        fp32 = resolve_compute(ComputeOptions(precision="fp32", channels_last=False), device)
        arm["limit_fp32"] = compute_limit(settings, fp32, steps=plan["limit_steps"])
        flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        try:
            arm["limit_cudnn_benchmark"] = compute_limit(settings, compute, steps=plan["limit_steps"])
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    arm["metatensor_ab"] = metatensor_ab(settings, compute, steps=plan["ab_steps"])
    loop, limit = arm["samples_per_second"], arm["limit"]["samples_per_second"]
    arm["ratio_loop_to_limit"] = loop / limit if loop and limit else None
    return arm


class _NoSampler:
    def __enter__(self) -> _NoSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def fraction(self) -> None:
        return None


def run(options: BenchOptions) -> Path:
    """Run the benchmark and write ``train_loop.json`` (``train_loop-gpu.json`` for the gpu profile); returns its path."""
    import torch

    from preprocessing.cache import make_dataset
    from preprocessing.ingest import prepare_site

    started = time.perf_counter()
    plan = _plan(options)
    settings = bench_settings(plan["run_config"])
    out = Path(options.out)
    name = "train_loop" if options.profile == "default" else f"train_loop-{options.profile}"
    work = out / "work" / name
    data_root = synthetic_sites(work / "data", sites=1, patients_per_site=plan["patients"], seed=0, small=plan["small"])
    site = data_root / "site-0"
    t0 = time.perf_counter()
    manifest = prepare_site(
        site / "dicom",
        work / "sites" / "site-0",
        labels_csv=site / "labels.csv",
        pipeline=settings.pipeline,
        split=settings.split,
        workers=max(1, min(16, _cpus())),
    )
    ingest_seconds = time.perf_counter() - t0
    items = [e.item() for e in manifest.studies]  # every study: the benchmark is about speed, not generalisation
    dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=True)
    plain_dataset = make_dataset(items, settings.pipeline, manifest.site_dir, augment=False)
    for index in range(len(plain_dataset)):  # fill the cache once, outside the timed loop
        plain_dataset[index]
    arms = {
        device_name: _arm(device_name, dataset=dataset, plain_dataset=plain_dataset, settings=settings, plan=plan)
        for device_name in _devices(options)
    }
    payload = {
        "what": "fl_client.train.train_model over a site's cached dataset with fedct's settings per device (loop), against "
        "train_model on one plain device-resident batch of the same network, size, batch and precision (limit); ratio = "
        "loop / limit. Per step: data wait = time inside the loader's next(); compute = host time until the next batch "
        "is asked for (the GPU is synchronised once at the end, so device time shows in the last step and in the wall "
        "time). The first steps are warm-up (reported apart). gpu_busy_fraction: profiler's CUDA activity / wall.",
        "profile": options.profile,
        "run_config": {
            k: plan["run_config"][k]
            for k in ("batch-size", "input-size", "target-spacing-mm", "model-name")
            if k in plan["run_config"]
        },
        "model": settings.model.name,
        "input_size": list(settings.pipeline.input_size),
        "target_spacing_mm": list(settings.pipeline.target_spacing_mm),
        "batch_size": settings.batch_size,
        "studies": len(items),
        "epochs": plan["epochs"],
        "ingest_seconds": ingest_seconds,
        "torch_threads": torch.get_num_threads(),
        "arms": arms,
        "gpu": "none on this machine: the cuda arm (busy fraction, limit on the GPU) runs where torch.cuda.is_available()"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
        "peak_rss_mib": self_peak_rss_mib(),
    }
    return write_result(out, name, payload, options=options, started=started)


def _cpus() -> int:
    from fl_client.compute import available_cpus

    return available_cpus()
