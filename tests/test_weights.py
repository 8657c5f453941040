"""models.weights: a state dict packed into one buffer per wire dtype and back."""

import json

import numpy as np
import pytest
import torch

from models.factory import ModelConfig, build_model
from models.weights import TRANSPORTS, pack, unpack


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="smallcnn"))
    with torch.no_grad():  # BatchNorm statistics and counters that are not the defaults
        for _name, buf in model.named_buffers():
            buf.copy_(torch.randint(1, 1000, buf.shape) if not buf.is_floating_point() else torch.rand(buf.shape) + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_float32_round_trip_is_exact_and_keeps_dtypes_shapes_and_order(state):
    packed = pack(state, transport="float32")
    back = unpack(packed.buffers, packed.index)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value), key
    assert sorted(packed.buffers) == ["float32", "int64"]  # a few buffers instead of one array per tensor
    assert len(state) > 20


@pytest.mark.parametrize(("transport", "rel_error"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_half_precision_round_trip_has_bounded_error_and_integers_stay_exact(state, transport, rel_error):
    packed = pack(state, transport=transport)
    back = unpack(packed.buffers, packed.index)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        if value.is_floating_point():
            bound = rel_error * value.abs() + 1e-7  # round to nearest: half a unit in the last place, relative
            assert bool(((back[key] - value).abs() <= bound).all()), key
        else:
            assert torch.equal(back[key], value), key  # num_batches_tracked travels as int64


def test_half_precision_halves_the_bytes(state):
    sizes = {t: pack(state, transport=t).nbytes for t in TRANSPORTS}
    ints = sum(v.numel() * v.element_size() for v in state.values() if not v.is_floating_point())
    assert sizes["float16"] - ints == (sizes["float32"] - ints) // 2
    assert sizes["bfloat16"] == sizes["float16"]


def test_numpy_input_and_zero_dimensional_tensors():
    packed = pack({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64)})
    back = unpack(packed.buffers, packed.index)
    assert back["a"].shape == (2, 3) and back["n"].shape == () and int(back["n"]) == 7


def test_packed_float_buffers_are_numeric_so_differences_match_per_tensor(state):
    """A client-side mod that clips ||reply - global|| sees the same norm on packed float32 buffers."""
    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    a, b = pack(state).buffers["float32"], pack(moved).buffers["float32"]
    per_tensor = sum(float(((moved[k] - state[k]) ** 2).sum()) for k in state if state[k].is_floating_point())
    assert np.isclose(float(((b.astype(np.float64) - a) ** 2).sum()), per_tensor, rtol=1e-4)


def test_bad_transport_and_damaged_index_are_refused(state):
    with pytest.raises(ValueError, match="transport 'int8'"):
        pack(state, transport="int8")
    packed = pack(state)
    with pytest.raises(ValueError, match="not JSON"):
        unpack(packed.buffers, "{oops")
    with pytest.raises(ValueError, match="format"):
        unpack(packed.buffers, json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="lacks"):
        unpack({"float32": packed.buffers["float32"]}, packed.index)
    meta = json.loads(packed.index)
    meta["tensors"][0][5] = 10**9
    with pytest.raises(ValueError, match="past the end"):
        unpack(packed.buffers, json.dumps(meta))
