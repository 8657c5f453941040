"""Federation overhead: per round, wall time against the slowest site's local training, and bytes moved.

Arms (each runs fedct's ServerApp logic, ``fl_server.server_app.run_federation``, and fedct's ClientApp on the
same sites and settings):

- ``simulation``: Flower's simulation engine in this process (Ray; ClientApps stay alive between messages);
- ``deployment-insecure``: a real local deployment (``bench.deployment.LocalDeployment``) — ``flower-superlink``
  (state in memory) and one ``flower-supernode`` per site on 127.0.0.1 with fedct's warm executor (as ``fedct site``
  runs them), the run submitted with ``flwr run``; every process started is stopped by PID at the end.

- ``deployment-tls-auth``: the same with TLS (the consortium PKI of ``fedct.certs``) and SuperNode
  authentication (each site's key registered with ``flwr supernode register``), as fedct deploys;
- ``simulation-fp16-transport``: the run config's ``transport = "float16"`` (weights halved on the wire);
- quick and full: ``deployment-tls-auth-fused``: TLS + auth with ``evaluate-mode = "fused"`` (the global model is
  evaluated inside the next train exchange, as ``configs/run.toml`` deploys: one exchange per round);
- full size only: ``deployment-insecure-sqlite-state`` (the SuperLink's state in an SQLite file instead of memory).

Bytes: the server's Grid is wrapped (:class:`CountingGrid`) so that every message sent and received is
serialised with Flower's own protobuf serde and its size counted — the payload on the wire before gRPC/HTTP
framing and TLS. Writes ``federation.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    SMALL_RUN_CONFIG,
    BenchOptions,
    TreeMemorySampler,
    median_after_first,
    site_names,
    synthetic_sites,
    write_result,
)
from fedct.protocol import OOD_STATISTICS

TRANSPORT_NAME = "transport.json"
PENDING_ARMS: dict[str, str] = {}

try:  # Flower is a dependency of fedct; the import is guarded only so this module's docs build without it
    from flwr.serverapp import Grid as _GridBase
except ImportError:  # pragma: no cover
    _GridBase = object  # type: ignore[assignment,misc]


def message_bytes(message: Any) -> int:
    """Size of a Flower message serialised with Flower's protobuf serde (what the transport carries, before framing)."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).ByteSize()


class CountingGrid(_GridBase):  # type: ignore[misc,valid-type]
    """A Flower Grid that forwards everything to ``inner`` and records, per exchange (a push and the pulls
    of its replies, or one ``send_and_receive``), the round, message type, bytes sent and received and its wall time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.exchanges: list[dict[str, Any]] = []

    def set_run(self, run: Any) -> None:  # noqa: D102 - Grid's
        self.inner.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:  # noqa: D102 - one exchange per push
        messages = list(messages)
        server_round, kind = self._describe(messages)
        ids = list(self.inner.push_messages(messages))
        self.exchanges.append(
            {
                "round": server_round,
                "type": kind,
                "messages": len(messages),
                "replies": 0,
                "bytes_sent": sum(message_bytes(m) for m in messages),
                "bytes_received": 0,
                "seconds": 0.0,
                "_ids": set(ids),
                "_t0": time.perf_counter(),
            }
        )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:  # noqa: D102 - replies added to their exchange
        replies = list(self.inner.pull_messages(message_ids))
        for reply in replies:
            for exchange in reversed(self.exchanges):
                if reply.metadata.reply_to_message_id in exchange.get("_ids", ()):
                    exchange["replies"] += 1
                    exchange["bytes_received"] += message_bytes(reply)
                    exchange["seconds"] = time.perf_counter() - exchange["_t0"]
                    break
        return replies

    @staticmethod
    def _describe(messages: list[Any]) -> tuple[int | None, str | None]:
        if not messages:
            return None, None
        config = messages[0].content.config_records.get("config")
        server_round = int(config["server-round"]) if config is not None and "server-round" in config else None
        kind = messages[0].metadata.message_type
        if config is not None and OOD_STATISTICS in config:  # the reference gathered after the last round
            kind = f"{kind}:{OOD_STATISTICS}"
        return server_round, kind

    def public_exchanges(self) -> list[dict[str, Any]]:
        """The exchanges without their bookkeeping fields (for JSON)."""
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.exchanges]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:  # noqa: D102
        messages = list(messages)
        sent = sum(message_bytes(m) for m in messages)
        server_round, kind = self._describe(messages)
        t0 = time.perf_counter()
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        seconds = time.perf_counter() - t0
        received = sum(message_bytes(r) for r in replies)
        self.exchanges.append(
            {
                "round": server_round,
                "type": kind,
                "messages": len(messages),
                "replies": len(replies),
                "bytes_sent": sent,
                "bytes_received": received,
                "seconds": seconds,
            }
        )
        return replies


def build_counting_server_app(run_config_overrides: Mapping[str, Any] | None = None) -> Any:
    """fedct's ServerApp with a :class:`CountingGrid`; writes ``RUN_DIR/transport.json`` (exchanges, model bytes) at the end."""
    from flwr.app import Context
    from flwr.serverapp import ServerApp

    from fl_server.config import ServerConfig
    from fl_server.server_app import run_federation
    from fl_server.strategy import build_strategy

    overrides = dict(run_config_overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        config = ServerConfig.from_run_config({**dict(context.run_config), **overrides})
        counting = CountingGrid(grid)
        try:
            run_federation(counting, config, build_strategy(config))
        finally:
            path = config.run_path / TRANSPORT_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"exchanges": counting.public_exchanges()}, indent=1))

    return app


