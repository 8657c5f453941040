"""Per-round overhead of Flower 1.41's deployment engine for fedct's default model, one lever at a time.

Each configuration starts a real insecure SuperLink and N SuperNodes on 127.0.0.1 (bench/deployment.py),
submits the benchmark app (bench/app: fedct's DenseNet121-3D, 45 MB in 729 tensors, a fixed 2 s of fake
training per site, a train and an evaluate exchange per round like FedAvg) with ``flwr run``, and records
per round: wall time, the slowest site's compute time and their difference, the overhead; and the CPU
seconds that all processes of the deployment (SuperLink, ServerApp, SuperNodes, executors, ClientApps)
used in the round, which, unlike wall time, does not grow when other jobs share the machine. The figures
per configuration are medians of rounds 2..N (round 1 pays start-up costs).

Levers (``--configs`` picks some; the default runs the ladder, each step adding one lever):

- SuperLink state database: SQLite file on disk, SQLite file on tmpfs (/dev/shm), ``:memory:``;
- message layout: one array per tensor, or one buffer per dtype + index (``packed``);
- Flower SuperExec's task poll interval (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, default 1 s);
- ClientApp process: Flower's SuperExec (fresh ``flwr-clientapp`` per message) or fedct's warm executor;
- ServerApp reply poll: Flower's ``send_and_receive`` (3 s) or an own push/pull loop polling every 0.1 s;
- then the best configuration with 10 SuperNodes;
- beyond (``F*``): TLS + SuperNode auth, Flower's Python in-memory state, evaluation folded into the train
  exchange, fp16 transport, and that with 10 SuperNodes.

Idle cost of task polling (``I0``..``I4``): CPU per second of one idle SuperNode and its launcher.

    python bench/levers.py --out bench/results/levers.json [--rounds 5] [--configs L0,L5,T4,I0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deployment import LocalDeployment, SiteSpec, tree_cpu_seconds  # noqa: E402

APP = Path(__file__).resolve().parent / "app"


@dataclass(frozen=True)
class Config:
    """One benchmark configuration."""

    name: str
    database: str = "file"
    layout: str = "tensors"
    superexec_poll_s: float | None = None
    isolation: str = "subprocess"
    reply_poll_s: float = 3.0
    evaluate: bool = True  # False: evaluation folded into the train exchange (one exchange per round)
    tls: bool = False  # TLS + SuperNode authentication
    #: What-if for a proposed upstream change: the SuperNodes run a *copy* of Flower whose pull sleep (3 s) and
    #: reply wait (0.5 s) are this many seconds (:func:`flower_whatif_copy`; the installed Flower is not touched)
    whatif_supernode_wait_s: float | None = None
    #: Flower's array chunk size in bytes (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, default 5 MiB), set for every process;
    #: each chunk is one object: one request, one SHA-256 id and one stored row per hop
    chunk_bytes: int | None = None
    sites: int = 3
    rounds: int = 5


BASELINE = Config(
    "baseline: SQLite file, 729 arrays, SuperExec poll 1 s, fresh ClientApp process, reply poll 3 s", rounds=3
)
LADDER = [
    BASELINE,
    replace(BASELINE, name="+ SuperLink database on tmpfs", database="tmpfs", rounds=4),
    replace(BASELINE, name="+ packed layout (2 arrays)", database="tmpfs", layout="packed"),
    replace(BASELINE, name="+ SuperExec poll 0.2 s", database="tmpfs", layout="packed", superexec_poll_s=0.2),
    replace(
        BASELINE, name="+ warm executor (instead of SuperExec)", database="tmpfs", layout="packed", isolation="process"
    ),
    replace(
        BASELINE,
        name="+ ServerApp reply poll 0.1 s",
        database="tmpfs",
        layout="packed",
        isolation="process",
        reply_poll_s=0.1,
    ),
]
BEST = LADDER[-1]
TOGGLES = [
    replace(BEST, name="best, but SQLite file on disk", database="file"),
    replace(BEST, name="best, but :memory: database", database=":memory:"),
    replace(BEST, name="best, but 729 arrays", layout="tensors"),
    replace(
        BEST,
        name="best, but fresh ClientApp process (SuperExec poll 0.2 s)",
        isolation="subprocess",
        superexec_poll_s=0.2,
    ),
    replace(BEST, name="best, 10 SuperNodes", sites=10),
    replace(BEST, name="best, Flower's in-memory state (:flwr-in-memory:)", database="memory"),
]
#: Beyond the ladder (``F*``): what is left once fedct's levers are in, toward the issue's final figure (TLS + auth).
FURTHER = [
    replace(BEST, name="best + TLS + SuperNode auth", tls=True),
    replace(BEST, name="best + TLS + auth + Flower's in-memory state", tls=True, database="memory"),
    replace(
        BEST,
        name="best + TLS + auth + in-memory state + evaluation folded into train",
        tls=True,
        database="memory",
        evaluate=False,
    ),
    replace(
        BEST,
        name="best + TLS + auth + in-memory state + folded evaluation + fp16 transport",
        tls=True,
        database="memory",
        evaluate=False,
        layout="packed16",
    ),
    replace(
        BEST,
        name="best + TLS + auth + in-memory state + folded evaluation, 10 SuperNodes",
        tls=True,
        database="memory",
        evaluate=False,
        sites=10,
    ),
    replace(
        BEST,
        name="F2 + 64 MiB array chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)",
        tls=True,
        database="memory",
        evaluate=False,
        chunk_bytes=64 << 20,
    ),
    replace(
        BEST,
        name="F3 (fp16) + 64 MiB array chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)",
        tls=True,
        database="memory",
        evaluate=False,
        layout="packed16",
        chunk_bytes=64 << 20,
    ),
]
#: What-if arms (``W*``): the F2/F3 configurations with the SuperNode's fixed waits shortened in a patched copy of
#: Flower (proposed upstream change 1 + 2 in docs/flower-overhead.md). Not something fedct ships.
WHATIF = [
    replace(
        FURTHER[2],
        name="what-if: F2 + SuperNode pull sleep and reply wait 0.1 s (patched copy of Flower)",
        whatif_supernode_wait_s=0.1,
    ),
    replace(
        FURTHER[3],
        name="what-if: F3 (fp16) + SuperNode pull sleep and reply wait 0.1 s (patched copy of Flower)",
        whatif_supernode_wait_s=0.1,
    ),
]
CONFIGS = (
    {f"L{i}": c for i, c in enumerate(LADDER)}
    | {f"T{i}": c for i, c in enumerate(TOGGLES)}
    | {f"F{i}": c for i, c in enumerate(FURTHER)}
    | {f"W{i}": c for i, c in enumerate(WHATIF)}
)


#: (file under flwr/, exact text, replacement) — the SuperNode's fixed waits in Flower 1.41, made settable.
WHATIF_PATCHES = (
    (
        "supernode/start_client_internal.py",
        "                time.sleep(3)\n",
        "                time.sleep(float(os.environ.get('FLWR_WHATIF_SUPERNODE_WAIT_S', '3')))\n",
    ),
    (
        "supernode/start_client_internal.py",
        "        time.sleep(0.5)\n\n    for message in reply_messages:",
        "        time.sleep(float(os.environ.get('FLWR_WHATIF_SUPERNODE_WAIT_S', '0.5')))\n\n    for message in reply_messages:",
    ),
)


def flower_whatif_copy(dest: Path) -> Path:
    """A copy of the installed ``flwr`` package under ``dest`` with the SuperNode's fixed waits read from
    ``FLWR_WHATIF_SUPERNODE_WAIT_S``; returns the folder to put first on ``PYTHONPATH``. Measures a proposed
    upstream change; the installed Flower is never modified."""
    import shutil

    import flwr

    source = Path(flwr.__file__).resolve().parent
    target = dest / "flwr"
    if not target.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for relative, old, new in WHATIF_PATCHES:
        path = target / relative
        text = path.read_text()
        if text.count(old) != 1 and text.count(new) != 1:
            raise RuntimeError(f"{source / relative}: the text to patch is not there exactly once; Flower changed")
        if "import os\n" not in text:
            text = "import os\n" + text
        path.write_text(text.replace(old, new))
    return dest


@dataclass(frozen=True)
class IdleConfig:
    """CPU that one idle SuperNode and its task launcher burn polling for tasks (no run submitted)."""

    name: str
    isolation: str
    poll_s: float
    seconds: float = 30.0


IDLE = {
    "I0": IdleConfig("idle: SuperExec, poll 1 s (Flower default)", "subprocess", 1.0),
    "I1": IdleConfig("idle: SuperExec, poll 0.05 s", "subprocess", 0.05),
    "I2": IdleConfig("idle: warm executor, poll 0.05 s", "process", 0.05),
    "I3": IdleConfig("idle: warm executor, poll 0.2 s", "process", 0.2),
    "I4": IdleConfig("idle: warm executor, poll 0.5 s", "process", 0.5),
}


def measure_idle(config: IdleConfig, work: Path) -> dict:
    """CPU seconds per second of one idle SuperNode + its launcher (executor without preloading)."""
    spec = SiteSpec(
        node_config='site-name="s0"',
        isolation=config.isolation,
        preload_app="",
        superexec_poll_s=config.poll_s if config.isolation == "subprocess" else None,
        executor_poll_s=config.poll_s,
    )
    with LocalDeployment(work, [spec]) as deployment:
        roots = {p.pid for p in deployment.procs[1:]}  # SuperNode (+ its SuperExec) and executor, not the SuperLink
        time.sleep(15.0)  # let the launcher finish starting
        cpu0, t0 = tree_cpu_seconds(roots), time.perf_counter()
        time.sleep(config.seconds)
        cpu, wall = tree_cpu_seconds(roots) - cpu0, time.perf_counter() - t0
    return {
        "config": asdict(config),
        "cpu_s_per_s": round(cpu / wall, 4),
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 1),
        "loadavg_after": os.getloadavg(),
    }


def measure(config: Config, work: Path) -> dict:
    """Run one configuration and return its rounds and median overhead."""
    specs = [
        SiteSpec(
            node_config=f'site-name="s{i}"',
            isolation=config.isolation,
            superexec_poll_s=config.superexec_poll_s,
            executor_poll_s=0.2,
        )
        for i in range(config.sites)
    ]
    out = work / "result.json"
    run_config = (
        f'num-server-rounds={config.rounds} min-nodes={config.sites} layout="{config.layout}" '
        f"reply-poll-s={config.reply_poll_s} train-seconds=2.0 evaluate={str(config.evaluate).lower()} "
        f'out="{out}"'
    )
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    env: dict[str, str] = {}
    if config.whatif_supernode_wait_s is not None:
        overlay = flower_whatif_copy(work / "flower-whatif")
        env = {
            "PYTHONPATH": os.pathsep.join([str(overlay), *filter(None, [os.environ.get("PYTHONPATH", "")])]),
            "FLWR_WHATIF_SUPERNODE_WAIT_S": str(config.whatif_supernode_wait_s),
        }
    if config.chunk_bytes is not None:
        env["FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"] = str(config.chunk_bytes)
    with LocalDeployment(work, specs, database=config.database, tls=config.tls, env=env) as deployment:
        started = time.perf_counter() - t0
        pids = ",".join(str(p.pid) for p in deployment.procs)
        done = deployment.flwr_run(APP, f'{run_config} watch-pids="{pids}"', timeout_s=3000)
    entry: dict = {
        "config": asdict(config),
        "startup_s": round(started, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    if done.returncode != 0 or not out.is_file():
        errors = sorted(
            {
                line.strip()[:300]
                for log in (work / "logs").glob("*.log")
                for line in log.read_text(errors="replace").splitlines()
                if "ERROR" in line or "Error:" in line
            }
        )
        return {
            **entry,
            "failed": True,
            "returncode": done.returncode,
            "errors": errors[:20],
            "output_tail": (done.stdout + done.stderr)[-2000:],
        }
    result = json.loads(out.read_text())
    later = [r["overhead_s"] for r in result["rounds"][1:]] or [result["rounds"][0]["overhead_s"]]
    cpu = [r["deployment_cpu_s"] for r in result["rounds"][1:]] or [result["rounds"][0]["deployment_cpu_s"]]
    per_round_bytes = result["rounds"][-1]["bytes_sent"] + result["rounds"][-1]["bytes_received"]
    return {
        **entry,
        **result,
        "median_overhead_s": round(statistics.median(later), 2),
        "median_deployment_cpu_s": round(statistics.median(cpu), 2),
        "bytes_per_round": per_round_bytes,
    }


def markdown(report: dict) -> str:
    """The results of a report as markdown tables (what docs/flower-overhead.md shows)."""
    lines = [
        "| key | configuration | sites | rounds | median overhead (s, wall) | median deployment CPU (CPU-s/round) | bytes/round | load avg (1 min, before → after) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report.get("results", []):
        c = e["config"]
        if e.get("failed"):
            cells = ["failed", "failed", "", ""]
        else:
            cells = [
                f"{e['median_overhead_s']:.1f}",
                f"{e['median_deployment_cpu_s']:.1f}",
                f"{e['bytes_per_round'] / 1e6:.0f} MB",
                "",
            ]
        load = f"{e['loadavg_before'][0]:.0f} → {e['loadavg_after'][0]:.0f}"
        note = f" ({e['note']})" if e.get("note") else ""
        lines.append(
            f"| {e['key']} | {c['name']}{note} | {c['sites']} | {c['rounds']} | {cells[0]} | {cells[1]} | {cells[2]} | {load} |"
        )
    lines += ["", "| key | launcher | poll (s) | CPU-s per s |", "|---|---|---|---|"]
    lines += [
        f"| {e['key']} | {e['config']['isolation']} | {e['config']['poll_s']} | {e['cpu_s_per_s']:.3f} |"
        for e in report.get("idle", [])
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen configurations, append each result to the JSON file as soon as it is known."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--configs",
        default=",".join(f"L{i}" for i in range(len(LADDER))),
        help=f"comma-separated keys of {', '.join(CONFIGS)} (default: the ladder L0..L{len(LADDER) - 1})",
    )
    parser.add_argument("--rounds", type=int, help="override the rounds of every configuration (>= 2)")
    parser.add_argument("--table", action="store_true", help="print the --out report as markdown and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS and k not in IDLE]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {', '.join([*CONFIGS, *IDLE])}")
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is excluded from the median)")
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"results": []}
    report["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "note": "2 vCPUs shared with other jobs; loadavg_before/after per run shows the contention",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for key in keys:
        if key in IDLE:
            with tempfile.TemporaryDirectory(prefix="fedct-levers-") as tmp:
                entry = {
                    "key": key,
                    **measure_idle(IDLE[key], Path(tmp)),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            report.setdefault("idle", []).append(entry)
            args.out.write_text(json.dumps(report, indent=1))
            print(f"{key} {IDLE[key].name}: {entry['cpu_s_per_s']} CPU-s/s", flush=True)
            continue
        config = CONFIGS[key] if args.rounds is None else replace(CONFIGS[key], rounds=args.rounds)
        with tempfile.TemporaryDirectory(prefix="fedct-levers-") as tmp:
            t0 = time.perf_counter()
            entry = {"key": key, **measure(config, Path(tmp)), "total_s": 0.0}
            entry["total_s"] = round(time.perf_counter() - t0, 1)
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["results"].append(entry)
        args.out.write_text(json.dumps(report, indent=1))
        summary = (
            "FAILED"
            if entry.get("failed")
            else (
                f"median overhead {entry['median_overhead_s']} s, "
                f"deployment CPU {entry['median_deployment_cpu_s']} s per round"
            )
        )
        print(f"{key} {config.name}: {summary} ({entry['total_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
