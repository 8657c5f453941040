"""How a site computes: numeric precision, memory format, data loading and where augmentation runs.

A site sets these in its env file (``FEDCT_PRECISION``, ``FEDCT_LOADER_WORKERS``, ...), which reach the ClientApp as
``node_config`` entries (``precision``, ``loader-workers``, ...) and become :class:`ComputeOptions` in
``SiteConfig``. ``auto`` (the default of each) is resolved per device by :func:`resolve_compute`:

=================== ===================================================== ==========================
setting             CUDA                                                  CPU
=================== ===================================================== ==========================
precision           bf16 autocast where the GPU supports it, else fp16    fp32 (bf16 autocast on
                    autocast + GradScaler                                 request)
channels-last       on with bf16/fp16 (channels_last_3d)                  off
loader-workers      min(8, CPUs - 1) worker processes                     0 (in the training process)
persistent-workers  on when there are workers                             on when there are workers
pin-memory          on                                                    off (nothing to pin for)
gpu-augment         on: random augmentation runs on the batch on the GPU  off (in the loader)
=================== ===================================================== ==========================

This module imports torch only inside :func:`resolve_compute`, so reading a site's env file stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: node-config key -> site env key (``fl_client/site_env.py``), with the meaning shown in errors.
NODE_KEYS = {
    "precision": (
        "FEDCT_PRECISION",
        "auto, fp32, bf16 or fp16 (auto: bf16 on a GPU that has it, else fp16; fp32 on CPU)",
    ),
    "loader-workers": (
        "FEDCT_LOADER_WORKERS",
        "auto or data-loader worker processes 0..64 (auto: CUDA min(8, CPUs-1), CPU 0)",
    ),
    "pin-memory": ("FEDCT_PIN_MEMORY", "auto, true or false: pinned host memory for batches (auto: on with CUDA)"),
    "persistent-workers": (
        "FEDCT_PERSISTENT_WORKERS",
        "auto, true or false: keep loader workers between epochs (auto: on)",
    ),
    "channels-last": ("FEDCT_CHANNELS_LAST", "auto, true or false: channels_last_3d on CUDA (auto: on with bf16/fp16)"),
    "gpu-augment": ("FEDCT_GPU_AUGMENT", "auto, true or false: random augmentation on the GPU (auto: on with CUDA)"),
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ComputeOptionError(ValueError):
    """A compute setting has a value it cannot take; the message names the setting."""


@dataclass(frozen=True)
class ComputeOptions:
    """A site's compute settings as written (``None`` = auto, resolved per device by :func:`resolve_compute`)."""

    precision: str = "auto"
    loader_workers: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    channels_last: bool | None = None
    gpu_augment: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ComputeOptionError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.loader_workers is not None and not 0 <= self.loader_workers <= 64:
            raise ComputeOptionError(f"loader-workers must be auto or 0..64, got {self.loader_workers}")
        if self.persistent_workers and self.loader_workers == 0:
            raise ComputeOptionError("persistent-workers=true needs loader-workers > 0 (got loader-workers=0)")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ComputeOptions:
        """Parse the ``node_config`` entries of :data:`NODE_KEYS` (absent or ``auto``: automatic)."""

        def text(key: str) -> str | None:
            value = node_config.get(key)
            if value is None:
                return None
            value = str(value).strip().lower()
            return None if value in ("", "auto") else value

        def switch(key: str) -> bool | None:
            value = text(key)
            if value is None:
                return None
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise ComputeOptionError(
                f"{key} (site env {NODE_KEYS[key][0]}) = {node_config[key]!r}: must be {NODE_KEYS[key][1]}"
            )

        workers_text = text("loader-workers")
        if workers_text is not None and not workers_text.isdigit():
            raise ComputeOptionError(
                f"loader-workers (site env FEDCT_LOADER_WORKERS) = {node_config['loader-workers']!r}: "
                f"must be {NODE_KEYS['loader-workers'][1]}"
            )
        return cls(
            precision=text("precision") or "auto",
            loader_workers=None if workers_text is None else int(workers_text),
            pin_memory=switch("pin-memory"),
            persistent_workers=switch("persistent-workers"),
            channels_last=switch("channels-last"),
            gpu_augment=switch("gpu-augment"),
        )

    def to_node_config(self) -> dict[str, str]:
        """The non-automatic settings as ``node_config`` entries (inverse of :meth:`from_node_config`)."""
        values = {
            "precision": self.precision,
            "loader-workers": self.loader_workers,
            "pin-memory": self.pin_memory,
            "persistent-workers": self.persistent_workers,
            "channels-last": self.channels_last,
            "gpu-augment": self.gpu_augment,
        }
        return {k: str(v).lower() for k, v in values.items() if v is not None and v != "auto"}


@dataclass(frozen=True)
class Compute:
    """Resolved compute settings for one device: what the training loop, evaluation and prediction use."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    loader_workers: int
    pin_memory: bool
    persistent_workers: bool
    gpu_augment: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32 (no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def grad_scaler(self) -> bool:
        """fp16 needs loss scaling (GradScaler); bf16 has fp32's exponent range and does not."""
        return self.precision == "fp16"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly form (benchmarks, logs)."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "loader_workers": self.loader_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "gpu_augment": self.gpu_augment,
        }


def available_cpus() -> int:
    """CPUs this process may run on (affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def resolve_compute(options: ComputeOptions, device: torch.device) -> Compute:
    """Resolve ``auto`` settings for ``device``; a setting the device cannot honour is an error naming it."""
    import torch

    cuda = device.type == "cuda"
    precision = options.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ComputeOptionError("precision fp16 (FEDCT_PRECISION) needs a CUDA device; on CPU use fp32 or bf16")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ComputeOptionError(
            "precision bf16 (FEDCT_PRECISION): this GPU does not support bfloat16; use fp16 or auto"
        )
    if options.gpu_augment and not cuda:
        raise ComputeOptionError("gpu-augment=true (FEDCT_GPU_AUGMENT) needs a CUDA device")
    workers = options.loader_workers
    if workers is None:
        workers = min(8, available_cpus() - 1) if cuda else 0
    workers = max(workers, 0)
    return Compute(
        device=device,
        precision=precision,
        channels_last=cuda and (options.channels_last if options.channels_last is not None else precision != "fp32"),
        loader_workers=workers,
        pin_memory=cuda and (options.pin_memory if options.pin_memory is not None else True),
        persistent_workers=workers > 0
        and (options.persistent_workers if options.persistent_workers is not None else True),
        gpu_augment=cuda and (options.gpu_augment if options.gpu_augment is not None else True),
    )
