"""Flower ClientApp of a site: converts messages to plain Python, calls ``fl_client.train``, and back.

Only weights and aggregate metrics leave the site: the reply carries the model's arrays, a MetricRecord
of numbers and the site's configured name (chosen by hospital IT, e.g. ``site-a``).

Errors leave the site only as reason codes (:func:`reason_code_mod`, the outermost mod): Flower sends
``str(type(exception)) + str(exception)`` of a failing ClientApp to the server, and an exception's text may hold a
DICOM path named after a patient (and in simulation Ray adds the traceback). The full error stays in the site's log
(and ``<site-dir>/errors.log``); the server gets an error reply whose whole reason is ``<code> incident=<random id>``
with a code from :data:`REASON_CODES`.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedct.protocol import (
    CALIBRATION_TEMPERATURE,
    CHAMPION_FILE_RECORD,
    CHAMPION_RECORD,
    CONFIG_RECORD,
    EVALUATION_RECORD,
    INDEX_RECORD,
    METRICS_RECORD,
    NUM_EXAMPLES,
    OOD_DISTANCES,
    OOD_MOMENTS,
    OOD_STATISTICS,
    PROFILE_STATISTICS,
    SITE_NAME_FIELD,
    SITE_RECORD,
    TEST_PREFIX,
    TRAIN_LOSS,
    TRAIN_LOSS_DIAGNOSIS,
    TRAIN_LOSS_PROGNOSIS,
    TRAIN_SECONDS,
    VAL_PREFIX,
    RoundSettings,
)
from fedct.transport import received_state, weights_records
from fl_client.campaign import campaign_counts
from fl_client.champion import champion_summary, store_champion
from fl_client.config import SiteConfig, SiteConfigError
from fl_client.metrics import MIN_COUNT, floor_calibration, floor_evaluation, floor_training
from fl_client.ood_stats import BadOodRequest, distance_metrics, moments_metrics
from fl_client.privacy import privacy_mods
from fl_client.profile_stats import statistics_metrics
from fl_client.secagg import is_legacy_fit, legacy_fit_reply
from fl_client.train import calibration_round, evaluate_round, train_round

log = logging.getLogger("fedct.client")

#: What a failing site tells the server: the only text of an error reply (README "Privacy: what leaves a site").
REASON_CODES = {
    "site_limit_exceeded": "a site-side bound was exceeded (the site's own limits, e.g. FEDCT_MAX_*)",
    "no_training_data": "the site has no usable training studies for this round",
    "ingest_failed": "reading or preprocessing the site's DICOM data failed",
    "bad_round_config": "the round settings sent by the server are invalid",
    "site_config_invalid": "the site's own settings (node config) are invalid",
    "bad_weights": "the weights sent by the server cannot be decoded or do not fit the model",
    "out_of_memory": "the site ran out of memory (RAM or GPU)",
    "protocol_error": "a Flower mod (SecAgg+, DP clipping) answered with an error",
    "internal_error": "anything else (details only in the site's log)",
}
_CODE = re.compile(r"[a-z_]{1,40}")
#: The whole reason text of an error reply that leaves the site.
_REASON = re.compile(r"[a-z_]{1,40} incident=[0-9a-f]{8}")
#: Innermost fedct module of the failing code -> reason code (first match wins).
_MODULE_CODES = (
    ("preprocessing.", "ingest_failed"),
    ("fedct.transport", "bad_weights"),
    ("models.", "bad_weights"),
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def reason_code(exc: BaseException) -> str:
    """The reason code of an exception (never its text): an explicit ``code`` attribute (``[a-z_]+``) anywhere in
    its cause chain, else by type (memory), else by the fedct module that raised it, else ``internal_error``."""
    chain = _chain(exc)
    for item in chain:
        code = getattr(item, "code", None)
        if isinstance(code, str) and _CODE.fullmatch(code):
            return code
    for item in chain:
        if isinstance(item, MemoryError) or type(item).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            return "out_of_memory"
        if isinstance(item, SiteConfigError):
            return "site_config_invalid"
    modules = [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(chain[-1].__traceback__)]
    for name in reversed(modules):  # innermost frame first
        if name == "fedct.protocol":  # RoundSettings.from_record: the server's round config
            return "bad_round_config"
        for prefix, code in _MODULE_CODES:
            if name.startswith(prefix):
                return code
    return "internal_error"


def _site_dir(context: Context, overrides: Mapping[str, Any]) -> Path | None:
    """The site's work folder for ``errors.log``, if the settings name one (never raises)."""
    try:
        return SiteConfig.from_context(dict(context.node_config), {**dict(context.run_config), **overrides}).site_dir
    except Exception:  # noqa: BLE001 - the failure being reported may be this very one
        return None


def _record_locally(site_dir: Path | None, incident: str, code: str, msg: Message, detail: str) -> None:
    """Full error text to the site's log and, when the site folder is known, to ``<site-dir>/errors.log``."""
    kind = msg.metadata.message_type
    log.error(
        "ClientApp %s message failed: %s incident=%s (this text stays at the site)\n%s", kind, code, incident, detail
    )
    if site_dir is None:
        return
    try:
        site_dir.mkdir(parents=True, exist_ok=True)
        with open(site_dir / "errors.log", "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {kind} {code} incident={incident}\n{detail.rstrip()}\n\n")
    except OSError as exc:
        log.error("cannot append to %s: %s", site_dir / "errors.log", exc)


