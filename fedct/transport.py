"""Weights in Flower messages, both directions: the ArrayRecord of a message packed into a few buffers
(``models.weights``) with the index in a ConfigRecord ``weights-index``, and back to per-tensor arrays.

Used by the ClientApp (unpack the global model, pack the reply) and by the server's round loop (pack what it
sends, unpack the replies before validation and aggregation, so Flower's strategies see ordinary arrays).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedct.protocol import ARRAYS_RECORD, INDEX_RECORD
from models.weights import INDEX_FORMAT, TRANSPORTS, pack, unpack

__all__ = [
    "INDEX_RECORD",
    "TransportError",
    "decode_checked",
    "decode_content",
    "encode_content",
    "received_state",
    "record_nbytes",
    "weights_records",
]


def record_nbytes(content: RecordDict) -> int:
    """Bytes of array payload in a message's content."""
    return int(sum(len(array.data) for record in content.array_records.values() for array in record.values()))


def encode_content(content: RecordDict, *, transport: str) -> RecordDict:
    """A copy of ``content`` whose (single) ArrayRecord is packed into buffers, with the index in ``weights-index``."""
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            packed = pack({k: a.numpy() for k, a in record.items()}, transport=transport)
            out[key] = ArrayRecord({k: Array(v) for k, v in packed.buffers.items()})
            out[INDEX_RECORD] = ConfigRecord({"arrays-key": key, "index": packed.index})
        else:
            out[key] = record
    return out


def decode_content(content: RecordDict) -> RecordDict:
    """Inverse of :func:`encode_content`: per-tensor arrays in their original dtypes (content without an index is
    returned as it is)."""
    if INDEX_RECORD not in content:
        return content
    meta = content[INDEX_RECORD]
    key = str(meta["arrays-key"])
    tensors = unpack({k: a.numpy() for k, a in content[key].items()}, str(meta["index"]))
    out = RecordDict()
    for name, record in content.items():
        if name == INDEX_RECORD:
            continue
        out[name] = ArrayRecord({k: Array(t.numpy()) for k, t in tensors.items()}) if name == key else record
    return out


#: Tensor dtypes a packed index may name (torch names, as ``models.weights`` writes them).
KNOWN_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
)
#: How each wire buffer reads back with numpy (bfloat16 buffers travel as their raw 16-bit words).
WIRE_NUMPY = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.int16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
#: Bytes an array's serialisation may carry beyond its payload (the .npy header).
NPY_HEADER_SLACK = 4096


