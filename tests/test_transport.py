"""fedct.transport: weights packed into a message and back, and what that means for aggregation."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedct.transport import INDEX_RECORD, decode_content, encode_content, received_state, record_nbytes, weights_records
from models.factory import ModelConfig, build_model


@pytest.fixture(scope="module")
def states():
    torch.manual_seed(1)
    return [{k: v.clone() for k, v in build_model(ModelConfig(name="smallcnn")).state_dict().items()} for _ in range(3)]


def _reply(content, node):
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def test_content_round_trip_keeps_the_other_records(states):
    content = weights_records(states[0], transport=None)
    content["config"] = ConfigRecord({"server-round": 3})
    packed = encode_content(content, transport="float32")
    assert INDEX_RECORD in packed and len(packed["arrays"]) == 2 and packed["config"]["server-round"] == 3
    assert record_nbytes(packed) < record_nbytes(content)  # one .npy header per buffer instead of per tensor
    back = decode_content(packed)
    assert INDEX_RECORD not in back and back["config"]["server-round"] == 3
    restored = back["arrays"].to_torch_state_dict()
    assert list(restored) == list(states[0]) and all(torch.equal(restored[k], states[0][k]) for k in states[0])
    assert all(torch.equal(received_state(packed)[k], states[0][k]) for k in states[0])
    assert decode_content(content) is content  # unpacked messages pass through


def test_packed_and_unpacked_replies_give_the_same_fedavg_aggregate(states):
    def replies(transport):
        out = []
        for i, state in enumerate(states):
            content = weights_records(state, transport=transport)
            content["metrics"] = MetricRecord({"num-examples": 3 + i})
            out.append(_reply(decode_content(content), i + 1))  # what the round loop hands to the strategy
        return out

    plain, _ = FedAvg().aggregate_train(1, replies(None))
    packed, _ = FedAvg().aggregate_train(1, replies("float32"))
    for key in states[0]:
        assert np.array_equal(plain[key].numpy(), packed[key].numpy()), key
    half, _ = FedAvg().aggregate_train(1, replies("float16"))
    worst = max(
        float(np.max(np.abs(half[k].numpy() - plain[k].numpy()))) for k in states[0] if states[0][k].is_floating_point()
    )
    assert 0 < worst < 1e-3


def test_a_message_without_arrays_is_unchanged_by_encoding():
    content = RecordDict({"metrics": MetricRecord({"val-n": 3}), "config": ConfigRecord({"a": 1})})
    assert INDEX_RECORD not in encode_content(content, transport="float16")
    assert record_nbytes(content) == 0
    assert record_nbytes(RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(4, np.float32))})})) > 16


def _reference(states):
    return {k: v.numpy() for k, v in states[0].items()}


@pytest.mark.parametrize("transport", ["float32", "float16", "bfloat16", None])
def test_decode_checked_restores_the_model_from_every_transport(states, transport):
    from fedct.transport import decode_checked

    reference = _reference(states)
    out = decode_checked(weights_records(states[1], transport=transport), reference)
    assert list(out) == list(reference) and all(out[k].dtype == reference[k].dtype for k in reference)
    tolerance = {"float32": 0, None: 0, "float16": 1e-3, "bfloat16": 1e-2}[transport]
    assert all(np.allclose(out[k], states[1][k].numpy(), atol=tolerance, rtol=tolerance) for k in reference)


def _index_edit(edit):
    def change(content):
        meta = json.loads(content[INDEX_RECORD]["index"])
        edit(meta)
        content[INDEX_RECORD]["index"] = json.dumps(meta)

    return change


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (_index_edit(lambda m: m["tensors"][0].__setitem__(1, "complex256")), "unknown_dtype"),
        (_index_edit(lambda m: m.__setitem__("transport", "int4")), "unknown_dtype"),
        (_index_edit(lambda m: m["tensors"][0].__setitem__(2, [1, 2, 3])), "shape_mismatch"),
        (_index_edit(lambda m: m["tensors"].pop()), "shape_mismatch"),
        (_index_edit(lambda m: m["tensors"][1].__setitem__(4, 0)), "bad_index"),  # overlaps tensor 0
        (_index_edit(lambda m: m["tensors"][0].__setitem__(0, "other")), "shape_mismatch"),
        (_index_edit(lambda m: m["tensors"][0].__setitem__(4, True)), "bad_index"),
        (_index_edit(lambda m: m.__setitem__("format", "x")), "bad_index"),
        (lambda c: c[INDEX_RECORD].__setitem__("arrays-key", "site"), "bad_index"),
        (lambda c: c["arrays"].__setitem__("float32", Array(np.zeros(5, np.float32))), "size_mismatch"),
        (lambda c: c["arrays"].__setitem__("int64", Array(np.zeros(10**6, np.int64))), "size_mismatch"),
        (
            lambda c: c["arrays"].__setitem__(
                "float32",
                Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=c["arrays"]["float32"].data[:200]),
            ),
            "malformed_weights",
        ),
        (lambda c: c["arrays"].__setitem__("extra", Array(np.zeros(1, np.float32))), "bad_index"),
    ],
)
def test_decode_checked_refuses_what_does_not_fit_the_model_with_a_code(states, change, code):
    from fedct.transport import TransportError, decode_checked

    content = weights_records(states[1], transport="float32")
    change(content)
    with pytest.raises(TransportError) as info:
        decode_checked(content, _reference(states))
    assert info.value.code == code


def test_decode_checked_refuses_per_tensor_arrays_of_another_model(states):
    from fedct.transport import TransportError, decode_checked

    content = weights_records(states[1], transport=None)
    first = next(iter(states[1]))
    content["arrays"][first] = Array(np.zeros(3, np.float32))
    with pytest.raises(TransportError) as info:
        decode_checked(content, _reference(states))
    assert info.value.code == "shape_mismatch"
