"""Federated simulation with several simulated sites sharing one GPU (fractional ``num_gpus`` per ClientApp).

Flower's simulation engine (Ray) gives each simulated site ``gpus_per_site`` of a GPU (``fedct.demo.sim_gpus_per_site``:
1/sites of one GPU when torch sees one, so all sites train at once on it; 0 without a GPU). Each site records its
round in its own ``train-stats.jsonl`` (``fl_client.train.record_round_stats``: seconds, device, precision, peak
GPU memory of that site's process); this benchmark reports per site and round the GPU memory, and per round the
wall time against the sum of the sites' training time (below 1: the sites overlapped on the GPU).

Writes ``sim_gpu.json``. Needs Flower's simulation engine (Ray), so it is not part of the GPU machine's check.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import SMALL_RUN_CONFIG, BenchOptions, site_names, synthetic_sites, write_result


def _plan(options: BenchOptions) -> dict[str, Any]:
    if options.tiny:
        return {"sites": 2, "patients": 6, "small": True, "rounds": 1, "run_config": SMALL_RUN_CONFIG}
    if options.quick:
        return {"sites": 3, "patients": 8, "small": True, "rounds": 2, "run_config": SMALL_RUN_CONFIG}
    from bench.train_loop import profile_run_config

    gpu = profile_run_config("gpu")
    return {
        "sites": 4,
        "patients": 24,
        "small": False,
        "rounds": 3,
        "run_config": {k: gpu[k] for k in ("batch-size", "input-size", "target-spacing-mm", "model-name")},
    }


def read_train_stats(work_root: Path) -> dict[str, list[dict[str, Any]]]:
    """Each site's ``train-stats.jsonl`` lines, by site name."""
    from fl_client.train import TRAIN_STATS_NAME

    stats = {}
    for site_dir in sorted(p for p in Path(work_root).glob("site-*") if p.is_dir()):
        path = site_dir / TRAIN_STATS_NAME
        if path.is_file():
            stats[site_dir.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return stats


def run(options: BenchOptions) -> Path:
    """Run the shared-GPU simulation and write ``sim_gpu.json``; returns its path."""
    import torch
    from flwr.simulation import run_simulation

    from bench.federation import FederationPlan, _run_config, build_counting_server_app, round_report
    from fedct.demo import sim_gpus_per_site, simulation_backend_config
    from fl_client.client_app import build_client_app
    from fl_server.config import ServerConfig
    from preprocessing.ingest import prepare_site

    started = time.perf_counter()
    plan = _plan(options)
    out = Path(options.out)
    work = out / "work" / "sim_gpu"
    data_root = synthetic_sites(
        work / "data", sites=plan["sites"], patients_per_site=plan["patients"], seed=0, small=plan["small"]
    )
    work_root = work / "sites"
    run_dir = work / "run"

    federation = FederationPlan(
        sites=plan["sites"],
        patients_per_site=plan["patients"],
        small=plan["small"],
        rounds=plan["rounds"],
        run_config=plan["run_config"],
    )
    run_config = _run_config(federation, run_dir)
    config = ServerConfig.from_run_config(run_config)
    settings = config.round_settings(1)
    names = site_names(data_root)
    for name in names:  # ingested beforehand: the rounds measure training, not ingestion
        prepare_site(
            data_root / name / "dicom",
            work_root / name,
            labels_csv=data_root / name / "labels.csv",
            pipeline=config.pipeline,
            split=settings.split,
        )
        (work_root / name / "train-stats.jsonl").unlink(missing_ok=True)
    gpus = sim_gpus_per_site(len(names))
    t0 = time.perf_counter()
    run_simulation(
        server_app=build_counting_server_app(run_config),
        client_app=build_client_app({"sim-data-root": str(data_root), "sim-work-root": str(work_root)}),
        num_supernodes=len(names),
        backend_config=simulation_backend_config(gpus_per_site=gpus),
    )
    total = time.perf_counter() - t0
    if not (run_dir / "metrics.json").is_file():
        raise RuntimeError(f"the simulation wrote no {run_dir / 'metrics.json'} (see the log above)")
    report = round_report(run_dir)
    stats = read_train_stats(work_root)
    rounds = []
    for entry in report["rounds"]:
        r = entry["round"]
        mine = {site: next((s for s in lines if s["round"] == r), None) for site, lines in stats.items()}
        seconds = [s["seconds"] for s in mine.values() if s]
        rounds.append(
            {
                "round": r,
                "wall_seconds": entry["wall_seconds"],
                "sum_site_training_seconds": sum(seconds) if seconds else None,
                "slowest_site_training_seconds": max(seconds) if seconds else None,
                "wall_over_sum_of_training": entry["wall_seconds"] / sum(seconds) if seconds and sum(seconds) else None,
                "sites": {
                    site: (
                        {
                            "seconds": s["seconds"],
                            "device": s["device"],
                            "precision": s["precision"],
                            "peak_gpu_memory_mib": s["peak_gpu_memory_mib"],
                        }
                        if s
                        else None
                    )
                    for site, s in mine.items()
                },
            }
        )
    payload = {
        "what": "Flower simulation (Ray) with gpus_per_site of one GPU per simulated site; per round the wall time against "
        "the sum of the sites' local training (train-stats.jsonl of each site); per site its process's peak GPU memory "
        "(torch.cuda.max_memory_allocated over its training of that round).",
        "sites": len(names),
        "gpus_per_site": gpus,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "run_config": plan["run_config"],
        "rounds": rounds,
        "total_seconds": total,
    }
    return write_result(out, "sim_gpu", payload, options=options, started=started)