#: Entry point for the deployment arm's app folder ([tool.flwr.app.components] serverapp).
counting_app = build_counting_server_app()


def model_bytes(model_name: str, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Size of the model's state dict: raw tensor bytes, tensors, and one ArrayRecord serialised by Flower."""
    import torch
    from flwr.app import ArrayRecord
    from flwr.common.serde import array_record_to_proto

    from fl_server.config import ServerConfig
    from models.factory import build_model

    config = ServerConfig.from_run_config({**run_config, "model-name": model_name})
    torch.manual_seed(0)
    state = build_model(config.model).state_dict()
    raw = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "model": model_name,
        "tensors": len(state),
        "raw_bytes": raw,
        "array_record_bytes": array_record_to_proto(ArrayRecord(state)).ByteSize(),
    }


@dataclass(frozen=True)
class FederationPlan:
    """Size of the federation measured."""

    sites: int
    patients_per_site: int
    small: bool
    rounds: int
    run_config: Mapping[str, Any]
    sqlite_lever: bool = False  # also run the deployment with the SuperLink's state in an SQLite file (before/after)


def plan_for(options: BenchOptions) -> FederationPlan:
    """Tiny/quick: small sites and the small CNN; full: 3 default sites, the default DenseNet121 at 64x64x48."""
    if options.tiny:
        return FederationPlan(sites=2, patients_per_site=6, small=True, rounds=1, run_config=SMALL_RUN_CONFIG)
    if options.quick:
        return FederationPlan(sites=3, patients_per_site=8, small=True, rounds=2, run_config=SMALL_RUN_CONFIG)
    return FederationPlan(sites=3, patients_per_site=12, small=False, rounds=4, run_config={}, sqlite_lever=True)


def _run_config(
    plan: FederationPlan, run_dir: Path, *, sites: int | None = None, transport: str = "float32"
) -> dict[str, Any]:
    return {
        **plan.run_config,
        "num-server-rounds": plan.rounds,
        "local-epochs": 1,
        "min-sites": sites or plan.sites,
        "run-dir": str(Path(run_dir).resolve()),
        "transport": transport,
    }


