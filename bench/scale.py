"""Scale: many simulated sites on this machine, and the memory a SuperNode needs for the default model.

- Simulation with 20 sites (quick: 6): wall time per round and peak resident memory of the whole simulation
  (this process and Ray's processes), on small synthetic sites with the small CNN so that the engine, not the
  training, is what grows with the number of sites.
- Deployment (local SuperLink + SuperNodes on 127.0.0.1, as in ``bench.federation``) with the default model
  (DenseNet121 at 64x64x48): peak RSS of each SuperNode's process tree (the SuperNode and the ClientApp
  processes it starts per message) and of the SuperLink.

Writes ``scale.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import SMALL_RUN_CONFIG, BenchOptions, site_names, synthetic_sites, write_result
from bench.federation import FederationPlan, deployment_arm, simulation_arm


def _plans(options: BenchOptions) -> tuple[FederationPlan, FederationPlan]:
    """(simulation plan, deployment plan)."""
    if options.tiny:
        return (
            FederationPlan(sites=3, patients_per_site=5, small=True, rounds=1, run_config=SMALL_RUN_CONFIG),
            FederationPlan(sites=2, patients_per_site=5, small=True, rounds=1, run_config=SMALL_RUN_CONFIG),
        )
    if options.quick:
        return (
            FederationPlan(sites=6, patients_per_site=5, small=True, rounds=2, run_config=SMALL_RUN_CONFIG),
            FederationPlan(sites=2, patients_per_site=6, small=True, rounds=1, run_config={}),
        )
    return (
        FederationPlan(sites=20, patients_per_site=6, small=True, rounds=3, run_config=SMALL_RUN_CONFIG),
        FederationPlan(sites=3, patients_per_site=12, small=False, rounds=2, run_config={}),
    )


def _prepare(plan: FederationPlan, folder: Path) -> tuple[Path, Path]:
    from fl_server.config import ServerConfig
    from preprocessing.ingest import prepare_site

    data_root = synthetic_sites(
        folder / "data", sites=plan.sites, patients_per_site=plan.patients_per_site, seed=0, small=plan.small
    )
    work_root = folder / "sites"
    config = ServerConfig.from_run_config({**plan.run_config, "run-dir": str(folder / "runs")})
    for name in site_names(data_root):
        prepare_site(
            data_root / name / "dicom",
            work_root / name,
            labels_csv=data_root / name / "labels.csv",
            pipeline=config.pipeline,
            split=config.round_settings(1).split,
        )
    return data_root, work_root


def _simulation(plan: FederationPlan, work: Path) -> dict[str, Any]:
    data_root, work_root = _prepare(plan, work / "simulation")
    sim = simulation_arm(plan, data_root, work_root, work / "simulation" / "run")
    return {
        "sites": sim["sites"],
        "model": plan.run_config.get("model-name", "densenet121"),
        "rounds": [
            {k: r[k] for k in ("round", "wall_seconds", "slowest_site_training_seconds")} for r in sim["rounds"]
        ],
        "wall_seconds_per_round_median": sim["median_rounds_after_first"]["wall_seconds"],
        "total_seconds": sim["total_seconds"],
        "peak_memory_mib": sim["peak_memory_mib"],
    }


def _deployment(plan: FederationPlan, work: Path) -> dict[str, Any]:
    data_root, work_root = _prepare(plan, work / "deployment")
    dep = deployment_arm(plan, data_root, work_root, work / "deployment" / "run")
    return {
        "sites": dep["sites"],
        "model": plan.run_config.get("model-name", "densenet121"),
        "peak_rss_mib": dep["peak_rss_mib"],
        "wall_seconds_per_round": [r["wall_seconds"] for r in dep["rounds"]],
    }


PARTS = ("simulation", "deployment")


def run(options: BenchOptions, *, parts: tuple[str, ...] = PARTS) -> Path:
    """Run the parts (both by default) and write ``scale.json``; returns its path."""
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    started = time.perf_counter()
    out = Path(options.out)
    work = out / "work" / "scale"
    sim_plan, dep_plan = _plans(options)
    result: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for part, function, plan in (("simulation", _simulation, sim_plan), ("deployment", _deployment, dep_plan)):
        if part not in parts:
            continue
        try:
            result[part] = function(plan, work)
        except Exception as exc:  # noqa: BLE001 - reported; the other part still runs
            errors[part] = f"{type(exc).__name__}: {exc}"
    payload = {
        "what": "simulation: wall time per round (metrics.json) and peak RSS of this process tree (driver + Ray) sampled every "
        "0.2 s; deployment: peak RSS per SuperNode process tree (SuperNode + the ClientApp process it starts per message) "
        "and of the SuperLink, sampled every 0.2 s.",
        "plans": {
            "simulation": {
                "sites": sim_plan.sites,
                "patients_per_site": sim_plan.patients_per_site,
                "rounds": sim_plan.rounds,
            },
            "deployment": {
                "sites": dep_plan.sites,
                "patients_per_site": dep_plan.patients_per_site,
                "rounds": dep_plan.rounds,
                "model": dep_plan.run_config.get("model-name", "densenet121"),
            },
        },
        "parts": list(parts),
        **result,
        "errors": errors,
    }
    return write_result(out, "scale", payload, options=options, started=started)
