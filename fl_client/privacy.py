"""Site side of the privacy options: Flower's client mods chosen from the run config.

- ``dp-mode`` = ``client-fixed`` / ``client-adaptive``: the site clips its own update with Flower's
  ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (the server's wrapper sends the clipping norm and adds the noise);
- ``secure-aggregation`` = true: the SecAgg+ messages of Flower's legacy workflow are answered by Flower's
  ``secaggplus_mod`` (see ``fl_client.secagg``).

The mods are chosen per message from the run config, so one ClientApp serves every configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedct.protocol import INDEX_RECORD
from fedct.transport import decode_content, encode_content
from fl_client.secagg import secaggplus_when_requested
from models.weights import index_transport

#: ``dp-mode`` values that make the site clip its update, and the Flower mod that does it.
CLIENT_CLIPPING_MODS: dict[str, Mod] = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}
_SERVER_SIDE_OR_OFF = ("off", "server-fixed", "server-adaptive")


def site_dp_mode(run_config: Mapping[str, Any]) -> str:
    """The run's ``dp-mode`` as the site reads it (ValueError naming the key for an unknown value)."""
    mode = str(run_config.get("dp-mode", "off"))
    if mode not in CLIENT_CLIPPING_MODS and mode not in _SERVER_SIDE_OR_OFF:
        raise ValueError(
            f"run config dp-mode={mode!r} is not one of {', '.join((*_SERVER_SIDE_OR_OFF, *CLIENT_CLIPPING_MODS))}"
        )
    return mode


def dp_clipping_mod(run_config_overrides: Mapping[str, Any] | None = None) -> Mod:
    """A mod that applies Flower's client-side clipping mod on training messages when ``dp-mode`` asks for it."""
    overrides = dict(run_config_overrides or {})

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        clipping = CLIENT_CLIPPING_MODS.get(site_dp_mode({**dict(context.run_config), **overrides}))
        if clipping is None:
            return call_next(msg, context)
        # Flower's mods expect one ArrayRecord of named tensors and one ConfigRecord: unpack packed weights
        # (fedct.transport) first, so the handler replies per tensor and the update is clipped tensor by tensor;
        # then pack the clipped reply the way the server sent (with float16/bfloat16 transport the clipped update is
        # rounded to the wire dtype afterwards: its norm may exceed the clip by that rounding, ~1e-3 relative).
        transport = None
        if INDEX_RECORD in msg.content:
            transport = index_transport(str(msg.content[INDEX_RECORD]["index"]))
            msg.content = decode_content(msg.content)
        reply = clipping(msg, context, call_next)
        if transport is not None and not reply.has_error():
            reply.content = encode_content(reply.content, transport=transport)
        return reply

    return mod


def privacy_mods(run_config_overrides: Mapping[str, Any] | None = None) -> list[Mod]:
    """The site's privacy mods, outermost first: SecAgg+ (only acts on SecAgg+ messages), DP clipping."""
    return [secaggplus_when_requested, dp_clipping_mod(run_config_overrides)]