def round_report(run_dir: Path, *, exclude_last: bool = False) -> dict[str, Any]:
    """Per round: wall time, slowest site's training, overhead, bytes, from metrics.json and transport.json of a run.
    The medians leave out the first round (start-up) and, with ``exclude_last``, the last (with evaluate-mode=fused
    it also carries the final evaluate-only exchange)."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    transport_path = Path(run_dir) / TRANSPORT_NAME
    exchanges = json.loads(transport_path.read_text())["exchanges"] if transport_path.is_file() else []
    rounds = []
    for entry in metrics["rounds"]:
        r = entry["round"]
        train_sites = (entry.get("train") or {}).get("sites") or {}
        train_seconds = [m.get("train-seconds") for m in train_sites.values() if m.get("train-seconds") is not None]
        slowest = max(train_seconds) if train_seconds else None
        # a round's own exchanges: not the out-of-distribution reference gathered after the last round
        mine = [x for x in exchanges if x["round"] == r and not str(x["type"]).endswith(f":{OOD_STATISTICS}")]
        by_type = {x["type"]: x for x in mine}
        wall = entry["seconds"]
        train_exchange = by_type.get("train", {}).get("seconds")
        rounds.append(
            {
                "round": r,
                "wall_seconds": wall,
                "slowest_site_training_seconds": slowest,
                "overhead_seconds": wall - slowest if slowest is not None else None,
                "overhead_percent": 100.0 * (wall - slowest) / wall if slowest is not None and wall else None,
                "train_exchange_seconds": train_exchange,
                "train_exchange_overhead_seconds": train_exchange - slowest
                if train_exchange is not None and slowest is not None
                else None,
                "evaluate_exchange_seconds": by_type.get("evaluate", {}).get("seconds"),
                "bytes_sent": sum(x["bytes_sent"] for x in mine),
                "bytes_received": sum(x["bytes_received"] for x in mine),
                "server_reported_bytes_sent": entry.get("bytes_sent"),
                "server_reported_bytes_received": entry.get("bytes_received"),
                "skipped": bool(entry.get("skipped")),
            }
        )

    def med(key: str) -> float | None:
        kept = rounds[:-1] if exclude_last and len(rounds) > 2 else rounds
        return median_after_first([r[key] for r in kept if r[key] is not None])

    return {
        "rounds": rounds,
        "median_rounds_after_first": {
            k: med(k)
            for k in (
                "wall_seconds",
                "slowest_site_training_seconds",
                "overhead_seconds",
                "overhead_percent",
                "train_exchange_overhead_seconds",
                "bytes_sent",
                "bytes_received",
            )
        },
    }


def simulation_arm(
    plan: FederationPlan, data_root: Path, work_root: Path, run_dir: Path, *, transport: str = "float32"
) -> dict[str, Any]:
    """The run in Flower's simulation engine (in this process); peak memory of this process tree (Ray included).
    ``transport`` is the run config's wire dtype of floating weights (float32, float16, bfloat16)."""
    from flwr.simulation import run_simulation

    from fedct.demo import simulation_backend_config
    from fl_client.client_app import build_client_app

    shutil.rmtree(run_dir, ignore_errors=True)
    n = len(site_names(data_root))
    t0 = time.perf_counter()
    with TreeMemorySampler({"simulation": os.getpid()}, interval=0.2) as sampler:
        run_simulation(
            server_app=build_counting_server_app(_run_config(plan, run_dir, sites=n, transport=transport)),
            client_app=build_client_app({"sim-data-root": str(data_root), "sim-work-root": str(work_root)}),
            num_supernodes=n,
            backend_config=simulation_backend_config(),
        )
    if not (run_dir / "metrics.json").is_file():
        raise RuntimeError(f"the simulation wrote no {run_dir / 'metrics.json'} (see the log above)")
    return {
        **round_report(run_dir),
        "total_seconds": time.perf_counter() - t0,
        "sites": n,
        "transport": transport,
        "peak_memory_mib": sampler.peak_mib["simulation"],
    }


