"""Site side of SecAgg+ (Flower's legacy workflow), next to the normal Message-API handlers.

With ``secure-aggregation=true`` the server runs ``flwr.server.workflow.SecAggPlusWorkflow``: four TRAIN messages per
round carrying a ``secaggplus`` ConfigRecord (setup, share keys, collect masked vectors, unmask). Flower's
``secaggplus_mod`` answers them; in the collect stage it calls the ClientApp's train handler with a *legacy* fit
message (``fitins.parameters`` / ``fitins.config``), expects a legacy ``fitres`` back, quantizes and masks its
parameters, and sends only the masked vector. So the site's one ClientApp:

- wraps every message in :func:`secaggplus_when_requested` (Flower's mod for SecAgg+ messages, a pass-through for
  all others, which Flower's mod alone would reject), and
- answers a legacy fit message with :func:`legacy_fit_reply`: the same ``fl_client.train.train_round`` as the
  normal handler, returning the **update** (trained minus received weights) of the floating-point tensors. Updates
  are small, so they fit SecAgg+'s clipping range where some weights (e.g. BatchNorm running variances) might not;
  integer buffers (BatchNorm's batch counter) are not sent and keep the global value.

The legacy parameters are the model's state-dict tensors in ``state_dict()`` order (legacy Parameters carry no names).

The profile statistics exchange before round 1 of a fused run uses the same workflow (``fl_server.secagg``): its
legacy fit message has no parameters and a config with ``profile-statistics``; :func:`legacy_fit_reply` then answers
with :func:`secure_statistics_reply` (no training): the site's statistics vector
(:func:`fl_client.profile_stats.secure_statistics_vector`), weight 1, and only the site name as a metric.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedct.protocol import (
    NUM_EXAMPLES,
    PROFILE_STATISTICS,
    SITE_NAME_METRIC,
    TRAIN_LOSS,
    TRAIN_LOSS_DIAGNOSIS,
    TRAIN_LOSS_PROGNOSIS,
    TRAIN_SECONDS,
    RoundSettings,
)
from fl_client.config import SiteConfig
from fl_client.metrics import MIN_COUNT, floor_training
from fl_client.profile_stats import secure_statistics_vector
from fl_client.train import train_round
from models.factory import build_model

log = logging.getLogger("fedct.client")

#: The legacy fit message's parameters record (what SecAgg+'s collect stage sends to the train handler).
LEGACY_FIT_KEY = "fitins.parameters"


def secaggplus_when_requested(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ training messages; every other message passes through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_legacy_fit(msg: Message) -> bool:
    """True for the legacy fit message of SecAgg+'s collect stage."""
    return msg.metadata.message_type == MessageType.TRAIN and LEGACY_FIT_KEY in msg.content.array_records


def floating_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors, in state-dict order (what SecAgg+ aggregates)."""
    return [k for k, v in state.items() if v.is_floating_point()]


#: The legacy fit message's config record.
LEGACY_CONFIG_KEY = "fitins.config"


def legacy_fit_request(msg: Message) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The arrays and config of a legacy fit message. Flower's ``recorddict_to_fitins`` refuses list values, which
    the round settings of a fused run carry (the profile normalisation's means, SDs and counts), so read the records
    directly."""
    arrays = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(msg.content.array_records[LEGACY_FIT_KEY], keep_input=True)
    )
    return arrays, dict(msg.content.config_records[LEGACY_CONFIG_KEY])


def legacy_fit_reply(msg: Message, site: SiteConfig, *, min_count: int = MIN_COUNT) -> Message:
    """Train on a legacy fit message and reply with a legacy fit result holding the floating-point update
    (training metrics after the privacy floor ``min_count``, :func:`fl_client.metrics.floor_training`)."""
    arrays, config = legacy_fit_request(msg)
    if bool(config.get(PROFILE_STATISTICS, False)):
        return secure_statistics_reply(msg, site, min_count=min_count)
    settings = RoundSettings.from_record(config)
    names = list(build_model(settings.model).state_dict())
    if len(arrays) != len(names):
        raise ValueError(
            f"SecAgg+ round {settings.server_round}: the server sent {len(arrays)} tensors, the model "
            f"{settings.model.name!r} has {len(names)}"
        )
    received = {name: torch.from_numpy(np.array(a, copy=True)) for name, a in zip(names, arrays, strict=True)}
    state, result = train_round(site, settings, received)
    update = [(state[k].detach().cpu() - received[k]).numpy() for k in floating_keys(received)]
    log.info(
        "%s round %d (SecAgg+): trained on %d studies, loss %.4f, %.1fs",
        site.site_name,
        settings.server_round,
        result.num_examples,
        result.loss,
        result.seconds,
    )
    metrics = floor_training(
        {
            TRAIN_LOSS: result.loss,
            TRAIN_LOSS_DIAGNOSIS: result.diagnosis_loss,
            TRAIN_LOSS_PROGNOSIS: result.prognosis_loss,
            TRAIN_SECONDS: result.seconds,
            NUM_EXAMPLES: result.num_examples,
        },
        min_count=min_count,
    )
    metrics[SITE_NAME_METRIC] = site.site_name
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(update),
        num_examples=result.num_examples,
        metrics=metrics,
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def secure_statistics_reply(msg: Message, site: SiteConfig, *, min_count: int = MIN_COUNT) -> Message:
    """Answer SecAgg+'s legacy fit message of the profile statistics exchange: a legacy fit result whose one array
    is the site's statistics vector (``secaggplus_mod`` masks it before it leaves), ``num_examples`` 1 (every site
    weighs the same, so the server's unmasked result times the number of sites is the plain sum) and the site name
    as the only metric: no count, no sum leaves the site unmasked."""
    _, config = legacy_fit_request(msg)
    vector = secure_statistics_vector(site, config, min_count=min_count)
    log.info("%s: profile statistics sent through SecAgg+ (%d numbers, masked)", site.site_name, vector.size)
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([vector]),
        num_examples=1,
        metrics={SITE_NAME_METRIC: site.site_name},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
