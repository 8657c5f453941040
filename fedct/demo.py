"""The main job: a federated run on synthetic hospitals, from nothing to a trained global model.

synth DICOM per site -> ingest (validate, HU, MONAI preprocessing, cache) -> Flower simulation (FedAvg)
-> run folder with metrics.json, curves.png, checkpoints and model bundles.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fl_server.config import ServerConfig
from preprocessing.split import SplitConfig

#: Validation and test share of each demo site's patients (see DemoOptions.patients_per_site).
DEMO_SPLIT_FRACTION = 0.25


@dataclass(frozen=True)
class DemoOptions:
    """Size of the demo federation and of its training."""

    out: Path
    sites: int = 3
    #: 80 patients and 25 % validation / 25 % test give each site ~20 studies per split, so the common classes clear
    #: the metrics floor (>= 5 positives and >= 5 negatives for an AUC; README "Privacy options"); with 40 patients
    #: and 20 % no class does and the demo would report no AUC at all.
    patients_per_site: int = 80
    rounds: int = 10
    local_epochs: int = 2
    model_name: str = "densenet121"
    seed: int = 0
    #: studies of the external validation family (synthetic.external: another generator, never trained on) that the
    #: demo's model is scored on at the end; 0 leaves the external validation out
    external_studies: int = 24
    #: ``profile-fusion`` of the run (README "Clinical and molecular profiles"): the synthetic sites' profile exports
    #: are pooled into the normalisation and fused; the external family has no profile, so it is not scored then
    profile_fusion: str = "none"

    def __post_init__(self) -> None:
        if self.sites < 2:
            raise ValueError(f"a federation needs at least 2 sites, got {self.sites}")
        if self.patients_per_site < 5:
            raise ValueError(f"patients-per-site must be >= 5 (train/val/test per site), got {self.patients_per_site}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.external_studies != 0 and self.external_studies < 3:
            raise ValueError(
                f"external-studies must be 0 (none) or >= 3 (one of each diagnosis), got {self.external_studies}"
            )


def simulation_backend_config(*, cpus_per_site: int = 1, gpus_per_site: float = 0.0) -> dict:
    """Ray backend settings of Flower's simulation engine: each simulated site gets whole CPU cores (on 2 cores two
    sites train at a time) and ``gpus_per_site`` of a GPU, and Ray's dashboard stays off.

    A fraction lets several sites share one GPU (0.25: four at a time; Ray shows each site that GPU); 0 hides the
    GPUs from the sites (they train on the CPU). See :func:`sim_gpus_per_site` for the automatic choice.
    """
    if not (gpus_per_site >= 0 and (gpus_per_site <= 1 or float(gpus_per_site).is_integer())):
        raise ValueError(
            f"gpus-per-site must be 0, a fraction in (0, 1] or a whole number of GPUs, got {gpus_per_site}"
        )
    return {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": float(gpus_per_site)},
        "init_args": {"include_dashboard": False},
    }


def sim_gpus_per_site(sites: int, requested: float | None = None) -> float:
    """GPU share of each simulated site: ``requested`` when given, else 1/sites of one GPU when torch sees a
    CUDA GPU (all sites train at once, sharing it), else 0. Asking for a GPU share without a GPU is an error
    (Ray would wait for ever for a GPU that is not there)."""
    import torch

    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if requested is None:
        return 1.0 / sites if torch.cuda.is_available() else 0.0
    if requested > 0 and not torch.cuda.is_available():
        raise ValueError(f"gpus-per-site={requested} but no CUDA GPU is available to PyTorch")
    simulation_backend_config(gpus_per_site=requested)  # validates the value
    return float(requested)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def server_config_for(options: DemoOptions) -> ServerConfig:
    """The run configuration of the demo (everything else at the defaults of pyproject.toml)."""
    return ServerConfig(
        num_server_rounds=options.rounds,
        local_epochs=options.local_epochs,
        model_name=options.model_name,
        min_sites=options.sites,
        val_fraction=DEMO_SPLIT_FRACTION,
        test_fraction=DEMO_SPLIT_FRACTION,
        seed=options.seed,
        run_dir=str(Path(options.out).resolve()),
        profile_fusion=options.profile_fusion,
    )


def run_demo(options: DemoOptions) -> int:
    """Run the whole demo; returns the process exit code."""
    from flwr.simulation import run_simulation

    from fl_client.client_app import build_client_app
    from fl_server.server_app import build_server_app
    from preprocessing.ingest import ingest_site
    from synthetic.hospitals import write_federation

    t_start = time.perf_counter()
    out = Path(options.out).resolve()
    data_root, work_root = out / "data", out / "sites"
    config = server_config_for(options)

    t = _step(
        f"1/4 synthetic hospitals: {options.sites} sites, ~{options.patients_per_site} patients each -> {data_root}"
    )
    marker = data_root / "federation.json"
    wanted = {"sites": options.sites, "patients_per_site": options.patients_per_site, "seed": options.seed}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        print("   already there (same sites, patients and seed): reused")
    else:
        summary = write_federation(
            data_root,
            sites=options.sites,
            patients_per_site=options.patients_per_site,
            seed=options.seed,
            overwrite=True,
        )
        for site in summary.sites:
            print(
                f"   {site.name}: {site.n_patients} patients, {site.n_files} DICOM files, {dict(sorted(site.class_counts.items()))}"
            )
        marker.write_text(json.dumps(wanted))
    print(f"   {time.perf_counter() - t:.1f}s", flush=True)

    t = _step("2/4 site ingestion: validate series, HU volumes, MONAI preprocessing into each site's cache")
    split = SplitConfig(val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    for site_dir in sorted(p for p in data_root.glob("site-*") if p.is_dir()):
        t_site = time.perf_counter()
        manifest = ingest_site(
            site_dir / "dicom",
            work_root / site_dir.name,
            labels_csv=site_dir / "labels.csv",
            pipeline=config.pipeline,
            split=split,
            progress=True,
        )
        by_split = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
        print(
            f"   {site_dir.name}: {len(manifest.studies)} studies accepted, {manifest.n_rejected} refused, "
            f"split {by_split}, {time.perf_counter() - t_site:.1f}s",
            flush=True,
        )
    print(f"   {time.perf_counter() - t:.1f}s", flush=True)

    fusion = "" if options.profile_fusion == "none" else f", profile fusion {options.profile_fusion}"
    t = _step(
        f"3/4 federated training: Flower simulation, FedAvg, {options.rounds} rounds, model {options.model_name}{fusion}"
    )
    run_simulation(
        server_app=build_server_app(config.to_run_config()),
        client_app=build_client_app({"sim-data-root": str(data_root), "sim-work-root": str(work_root)}),
        num_supernodes=options.sites,
        backend_config=simulation_backend_config(),
    )
    print(f"   {time.perf_counter() - t:.1f}s", flush=True)

    _step("4/4 results")
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        print(f"   no {metrics_path}: the federated run failed (see the log above)")
        return 1
    metrics = json.loads(metrics_path.read_text())
    best = metrics.get("best_round")
    if best:
        print(f"   best round {best['round']} by {best['selected_by']}; held-out test metrics of that model:")
        test = best["test"]
        print(
            f"   {'':8} {'studies':>7} {'macro AUC':>9} {'pooled AUC':>10} {'accuracy':>8} {'Brier':>6} {'C-index':>7} {'td-AUC':>6}"
        )
        rows = [("all", test)] + sorted(best["test_sites"].items())
        for site, m in rows:
            print(
                f"   {site:8} {int(m.get('test-n') or 0):>7} {_fmt(m.get('test-auc-macro')):>9} {_fmt(m.get('test-pooled-auc-macro')):>10} "
                f"{_fmt(m.get('test-accuracy')):>8} {_fmt(m.get('test-brier')):>6} {_fmt(m.get('test-c-index')):>7} "
                f"{_fmt(m.get('test-td-auc')):>6}"
            )
        print(
            "   (macro AUC of 'all' = mean of site AUCs weighted by studies; pooled AUC = AUC of all sites' predictions, "
            "from score histograms)"
        )
        calibration = (metrics.get("calibration") or {}).get("best") or {}
        if calibration.get("temperature") is not None:
            print(
                f"   calibration of that model: temperature {calibration['temperature']:.3f}; held-out test "
                f"({calibration.get('test_studies', 0)} studies) ECE {_fmt(calibration.get('ece_before'))} -> "
                f"{_fmt(calibration.get('ece_after'))}, Brier {_fmt(calibration.get('brier_before'))} -> "
                f"{_fmt(calibration.get('brier_after'))}"
            )
            if calibration.get("ece_floor_upper95") is not None:
                print(
                    "   (a perfectly calibrated model would read ECE "
                    f"{_fmt(calibration.get('ece_floor_expected'))} on average, up to "
                    f"{_fmt(calibration.get('ece_floor_upper95'))} in 95 % of test sets of this size)"
                )
        elif calibration:
            print(f"   no calibration: {calibration.get('reason')}")
    if options.external_studies and options.profile_fusion != "none":
        print("   external validation skipped: the external family has no clinical profile to fuse")
    elif options.external_studies:
        _external_validation(options, out, config, internal=best["test"] if best else {})
    print(
        f"   metrics: {metrics_path}\n   curves:  {out / 'curves.png'}\n   model:   {out / 'model' / 'final'} (best: {out / 'model' / 'best'})"
    )
    print(
        f"\ndemo finished in {time.perf_counter() - t_start:.0f}s; options {json.dumps(asdict(options), default=str)}"
    )
    return 0


def _external_validation(options: DemoOptions, out: Path, config: ServerConfig, *, internal: dict) -> Path:
    """Score the demo's model (best round, else final) on the external validation family; write ``external.json``."""
    from inference.external import score_external
    from models.bundle import load_bundle
    from synthetic.external import ensure_external_family

    family = out / "data" / "external"
    ensure_external_family(
        family, studies=options.external_studies, seed=options.seed, derived=(out / "sites-external",)
    )
    which = "best" if (out / "model" / "best" / "model.json").is_file() else "final"
    model, _ = load_bundle(out / "model" / which, expected_model=config.model)
    score = score_external(
        model.state_dict(),
        model=config.model,
        pipeline=config.pipeline,
        dicom_dir=family / "dicom",
        labels_csv=family / "labels.csv",
        work_dir=out / "sites-external",
    )
    print(f"   external validation family ({score.n} studies of another generator, never trained on; model: {which}):")
    print(f"   {'':8} {'macro AUC':>9} {'COVID vs normal AUC':>19} {'accuracy':>8}")
    print(
        f"   {'internal':8} {_fmt(internal.get('test-auc-macro')):>9} {'':>19} {_fmt(internal.get('test-accuracy')):>8}"
    )
    print(
        f"   {'external':8} {_fmt(score.auc_macro):>9} {_fmt(score.auc_covid_vs_normal):>19} {_fmt(score.accuracy):>8}"
    )
    path = out / "external.json"
    path.write_text(
        json.dumps(
            {
                "model": which,
                "counts": score.counts,
                **score.metrics(),
                "internal": {k: internal.get(k) for k in ("test-n", "test-auc-macro", "test-accuracy")},
            },
            indent=1,
        )
    )
    if score.auc_covid_vs_normal_interval is not None:
        low, high = score.auc_covid_vs_normal_interval
        print(f"   COVID vs normal AUC, 95 % interval (DeLong): {low:.2f}-{high:.2f}")
    print(f"   external: {path}")
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