def _app_folder(target: Path) -> Path:
    """The Flower app folder of the deployment arm: fedct's pyproject with the counting ServerApp as serverapp."""
    root = Path(__file__).resolve().parents[1]
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    text = (root / "pyproject.toml").read_text()
    text = text.replace('serverapp = "fl_server.server_app:app"', 'serverapp = "bench.federation:counting_app"')
    text = re.sub(
        r"^fab-include = \[[^\]]*\]\n", "", text, flags=re.MULTILINE
    )  # the folder holds no code: the installed packages run
    if "bench.federation:counting_app" not in text:
        raise RuntimeError(f'{root / "pyproject.toml"} has no serverapp = "fl_server.server_app:app" line to replace')
    (target / "pyproject.toml").write_text(text)
    (target / "README.md").write_text("fedct federation benchmark app (code comes from the installed packages)\n")
    return target


def deployment_arm(
    plan: FederationPlan,
    data_root: Path,
    work_root: Path,
    run_dir: Path,
    *,
    tls: bool = False,
    auth: bool = False,
    sqlite_state: bool = False,
    runner: str = "warm",
    run_overrides: Mapping[str, Any] | None = None,
    timeout: float = 1200.0,
) -> dict[str, Any]:
    """A local deployment (``bench.deployment.LocalDeployment``): SuperLink + one SuperNode per site on 127.0.0.1,
    ``flwr run``; every process is stopped by PID. ``runner`` "warm": ClientApps in fedct's warm executor (what
    ``fedct site`` runs), "flower": Flower's SuperExec with a fresh process per message. The SuperLink keeps its
    state in memory, or in an SQLite file with ``sqlite_state``. Also the peak RSS of each site's process trees
    (SuperNode, executor, ClientApp processes)."""
    from bench.deployment import LocalDeployment, SiteSpec
    from fedct.deploy.commands import node_config_arg  # Flower's key=value text, as fedct site writes it
    from fedct.processes import process_alive

    if auth and not tls:
        raise ValueError("SuperNode authentication needs TLS (tls=True)")
    if runner not in ("warm", "flower"):
        raise ValueError(f"runner {runner!r} is not 'warm' or 'flower'")
    shutil.rmtree(run_dir, ignore_errors=True)
    base = Path(run_dir).parent / f"{Path(run_dir).name}-deploy"
    shutil.rmtree(base, ignore_errors=True)
    names = site_names(data_root)
    specs = [
        SiteSpec(
            node_config=node_config_arg(
                {
                    "site-name": name,
                    "dicom-dir": str(data_root / name / "dicom"),
                    "labels": str(data_root / name / "labels.csv"),
                    "site-dir": str(work_root / name),
                    "device": "cpu",
                }
            ),
            isolation="process" if runner == "warm" else "subprocess",
        )
        for name in names
    ]
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
        )
    }
    t0 = time.perf_counter()
    deployment = LocalDeployment(
        base, specs, database="file" if sqlite_state else "memory", tls=tls, auth=auth, env=env
    )
    with deployment:
        app = _app_folder(base / "app")
        config = {**_run_config(plan, run_dir, sites=len(names)), **dict(run_overrides or {})}
        overrides = node_config_arg(config)
        t_run = time.perf_counter()
        roots = {name: deployment.site_pids(i) for i, name in enumerate(names)} | {
            "superlink": [deployment.procs[0].pid]
        }
        with TreeMemorySampler(roots, interval=0.2) as sampler:
            done = deployment.flwr_run(app, overrides, timeout_s=timeout)
            deadline = time.monotonic() + 60  # --stream may return just before the ServerApp writes its last file
            while not (run_dir / TRANSPORT_NAME).is_file() and time.monotonic() < deadline:
                time.sleep(0.5)
        (base / "logs" / "flwr-run.log").write_text(done.stdout + done.stderr)
        if not (run_dir / "metrics.json").is_file():
            raise RuntimeError(
                f"the deployment run wrote no metrics.json (exit {done.returncode}); logs in {base / 'logs'}:\n"
                f"{(done.stdout + done.stderr)[-2000:]}"
            )
        run_seconds = time.perf_counter() - t_run
        started_pids = deployment.all_pids()
    left = [pid for pid in started_pids if process_alive(pid)]
    if left:
        raise RuntimeError(f"processes still running after stop: {left}")
    fused = dict(run_overrides or {}).get("evaluate-mode") == "fused"
    return {
        **round_report(run_dir, exclude_last=fused),
        "total_seconds": time.perf_counter() - t0,
        "run_seconds": run_seconds,
        "sites": len(names),
        "tls": tls,
        "supernode_auth": auth,
        "runner": runner,
        "run_overrides": dict(run_overrides or {}),
        "superlink_state": "sqlite file" if sqlite_state else "in memory",
        "stopped_pids": started_pids,
        "peak_rss_mib": {name: sampler.peak_mib[name] for name in [*names, "superlink"]},
    }


