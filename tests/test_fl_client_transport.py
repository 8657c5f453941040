"""fl_client.transport: weights packed into a message and back, and what that means for aggregation."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_client.transport import INDEX_RECORD, decode_content, encode_content, received_state, record_nbytes, weights_records
from models.factory import ModelConfig, build_model


@pytest.fixture(scope="module")
def states():
    torch.manual_seed(1)
    return [{k: v.clone() for k, v in build_model(ModelConfig(name="smallcnn")).state_dict().items()} for _ in range(3)]


def _reply(content, node):
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)  # fmt: skip
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
    worst = max(float(np.max(np.abs(half[k].numpy() - plain[k].numpy()))) for k in states[0] if states[0][k].is_floating_point())
    assert 0 < worst < 1e-3


def test_a_message_without_arrays_is_unchanged_by_encoding():
    content = RecordDict({"metrics": MetricRecord({"val-n": 3}), "config": ConfigRecord({"a": 1})})
    assert INDEX_RECORD not in encode_content(content, transport="float16")
    assert record_nbytes(content) == 0
    assert record_nbytes(RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(4, np.float32))})})) > 16