class TransportError(ValueError):
    """A received message's weights cannot be decoded as the expected model: a reason code and a reason written by
    the receiver (no text taken from the message)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_array(array: Any, *, max_bytes: int, what: str) -> np.ndarray:
    """An Array as numpy after checking its serialisation type and byte length (never unpickles)."""
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise TransportError("malformed_weights", f"{what} is not a numpy array")
    if len(array.data) > max_bytes + NPY_HEADER_SLACK:
        raise TransportError("size_mismatch", f"{what} has {len(array.data)} bytes, expected at most {max_bytes}")
    try:
        return np.asarray(array.numpy())
    except Exception:  # noqa: BLE001 - truncated or corrupt serialisation: what numpy raises varies
        raise TransportError("malformed_weights", f"{what} cannot be read as a numpy array") from None


def _checked_plain(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if set(record.keys()) != set(reference):
        raise TransportError("shape_mismatch", "tensor names differ from the global model's")
    out = {}
    for name, ref in reference.items():
        value = _read_array(record[name], max_bytes=ref.nbytes, what=f"tensor {name!r}")
        if value.dtype != ref.dtype:
            raise TransportError(
                "dtype_mismatch", f"tensor {name!r} has dtype {value.dtype}, the global model {ref.dtype}"
            )
        if value.shape != ref.shape:
            raise TransportError(
                "shape_mismatch", f"tensor {name!r} has shape {value.shape}, the global model {ref.shape}"
            )
        out[name] = value
    return out


def _index_entries(meta: Any, reference: Mapping[str, np.ndarray]) -> tuple[str, list[tuple[str, str, int, int]]]:
    """The index's transport and ``(name, group, start, numel)`` per tensor, in reference order, after checking
    every entry against the reference (TransportError otherwise)."""
    if not isinstance(meta, dict) or set(meta) != {"format", "transport", "tensors"} or meta["format"] != INDEX_FORMAT:
        raise TransportError("bad_index", f"the weights index is not a {INDEX_FORMAT} index")
    transport, entries = meta["transport"], meta["tensors"]
    if not isinstance(transport, str) or transport not in TRANSPORTS:
        raise TransportError("unknown_dtype", "the weights index names an unknown transport dtype")
    if not isinstance(entries, list) or len(entries) != len(reference):
        raise TransportError(
            "shape_mismatch",
            f"the weights index lists {len(entries) if isinstance(entries, list) else 0} "
            f"tensors, the global model has {len(reference)}",
        )
    seen: dict[str, tuple[str, int, int]] = {}
    for position, entry in enumerate(entries):
        if not (
            isinstance(entry, list)
            and len(entry) == 6
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], list)
            and all(_is_int(d) for d in entry[2])
            and isinstance(entry[3], str)
            and _is_int(entry[4])
            and _is_int(entry[5])
        ):
            raise TransportError(
                "bad_index", f"weights index entry #{position + 1} is not [name, dtype, shape, buffer, start, count]"
            )
        name, dtype, shape, group, start, numel = entry
        if name not in reference or name in seen:
            raise TransportError(
                "shape_mismatch", f"weights index entry #{position + 1} is not a tensor of the global model"
            )
        ref = reference[name]
        if dtype not in KNOWN_DTYPES or group not in KNOWN_DTYPES:
            raise TransportError("unknown_dtype", f"weights index entry for {name!r} names an unknown dtype")
        if dtype != ref.dtype.name:
            raise TransportError(
                "dtype_mismatch", f"tensor {name!r} is declared {dtype}, the global model has {ref.dtype}"
            )
        if tuple(shape) != ref.shape:
            raise TransportError(
                "shape_mismatch",
                f"tensor {name!r} is declared with shape {tuple(shape)}, the global model has {ref.shape}",
            )
        wire = transport if ref.dtype.kind == "f" else dtype
        if group != wire:
            raise TransportError("dtype_mismatch", f"tensor {name!r} travels in buffer {group}, expected {wire}")
        if numel != ref.size or start < 0:
            raise TransportError("bad_index", f"tensor {name!r} is declared with {numel} values at offset {start}")
        seen[name] = (group, start, numel)
    return transport, [(name, *seen[name]) for name in reference]


def decode_checked(
    content: RecordDict, reference: Mapping[str, np.ndarray], *, key: str = ARRAYS_RECORD
) -> dict[str, np.ndarray]:
    """The per-tensor weights of a received message, checked against ``reference`` (the global model: names, shapes,
    dtypes) before anything is decoded; :class:`TransportError` with a reason code when they do not fit.

    Packed (``weights-index``): the index must be a well-formed fedct index naming exactly the reference's tensors with
    their dtypes and shapes, known dtypes only, buffers that tile each wire buffer exactly; each buffer's byte length
    and element count must be what the index says. Per tensor: the ArrayRecord's arrays must be the reference's.
    Floats come back widened from the wire dtype to the reference's.
    """
    if key not in content or not isinstance(content[key], ArrayRecord):
        raise TransportError("malformed_reply", f"no ArrayRecord {key!r}")
    record = content[key]
    if INDEX_RECORD not in content:
        return _checked_plain(record, reference)
    meta = content[INDEX_RECORD]
    if not isinstance(meta, ConfigRecord) or set(meta.keys()) != {"arrays-key", "index"}:
        raise TransportError("bad_index", f"{INDEX_RECORD} must hold exactly arrays-key and index")
    if meta["arrays-key"] != key:
        raise TransportError("bad_index", f"{INDEX_RECORD} must name the ArrayRecord {key!r}")
    index = meta["index"]
    if not isinstance(index, str) or len(index) > 4096 + 512 * len(reference):
        raise TransportError("bad_index", "the weights index is not a string of a plausible length")
    try:
        parsed = json.loads(index)
    except ValueError:
        raise TransportError("bad_index", "the weights index is not JSON") from None
    _, entries = _index_entries(parsed, reference)  # floats are widened to the reference dtype whatever the wire
    totals: dict[str, int] = {}
    for _, group, start, numel in sorted(entries, key=lambda e: (e[1], e[2])):
        if start != totals.get(group, 0):
            raise TransportError("bad_index", f"the tensors of buffer {group} overlap or leave gaps")
        totals[group] = start + numel
    if set(record.keys()) != set(totals):
        raise TransportError("bad_index", "the message's buffers are not those the weights index names")
    buffers = {}
    for group, total in totals.items():
        wire = WIRE_NUMPY[group]
        raw = _read_array(record[group], max_bytes=total * wire.itemsize, what=f"buffer {group}")
        if raw.dtype != wire:
            raise TransportError("dtype_mismatch", f"buffer {group} holds {raw.dtype}, expected {wire}")
        if raw.ndim != 1 or raw.size != total:
            raise TransportError("size_mismatch", f"buffer {group} holds {raw.size} values, the index says {total}")
        buffers[group] = torch.from_numpy(np.array(raw, order="C", copy=True))
    if "bfloat16" in buffers:
        buffers["bfloat16"] = buffers["bfloat16"].view(torch.bfloat16)
    out = {}
    for name, group, start, numel in entries:
        ref = reference[name]
        tensor = buffers[group][start : start + numel]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.numpy().astype(ref.dtype).reshape(ref.shape)
    return out


def received_state(content: RecordDict, key: str = ARRAYS_RECORD) -> dict[str, torch.Tensor]:
    """The model weights of a received message as a torch state dict (packed or per-tensor)."""
    return decode_content(content)[key].to_torch_state_dict()


def weights_records(
    state: Mapping[str, torch.Tensor], *, transport: str | None, key: str = ARRAYS_RECORD
) -> RecordDict:
    """A RecordDict with ``state`` under ``key``: packed with ``transport`` (and its index), or per-tensor when None."""
    content = RecordDict({key: ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})})
    return encode_content(content, transport=transport) if transport else content