def run(options: BenchOptions) -> Path:
    """Run the simulation and the local deployment and write ``federation.json``; returns its path."""
    from fl_server.config import ServerConfig
    from preprocessing.ingest import prepare_site

    started = time.perf_counter()
    plan = plan_for(options)
    out = Path(options.out)
    work = out / "work" / "federation"
    data_root = synthetic_sites(
        work / "data", sites=plan.sites, patients_per_site=plan.patients_per_site, seed=0, small=plan.small
    )
    work_root = work / "sites"
    config = ServerConfig.from_run_config(_run_config(plan, work / "runs" / "x"))
    settings = config.round_settings(1)
    for name in site_names(data_root):  # ingested once beforehand: the rounds measure the federation, not ingestion
        prepare_site(
            data_root / name / "dicom",
            work_root / name,
            labels_csv=data_root / name / "labels.csv",
            pipeline=config.pipeline,
            split=settings.split,
        )
    arms: dict[str, Any] = {}
    errors: dict[str, str] = {}
    todo = [
        ("simulation", simulation_arm),
        ("simulation-fp16-transport", lambda *a: simulation_arm(*a, transport="float16")),
        ("deployment-insecure", deployment_arm),
        ("deployment-tls-auth", lambda *a: deployment_arm(*a, tls=True, auth=True)),
    ]
    if not options.tiny:  # what configs/run.toml deploys: evaluation inside the train exchange (one exchange per round)
        todo.append(
            (
                "deployment-tls-auth-fused",
                lambda *a: deployment_arm(
                    *a,
                    tls=True,
                    auth=True,
                    run_overrides={"evaluate-mode": "fused", "num-server-rounds": plan.rounds + 1},
                ),
            )
        )
    if plan.sqlite_lever:
        todo.append(("deployment-insecure-sqlite-state", lambda *a: deployment_arm(*a, sqlite_state=True)))
    for name, function in todo:
        try:
            arms[name] = function(plan, data_root, work_root, work / "runs" / name)
        except Exception as exc:  # noqa: BLE001 - one failing arm is reported, the other still measured
            errors[name] = f"{type(exc).__name__}: {exc}"
    sizes = model_bytes(config.model_name, plan.run_config)
    for arm in arms.values():
        med = arm["median_rounds_after_first"]
        arm["bytes_per_round_over_model_size"] = (
            (med["bytes_sent"] + med["bytes_received"]) / sizes["raw_bytes"] if med["bytes_sent"] is not None else None
        )
    payload = {
        "what": "per round: wall time (metrics.json 'seconds', end of round to end of round, train + evaluate exchanges + "
        "server work) against the slowest site's local training ('train-seconds' reported by the site); overhead = wall - "
        "slowest training. Bytes = Flower messages serialised with Flower's protobuf serde (payload before gRPC/HTTP "
        "framing and TLS), counted at the server's Grid; a round moves the model to every site twice (train, evaluate) "
        "and back once, or once each way with evaluate-mode=fused (its first round evaluates nothing, the last exchange "
        "only evaluates). Medians over rounds after the first (the first pays start-up).",
        "plan": {
            "sites": plan.sites,
            "patients_per_site": plan.patients_per_site,
            "rounds": plan.rounds,
            "local_epochs": 1,
            "model": config.model_name,
            "input_size": config.input_size,
        },
        "model_size": sizes,
        "arms": arms,
        "errors": errors,
        "arms_not_run": PENDING_ARMS,
    }
    return write_result(out, "federation", payload, options=options, started=started)