def reason_code_mod(run_config_overrides: Mapping[str, Any] | None = None) -> Mod:
    """Outermost client mod: any exception (and any error reply of an inner mod) reaches Flower only as a reason code.

    Flower would turn a raised exception into the error reason ``<class ...>:<'str(exception)'>`` (plus, in
    simulation, Ray's traceback). This mod logs the full exception at the site and *returns* an error reply
    (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) whose reason is only ``<code> incident=<8 hex digits>``; nothing
    raised passes it, so Flower adds nothing.
    """
    overrides = dict(run_config_overrides or {})

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            reply = call_next(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, as a code
            code, incident = reason_code(exc), secrets.token_hex(4)
            _record_locally(_site_dir(context, overrides), incident, code, msg, traceback.format_exc())
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{code} incident={incident}"), reply_to=msg
            )
        if reply.has_error() and not _REASON.fullmatch(reply.error.reason or ""):
            incident = secrets.token_hex(4)
            _record_locally(
                _site_dir(context, overrides),
                incident,
                "protocol_error",
                msg,
                f"error reply {reply.error.code}: {reply.error.reason}",
            )
            return Message(Error(code=reply.error.code, reason=f"protocol_error incident={incident}"), reply_to=msg)
        return reply

    return mod


def metrics_min_count(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> int:
    """The privacy floor k of this site: the larger of the run's ``metrics-min-count``, the site's own
    (node config ``metrics-min-count``, from ``FEDCT_METRICS_MIN_COUNT``) and :data:`fl_client.metrics.MIN_COUNT`.
    The server can raise it, the site can raise it, nobody can lower it. ValueError naming a bad setting."""
    values = [MIN_COUNT]
    for source, config in (("run config", run_config), ("node config", node_config)):
        value = config.get("metrics-min-count")
        if value is None:
            continue
        try:
            number = int(str(value))
        except ValueError:
            number = 0
        if number < 1:
            raise SiteConfigError(f"{source} metrics-min-count={value!r} is not a positive whole number")
        values.append(number)
    return max(values)


def evaluation_metrics(
    site: SiteConfig, settings: RoundSettings, state: Mapping[str, Any], *, min_count: int = MIN_COUNT
) -> dict[str, Any]:
    """What a site reports about received global weights: :func:`fl_client.train.evaluate_round`'s metrics plus
    ``num-examples`` (validation studies, the aggregation weight), after the privacy floor
    (:func:`fl_client.metrics.floor_evaluation`). Sent in the evaluate reply's MetricRecord, or, with
    ``evaluate-first``, in the training reply's ConfigRecord ``evaluate``."""
    metrics = evaluate_round(site, settings, state)
    metrics[NUM_EXAMPLES] = int(metrics[f"{VAL_PREFIX}n"])
    return floor_evaluation(metrics, min_count=min_count)


class BadCalibrationRequest(ValueError):
    """The server's calibration temperature is not a positive finite number (reason code ``bad_round_config``)."""

    code = "bad_round_config"


def calibration_metrics(
    site: SiteConfig,
    settings: RoundSettings,
    state: Mapping[str, Any],
    *,
    temperature: float,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """What a site reports when the server asks for calibration statistics (an evaluate message whose config has
    ``calibration-temperature``): :func:`fl_client.train.calibration_round`'s reliability bins before/after and the
    calibrated test scalars, ``num-examples`` = labelled test studies, after the privacy floor
    (:func:`fl_client.metrics.floor_calibration`)."""
    metrics = calibration_round(site, settings, state, temperature=temperature)
    metrics[NUM_EXAMPLES] = int(metrics[f"{TEST_PREFIX}n"])
    return floor_calibration(metrics, min_count=min_count)


def build_client_app(
    run_config_overrides: Mapping[str, Any] | None = None, *, mods: Sequence[Mod] = (), outer_mods: Sequence[Mod] = ()
) -> ClientApp:
    """The site's ClientApp; ``run_config_overrides`` stand in for the run config where Flower passes none
    (in-process simulation); ``mods`` are Flower client mods wrapped around the handlers (inside the privacy mods),
    ``outer_mods`` around the privacy mods (they see what SecAgg+ actually sends; tests record it there)."""
    overrides = dict(run_config_overrides or {})
    # reason codes outermost (covers the privacy mods too); privacy mods act only when the run config asks
    app = ClientApp(mods=[reason_code_mod(overrides), *outer_mods, *privacy_mods(overrides), *mods])

    def _site(context: Context) -> SiteConfig:
        return SiteConfig.from_context(dict(context.node_config), {**dict(context.run_config), **overrides})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _site(context)
        k = metrics_min_count(context.node_config, {**dict(context.run_config), **overrides})
        if is_legacy_fit(msg):  # SecAgg+ (secure-aggregation=true): legacy fit message inside Flower's secaggplus_mod
            return legacy_fit_reply(msg, site, min_count=k)
        settings = RoundSettings.from_record(dict(msg.content[CONFIG_RECORD]))
        packed = INDEX_RECORD in msg.content  # reply the way the server sent: packed buffers or per-tensor arrays
        received = received_state(msg.content)
        # evaluate-mode=fused: the previous round's global model (the weights received) is evaluated here, before
        # training, instead of in a separate evaluate exchange (README "Configuring a run")
        evaluation = None
        if settings.evaluate_first:  # the evaluate handler's evaluation, under the round the weights came from
            evaluation = evaluation_metrics(
                site,
                replace(settings, server_round=settings.server_round - 1, evaluate_first=False),
                received,
                min_count=k,
            )
        state, result = train_round(site, settings, received)
        counts = campaign_counts(site, settings, str(context.run_id))  # new studies, feedback labels (aggregate)
        log.info(
            "%s round %d: trained on %d studies, loss %.4f, %.1fs",
            site.site_name,
            settings.server_round,
            result.num_examples,
            result.loss,
            result.seconds,
        )
        metrics = MetricRecord(
            floor_training(
                {
                    TRAIN_LOSS: result.loss,
                    TRAIN_LOSS_DIAGNOSIS: result.diagnosis_loss,
                    TRAIN_LOSS_PROGNOSIS: result.prognosis_loss,
                    TRAIN_SECONDS: result.seconds,
                    NUM_EXAMPLES: result.num_examples,
                    **counts,
                },
                min_count=k,
            )
        )
        content = weights_records(state, transport=settings.transport if packed else None)
        content[METRICS_RECORD] = metrics
        content[SITE_RECORD] = ConfigRecord({SITE_NAME_FIELD: site.site_name})
        if evaluation is not None:  # a ConfigRecord: the reply keeps one MetricRecord for the strategy's aggregation
            content[EVALUATION_RECORD] = ConfigRecord(evaluation)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _site(context)
        k = metrics_min_count(context.node_config, {**dict(context.run_config), **overrides})
        config = msg.content[CONFIG_RECORD]
        if bool(config.get(PROFILE_STATISTICS, False)):  # before round 1: aggregate profile statistics only (#24)
            metrics = statistics_metrics(site, dict(config), min_count=k)
            return Message(
                RecordDict(
                    {
                        METRICS_RECORD: MetricRecord(metrics),
                        SITE_RECORD: ConfigRecord({SITE_NAME_FIELD: site.site_name}),
                    }
                ),
                reply_to=msg,
            )
        settings = RoundSettings.from_record(dict(config))
        if OOD_STATISTICS in config:  # after the run: feature moments or distance histograms of these weights (#23.4)
            kind = config[OOD_STATISTICS]
            if kind == OOD_MOMENTS:
                metrics = moments_metrics(site, settings, received_state(msg.content), min_count=k)
            elif kind == OOD_DISTANCES:
                metrics = distance_metrics(site, settings, received_state(msg.content), dict(config), min_count=k)
            else:
                raise BadOodRequest(f"{OOD_STATISTICS} must be {OOD_MOMENTS!r} or {OOD_DISTANCES!r}, got {kind!r}")
        elif CALIBRATION_TEMPERATURE in config:  # after the run: calibration statistics of these weights
            temperature = config[CALIBRATION_TEMPERATURE]
            if (
                isinstance(temperature, bool)
                or not isinstance(temperature, int | float)
                or not 0 < temperature < math.inf
            ):
                raise BadCalibrationRequest(
                    f"calibration-temperature must be a positive finite number, got {temperature!r}"
                )
            metrics = calibration_metrics(
                site, settings, received_state(msg.content), temperature=float(temperature), min_count=k
            )
        else:
            metrics = evaluation_metrics(site, settings, received_state(msg.content), min_count=k)
        content = RecordDict(
            {METRICS_RECORD: MetricRecord(metrics), SITE_RECORD: ConfigRecord({SITE_NAME_FIELD: site.site_name})}
        )
        return Message(content=content, reply_to=msg)

    @app.query("champion")
    def champion(msg: Message, context: Context) -> Message:
        """The registry's champion sent by the coordinator: verified and stored under ``SITE_DIR/models``."""
        site = _site(context)
        record = msg.content[CHAMPION_RECORD]
        files = {
            "model.pt": msg.content[CHAMPION_FILE_RECORD]["model.pt"].numpy().tobytes(),
            "model.json": str(record["model.json"]).encode(),
            "registry.json": str(record["registry.json"]).encode(),
        }
        folder = store_champion(
            site.site_dir, version=str(record["version"]), content_sha256=str(record["content-sha256"]), files=files
        )
        log.info("%s: stored the consortium's champion %s in %s", site.site_name, folder.name, folder)
        content = RecordDict(
            {
                SITE_RECORD: ConfigRecord({SITE_NAME_FIELD: site.site_name}),
                CHAMPION_RECORD: ConfigRecord(champion_summary(folder)),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


#: Entry point named in pyproject.toml ([tool.flwr.app.components] clientapp).
app = build_client_app()
