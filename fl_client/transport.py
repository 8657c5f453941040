"""Weights in Flower messages, both directions: the ArrayRecord of a message packed into a few buffers
(``models.weights``) with the index in a ConfigRecord ``weights-index``, and back to per-tensor arrays.

Used by the ClientApp (unpack the global model, pack the reply) and by the server's round loop (pack what it
sends, unpack the replies before validation and aggregation, so Flower's strategies see ordinary arrays).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from models.weights import pack, unpack

#: ConfigRecord carrying the index of packed weights (see models.weights); ``arrays-key`` names the ArrayRecord.
INDEX_RECORD = "weights-index"


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




def received_state(content: RecordDict, key: str = "arrays") -> dict[str, torch.Tensor]:
    """The model weights of a received message as a torch state dict (packed or per-tensor)."""
    return decode_content(content)[key].to_torch_state_dict()


def weights_records(state: Mapping[str, torch.Tensor], *, transport: str | None, key: str = "arrays") -> RecordDict:
    """A RecordDict with ``state`` under ``key``: packed with ``transport`` (and its index), or per-tensor when None."""
    content = RecordDict({key: ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})})
    return encode_content(content, transport=transport) if transport else content
