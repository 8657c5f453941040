"""``fedct bench {quality,preprocess,train-loop,federation,scale,explain,all,sim-gpu,fusion} [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import BenchOptions

#: Benchmark name -> module under ``bench`` with a ``run(BenchOptions) -> Path``; ``all`` runs them in this order.
BENCHMARKS = {
    "train-loop": "bench.train_loop",
    "preprocess": "bench.preprocess",
    "federation": "bench.federation",
    "scale": "bench.scale",
    "quality": "bench.quality",
    "explain": "bench.explain",
}
#: Benchmarks run only when named (not by ``all``): the shared-GPU simulation is meant for a GPU machine with Ray.
EXTRA_BENCHMARKS = {"sim-gpu": "bench.sim_gpu", "fusion": "bench.fusion"}


def run_benchmarks(names: list[str], options: BenchOptions, *, strategies: tuple[str, ...] = ()) -> int:
    """Run the named benchmarks one after the other; 0 when all wrote their JSON, 1 if one failed (the others still run)."""
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(
            f"== bench {name} ({'tiny' if options.tiny else 'quick' if options.quick else 'full'}) -> {options.out}",
            flush=True,
        )
        try:
            module = importlib.import_module({**BENCHMARKS, **EXTRA_BENCHMARKS}[name])
            path = (
                module.run(options, strategies=strategies) if name == "quality" and strategies else module.run(options)
            )
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"   wrote {path} in {time.perf_counter() - t0:.1f}s", flush=True)
    if failed:
        print(f"fedct bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _handler(args: argparse.Namespace) -> int:
    if args.quick and args.tiny:
        print("fedct bench: error: --quick and --tiny are exclusive", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip()) if args.strategies else ()
    if args.resume and args.benchmark not in ("quality", "all"):
        print("fedct bench: error: --resume applies to the quality benchmark only", file=sys.stderr)
        return 2
    if (args.profile != "default" or args.devices != "auto" or args.patients) and args.benchmark != "train-loop":
        print(
            "fedct bench: error: --profile, --devices and --patients apply to the train-loop benchmark only",
            file=sys.stderr,
        )
        return 2
    if args.patients < 0:
        print(f"fedct bench: error: --patients must be >= 0, got {args.patients}", file=sys.stderr)
        return 2
    options = BenchOptions(
        out=Path(args.out).resolve(),
        quick=args.quick,
        tiny=args.tiny,
        resume=args.resume,
        profile=args.profile,
        devices=args.devices,
        patients=args.patients,
    )
    return run_benchmarks(names, options, strategies=strategies)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct bench``."""
    p = sub.add_parser("bench", help="benchmarks: write JSON (and PNG) results into --out")
    p.add_argument("benchmark", choices=[*BENCHMARKS, *EXTRA_BENCHMARKS, "all"])
    p.add_argument("--quick", action="store_true", help="small sizes: minutes each on 2 cores")
    p.add_argument(
        "--tiny", action="store_true", help="test-suite size: seconds; checks that it runs, the figures mean little"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="quality: continue from quality.partial.json in --out (same plan): "
        "finished arms and seeds are kept, the rest runs",
    )
    p.add_argument(
        "--strategies",
        help="quality: comma-separated run-config strategies (default: fedavg,fedprox,fedadam; tiny: fedavg)",
    )
    p.add_argument(
        "--profile",
        choices=("default", "gpu"),
        default="default",
        help="train-loop: the run config timed: default (64x64x48 at 5 mm, batch 4: the CPU size) or gpu "
        "(configs/run-gpu.toml: 128x128x96 at 2.5 mm, batch 16)",
    )
    p.add_argument(
        "--patients",
        type=int,
        default=0,
        help="train-loop: synthetic patients of the timed site (default: the size's own; more patients = "
        "longer epochs, so the loader's refill at each epoch start weighs less, as at a real site)",
    )
    p.add_argument(
        "--devices",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="train-loop: arms to run (auto: the CPU, plus CUDA when present; the gpu profile skips the CPU "
        "arm unless asked, except in --tiny)",
    )
    p.add_argument("--out", default="runs/bench", help="folder for the JSON/PNG results and the benchmarks' work files")
    p.set_defaults(func=_handler)
