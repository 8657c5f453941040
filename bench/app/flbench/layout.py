"""Model <-> ArrayRecord in two layouts: one array per tensor, or one contiguous buffer per dtype + an index."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict


def to_content(state: OrderedDict[str, np.ndarray], layout: str) -> RecordDict:
    """Arrays (+ index for ``packed``) as message content."""
    if layout == "tensors":
        return RecordDict(
            {"arrays": ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))}
        )
    if layout not in ("packed", "packed16"):
        raise ValueError(f"layout {layout!r} is not 'tensors', 'packed' or 'packed16'")
    if layout == "packed16":  # float32 travels as float16 (fedct's transport=float16)
        state = OrderedDict((k, v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in state.items())
    buffers: dict[str, list[np.ndarray]] = {}
    names, dtypes, shapes, offsets = [], [], [], []
    sizes: dict[str, int] = {}
    for name, value in state.items():
        key = str(value.dtype)
        names.append(name)
        dtypes.append(key)
        shapes.append(",".join(map(str, value.shape)))
        offsets.append(sizes.get(key, 0))
        sizes[key] = sizes.get(key, 0) + value.size
        buffers.setdefault(key, []).append(value.reshape(-1))
    arrays = ArrayRecord(OrderedDict((k, Array(np.concatenate(v))) for k, v in buffers.items()))
    index = ConfigRecord({"names": names, "dtypes": dtypes, "shapes": shapes, "offsets": offsets})
    return RecordDict({"arrays": arrays, "index": index})


def from_content(content: RecordDict) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`to_content`."""
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    if "index" not in content.config_records:
        return OrderedDict(arrays)
    index = content["index"]
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, dtype, shape, offset in zip(index["names"], index["dtypes"], index["shapes"], index["offsets"]):
        dims = tuple(int(d) for d in str(shape).split(",") if d)
        size = int(np.prod(dims)) if dims else 1
        out[str(name)] = arrays[str(dtype)][int(offset) : int(offset) + size].reshape(dims)
    return out


def nbytes(content: RecordDict) -> int:
    """Bytes of array data in the content."""
    return sum(int(a.numpy().nbytes) for a in content["arrays"].values())
