"""How a model's weights travel in a message: a few contiguous buffers and a small index.

Flower's deployment engine stores and transfers one object per array (727 for DenseNet121-3D), which made a
round take 74 s of pure overhead; one buffer per wire dtype cuts that to 13-15 s (see the Flower notes). Floating
tensors may travel as ``float16`` or ``bfloat16`` to halve the bytes; integer and boolean buffers (e.g. BatchNorm's
``num_batches_tracked``) always travel exactly.

Plain numpy/torch (no flwr): the Flower handlers put the buffers into an ArrayRecord and the index (a JSON string)
into a ConfigRecord. Float buffers are numeric arrays of the wire dtype (a bfloat16 buffer is its raw 16-bit
words, as numpy has no bfloat16), so an element-wise difference of two packed float32/float16 buffers is the
difference of the tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TRANSPORTS = ("float32", "float16", "bfloat16")
INDEX_FORMAT = "fedct-weights/1"


@dataclass(frozen=True)
class Packed:
    """Buffers keyed by wire dtype name and the JSON index that maps them back to named tensors."""

    buffers: dict[str, np.ndarray]
    index: str

    @property
    def nbytes(self) -> int:
        """Bytes of payload (the buffers; the index is a few kB)."""
        return int(sum(b.nbytes for b in self.buffers.values()))


def _torch(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.array(value, order="C", copy=True))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(state: Mapping[str, Any], *, transport: str = "float32") -> Packed:
    """Pack a state dict (torch tensors or numpy arrays) into one buffer per wire dtype.

    Floating tensors travel as ``transport``; other dtypes unchanged. Order of the index = order of ``state``.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    wire_float = getattr(torch, transport)
    groups: dict[str, list[torch.Tensor]] = {}
    offsets: dict[str, int] = {}
    entries = []
    for name, value in state.items():
        tensor = _torch(value)
        wire = wire_float if tensor.is_floating_point() else tensor.dtype
        flat = tensor.reshape(-1).to(wire)
        group = _dtype_name(wire)
        start = offsets.get(group, 0)
        groups.setdefault(group, []).append(flat)
        offsets[group] = start + flat.numel()
        entries.append([name, _dtype_name(tensor.dtype), list(tensor.shape), group, start, flat.numel()])
    buffers = {}
    for group, parts in groups.items():
        joined = torch.cat(parts) if parts else torch.empty(0)
        if joined.dtype == torch.bfloat16:
            joined = joined.view(torch.int16)
        buffers[group] = joined.numpy()
    index = json.dumps({"format": INDEX_FORMAT, "transport": transport, "tensors": entries}, separators=(",", ":"))
    return Packed(buffers=buffers, index=index)


def index_transport(index: str) -> str:
    """The wire dtype of the floating tensors recorded in an index."""
    return str(_parse(index)["transport"])


def _parse(index: str) -> dict[str, Any]:
    try:
        meta = json.loads(index)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights index is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ValueError(
            f"weights index format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {INDEX_FORMAT!r}"
        )
    return meta


def unpack(buffers: Mapping[str, np.ndarray], index: str) -> dict[str, torch.Tensor]:
    """The named tensors of a packed message, each back in its original dtype (floats widened from the wire)."""
    meta = _parse(index)
    tensors: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    for name, dtype, shape, group, start, numel in meta["tensors"]:
        if group not in cache:
            if group not in buffers:
                raise ValueError(f"weights index names buffer {group!r}, which the message lacks")
            raw = torch.from_numpy(np.array(buffers[group], order="C", copy=True).reshape(-1))
            cache[group] = raw.view(torch.bfloat16) if group == "bfloat16" else raw
        buf = cache[group]
        if start < 0 or start + numel > buf.numel():
            raise ValueError(f"weights index entry {name!r} reaches past the end of buffer {group!r}")
        tensors[name] = buf[start : start + numel].to(getattr(torch, dtype)).reshape(shape).clone()
    return tensors
