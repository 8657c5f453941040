"""The site's privacy mods on real Flower messages: Flower's clipping mod chosen from dp-mode, packed weights
unpacked for it and packed again, other messages and modes untouched. (Whole federations: test_fl_server_privacy.)"""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, get_norm

from fedct.transport import INDEX_RECORD, decode_content, weights_records
from fl_client.privacy import dp_clipping_mod, privacy_mods, site_dp_mode
from fl_client.secagg import secaggplus_when_requested

GLOBAL = {"w": np.zeros((4, 5), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
TRAINED = {"w": np.full((4, 5), 2.0, dtype=np.float32), "b": np.full(3, -1.0, dtype=np.float32)}  # update norm ~9.1


def _train_message(*, packed: bool, clip: float | None = 1.0) -> Message:
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in GLOBAL.items()}
    content = weights_records(state, transport="float32" if packed else None)
    config = {"server-round": 1} | ({KEY_CLIPPING_NORM: clip} if clip is not None else {})
    content["config"] = ConfigRecord(config)
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _handler(msg: Message, _context: Context) -> Message:
    """A site's train handler: replies packed when the server sent packed weights (as fl_client.client_app does)."""
    import torch

    content = weights_records(
        {k: torch.from_numpy(v.copy()) for k, v in TRAINED.items()},
        transport="float32" if INDEX_RECORD in msg.content else None,
    )
    content["metrics"] = MetricRecord({"num-examples": 5})
    content["site"] = ConfigRecord({"name": "site-a"})
    return Message(content, reply_to=msg)


def _context(dp_mode: str) -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={"dp-mode": dp_mode})


def _update_norm(reply: Message) -> float:
    arrays = decode_content(reply.content)["arrays"]
    return get_norm([arrays[k].numpy() - GLOBAL[k] for k in GLOBAL])


@pytest.mark.parametrize("packed", [True, False])
def test_client_fixed_mode_clips_the_update_and_keeps_the_reply_packed_as_sent(task_identity, packed):
    reply = dp_clipping_mod()(_train_message(packed=packed), _context("client-fixed"), _handler)
    assert not reply.has_error()
    assert (INDEX_RECORD in reply.content) is packed
    assert _update_norm(reply) == pytest.approx(1.0, rel=1e-5)
    assert reply.content["site"]["name"] == "site-a"


def test_client_adaptive_mode_reports_whether_it_clipped(task_identity):
    reply = dp_clipping_mod()(_train_message(packed=True), _context("client-adaptive"), _handler)
    assert _update_norm(reply) == pytest.approx(1.0, rel=1e-5)
    assert reply.content["metrics"]["norm_bit"] == 1  # 1: this update was clipped


@pytest.mark.parametrize("mode", ["off", "server-fixed", "server-adaptive"])
def test_other_modes_leave_the_update_alone(task_identity, mode):
    reply = dp_clipping_mod()(_train_message(packed=True), _context(mode), _handler)
    assert _update_norm(reply) == pytest.approx(get_norm([TRAINED[k] for k in TRAINED]))


def test_run_config_overrides_choose_the_mode_in_simulation(task_identity):
    reply = dp_clipping_mod({"dp-mode": "client-fixed"})(_train_message(packed=False), _context("off"), _handler)
    assert _update_norm(reply) == pytest.approx(1.0, rel=1e-5)


def test_a_server_that_sends_no_clipping_norm_gets_an_error_reply(task_identity):
    reply = dp_clipping_mod()(_train_message(packed=True, clip=None), _context("client-fixed"), _handler)
    assert reply.has_error()


def test_evaluate_messages_pass_through(task_identity):
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type=MessageType.EVALUATE
    )
    reply = dp_clipping_mod()(
        msg,
        _context("client-fixed"),
        lambda m, c: Message(RecordDict({"metrics": MetricRecord({"val-n": 3})}), reply_to=m),
    )
    assert not reply.has_error() and reply.content["metrics"]["val-n"] == 3


def test_unknown_dp_mode_at_the_site_is_an_error_naming_the_key():
    assert site_dp_mode({}) == "off"
    with pytest.raises(ValueError, match="dp-mode"):
        site_dp_mode({"dp-mode": "local"})


def test_privacy_mods_put_secagg_outermost():
    mods = privacy_mods()
    assert mods[0] is secaggplus_when_requested and len(mods) == 2


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_a_fused_evaluation_travels_through_the_clipping_mods(task_identity, mode):
    """evaluate-mode=fused: the train reply carries the evaluation of the received weights in a ConfigRecord beside
    the update; Flower's clipping mods clip the update and leave that record (and the single MetricRecord) alone."""
    evaluation = {"val-loss": 0.5, "val-n": 3, "num-examples": 3, "train-hist-risk": [1, 0, 2]}

    def handler(msg: Message, context: Context) -> Message:
        reply = _handler(msg, context)
        reply.content["evaluate"] = ConfigRecord(evaluation)
        return reply

    reply = dp_clipping_mod()(_train_message(packed=True), _context(mode), handler)
    assert not reply.has_error()
    assert _update_norm(reply) == pytest.approx(1.0, rel=1e-5)
    assert dict(reply.content["evaluate"]) == evaluation
    assert len(reply.content.metric_records) == 1 and len(reply.content.array_records) == 1
