"""Site side of SecAgg+: which messages Flower's secaggplus_mod gets, and the legacy fit message. (The protocol
end to end, with the aggregate compared to FedAvg: test_fl_server_secagg.)"""

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_client.secagg import (
    floating_keys,
    is_legacy_fit,
    legacy_fit_reply,
    legacy_fit_request,
    secaggplus_when_requested,
)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _echo(msg: Message, _context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"handled": 1})}), reply_to=msg)


def test_normal_messages_pass_through_to_the_handler(task_identity):
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        msg = Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type=message_type
        )
        reply = secaggplus_when_requested(msg, _context(), _echo)
        assert not reply.has_error() and reply.content["metrics"]["handled"] == 1


def test_secaggplus_messages_go_to_flowers_mod(task_identity):
    # A setup-stage message: Flower's mod answers it itself (public keys), the handler is not called.
    config = {
        "stage": "setup",
        "sample_num": 3,
        "share_num": 3,
        "threshold": 2,
        "clipping_range": 8.0,
        "target_range": 2**22,
        "mod_range": 2**32,
        "max_weight": 10.0,
    }
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)}), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = secaggplus_when_requested(msg, _context(), _echo)
    assert not reply.has_error()
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert isinstance(keys["pk1"], bytes) and isinstance(keys["pk2"], bytes)
    assert "metrics" not in reply.content


def test_legacy_fit_messages_are_recognised(task_identity):
    fitins = FitIns(parameters=ndarrays_to_parameters([np.zeros(3, dtype=np.float32)]), config={"server-round": 1})
    legacy = Message(
        compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=7, message_type=MessageType.TRAIN
    )
    normal = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type=MessageType.TRAIN
    )
    assert is_legacy_fit(legacy) and not is_legacy_fit(normal)


def test_only_floating_point_tensors_are_securely_aggregated():
    state = {"conv.weight": torch.zeros(2), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)}
    assert floating_keys(state) == ["conv.weight", "bn.running_var"]


def test_a_legacy_fit_config_with_lists_is_read_as_it_came(task_identity):
    """A fused run's round settings carry lists (the profile normalisation); Flower's recorddict_to_fitins refuses
    them, so the site reads the legacy records directly."""
    fitins = FitIns(
        parameters=ndarrays_to_parameters([np.arange(3, dtype=np.float32)]),
        config={"server-round": 1, "profile-mean": [1.0, 2.0]},  # type: ignore[dict-item]
    )
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=7, message_type=MessageType.TRAIN)
    arrays, config = legacy_fit_request(msg)
    assert config == {"server-round": 1, "profile-mean": [1.0, 2.0]}
    assert len(arrays) == 1 and np.array_equal(arrays[0], np.arange(3, dtype=np.float32))


def test_the_statistics_request_is_answered_with_the_vector_weight_one_and_the_name_only(task_identity, tmp_path):
    from fl_client.config import SiteConfig
    from fl_server.profile_norm import secure_request_config
    from preprocessing.profile import read_schema
    from preprocessing.profile_secagg import SecureLayout

    site = SiteConfig(site_name="site-b", dicom_dir=tmp_path, site_dir=tmp_path / "w", labels_csv=None)
    fitins = FitIns(parameters=ndarrays_to_parameters([]), config=dict(secure_request_config(read_schema())))
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=7, message_type=MessageType.TRAIN)
    assert is_legacy_fit(msg)
    fitres = compat.recorddict_to_fitres(legacy_fit_reply(msg, site).content, keep_input=True)
    (vector,) = parameters_to_ndarrays(fitres.parameters)
    assert fitres.num_examples == 1 and fitres.metrics == {"site-name": "site-b"}
    # a site without a profile export adds zeros (it still takes part in the masked sum)
    assert vector.shape == (SecureLayout.from_schema(read_schema()).size,) and not vector.any()
