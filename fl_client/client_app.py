"""Flower ClientApp of a site: converts messages to plain Python, calls ``fl_client.train``, and back.

Only weights and aggregate metrics leave the site: the reply carries the model's arrays, a MetricRecord
of numbers and the site's configured name (chosen by hospital IT, e.g. ``site-a``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fl_client.config import EVALUATION_RECORD, RoundSettings, SiteConfig
from fl_client.privacy import privacy_mods
from fl_client.secagg import is_legacy_fit, legacy_fit_reply
from fl_client.transport import INDEX_RECORD, received_state, weights_records
from fl_client.train import evaluate_round, train_round

log = logging.getLogger("fedct.client")


def evaluation_metrics(site: SiteConfig, settings: RoundSettings, state: Mapping[str, Any]) -> dict[str, Any]:
    """What a site reports about received global weights: :func:`fl_client.train.evaluate_round`'s metrics plus
    ``num-examples`` (validation studies, the aggregation weight). Sent in the evaluate reply's MetricRecord, or, with
    ``evaluate-first``, in the training reply's ConfigRecord ``evaluate``."""
    metrics = evaluate_round(site, settings, state)
    metrics["num-examples"] = int(metrics["val-n"])
    return metrics


def build_client_app(run_config_overrides: Mapping[str, Any] | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The site's ClientApp; ``run_config_overrides`` stand in for the run config where Flower passes none
    (in-process simulation); ``mods`` are Flower client mods wrapped around the handlers."""
    overrides = dict(run_config_overrides or {})
    app = ClientApp(mods=[*privacy_mods(overrides), *mods])  # privacy mods act only when the run config asks

    def _site(context: Context) -> SiteConfig:
        return SiteConfig.from_context(dict(context.node_config), {**dict(context.run_config), **overrides})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _site(context)
        if is_legacy_fit(msg):  # SecAgg+ (secure-aggregation=true): legacy fit message inside Flower's secaggplus_mod
            return legacy_fit_reply(msg, site)
        settings = RoundSettings.from_record(dict(msg.content["config"]))
        packed = INDEX_RECORD in msg.content  # reply the way the server sent: packed buffers or per-tensor arrays
        received = received_state(msg.content)
        # evaluate-mode=fused: the previous round's global model (the weights received) is evaluated here, before
        # training, instead of in a separate evaluate exchange (README "Configuring a run")
        evaluation = None
        if settings.evaluate_first:  # the evaluate handler's evaluation, under the round the weights came from
            evaluation = evaluation_metrics(site, replace(settings, server_round=settings.server_round - 1, evaluate_first=False),
                                            received)  # fmt: skip
        state, result = train_round(site, settings, received)
        log.info("%s round %d: trained on %d studies, loss %.4f, %.1fs", site.site_name, settings.server_round,
                 result.num_examples, result.loss, result.seconds)  # fmt: skip
        metrics = MetricRecord({
            "train-loss": result.loss,
            "train-loss-diagnosis": result.diagnosis_loss,
            "train-loss-prognosis": result.prognosis_loss,
            "train-seconds": result.seconds,
            "num-examples": result.num_examples,
        })  # fmt: skip
        content = weights_records(state, transport=settings.transport if packed else None)
        content["metrics"] = metrics
        content["site"] = ConfigRecord({"name": site.site_name})
        if evaluation is not None:  # a ConfigRecord: the reply keeps one MetricRecord for the strategy's aggregation
            content[EVALUATION_RECORD] = ConfigRecord(evaluation)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _site(context)
        settings = RoundSettings.from_record(dict(msg.content["config"]))
        metrics = evaluation_metrics(site, settings, received_state(msg.content))
        content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.site_name})})
        return Message(content=content, reply_to=msg)

    return app


#: Entry point named in pyproject.toml ([tool.flwr.app.components] clientapp).
app = build_client_app()
