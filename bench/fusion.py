"""Fusion benchmark (issue #24): image-only, profile-only and fused models, trained federatedly on the same sites.

On the synthetic federation (every site exports its clinical/molecular profile in its own columns, units and
missingness, :mod:`synthetic.profiles`), each arm is a FedAvg run of fedct's ServerApp and ClientApp (Flower's
simulation engine; all arms of all seeds in one simulation, so Ray starts once) with the same rounds, local epochs
and seed, differing only in ``profile-fusion``:

- ``image``: ``none`` (the CT alone);
- ``profile``: ``only`` (the profile alone: the heads see the profile embedding, the image is not used);
- ``late`` and ``film``: the CT fused with the profile (:mod:`models.factory`);
- ``late+dropout``: late fusion trained with ``profile-dropout = 0.3`` (each measured value masked with probability
  0.3 in every training step).

Every run pools the profile normalisation from the sites' aggregate statistics before round 1 (as in production).
The final global model of each arm is scored by fedct's own evaluation at every site (``bench.quality.score``:
held-out test split, diagnosis macro AUC and prognosis C-index, overall = weighted mean over sites). The arms that
use the profile are scored three times: with the site's profile as exported, with each measured value removed with
probability 0.5 (``half missing``), and with no profile at all (``no profile``: every value masked), which shows
how they degrade with missing values. Mean ± standard deviation over the seeds.

Writes ``fusion.json``.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SMALL_RUN_CONFIG, BenchOptions, site_names, summarise, synthetic_sites, write_result
from bench.quality import FIGURES, score

#: Arm name -> ``profile-fusion`` of its run (and ``profile-dropout`` after a ``+``).
ARMS = {"image": "none", "profile": "only", "late": "late", "film": "film", "late+dropout": "late+0.3"}
#: How the profile is given at test time: as exported, half of the measured values removed, none at all.
PROFILE_VARIANTS = ("as exported", "half missing", "no profile")
#: Probability of removing a measured value in the ``half missing`` variant.
DROP = 0.5


@dataclass(frozen=True)
class FusionPlan:
    """Size of the comparison."""

    sites: int
    patients_per_site: int
    seeds: tuple[int, ...]
    rounds: int
    local_epochs: int
    small: bool = True

    def __post_init__(self) -> None:
        if self.sites < 2 or not self.seeds or self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"the fusion benchmark needs >= 2 sites, a seed, rounds and epochs >= 1; got {self}")


def plan_for(options: BenchOptions) -> FusionPlan:
    """tiny: the test suite's size (1 seed, 1 round); quick: 3 seeds, 3 sites of 60 patients, 4 rounds x 2 epochs, small
    images (minutes on 2 cores); full: the same with 100 patients per site and 8 rounds."""
    if options.tiny:
        return FusionPlan(sites=2, patients_per_site=10, seeds=(0,), rounds=1, local_epochs=1)
    if options.quick:
        return FusionPlan(sites=3, patients_per_site=60, seeds=(0, 1, 2), rounds=4, local_epochs=2)
    return FusionPlan(sites=3, patients_per_site=100, seeds=(0, 1, 2), rounds=8, local_epochs=2)


def _config(plan: FusionPlan, *, fusion: str, seed: int, run_dir: Path) -> Any:
    from fl_server.config import ServerConfig

    fusion, _, dropout = fusion.partition("+")
    return ServerConfig.from_run_config(
        {
            **SMALL_RUN_CONFIG,
            "profile-dropout": float(dropout or 0.0),
            "num-server-rounds": plan.rounds,
            "local-epochs": plan.local_epochs,
            "min-sites": plan.sites,
            "seed": seed,
            "profile-fusion": fusion,
            "val-fraction": 0.2,
            "test-fraction": 0.3,
            "run-dir": str(run_dir.resolve()),
        }
    )


def run_federations(configs: list[Any], data_root: Path, work_root: Path, n_sites: int) -> None:
    """Every run of ``configs`` one after the other in one Flower simulation (Ray and the ClientApps start once)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedct.demo import simulation_backend_config
    from fl_client.client_app import build_client_app
    from fl_server.privacy import privacy_round_extras, wrap_strategy
    from fl_server.rounds import run_federation
    from fl_server.server_app import round_loop_class
    from fl_server.strategy import build_strategy

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        for config in configs:
            strategy = wrap_strategy(build_strategy(config), config.privacy, expected_sites=config.min_sites)
            run_federation(
                grid, config, strategy, round_extras=privacy_round_extras(strategy), loop_class=round_loop_class(config)
            )

    run_simulation(
        server_app=app,
        client_app=build_client_app({"sim-data-root": str(data_root), "sim-work-root": str(work_root)}),
        num_supernodes=n_sites,
        backend_config=simulation_backend_config(),
    )


def thinned_profile(source: Path, target: Path, *, drop: float, seed: int) -> Path:
    """A copy of a site's profile export (mapping + table) with each non-empty value cell replaced by the site's own
    missing token with probability ``drop`` (the key column is kept); returns ``target``."""
    from preprocessing.profile import MAPPING_NAME, read_mapping, read_schema

    mapping = read_mapping(source / MAPPING_NAME, read_schema())
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / MAPPING_NAME, target / MAPPING_NAME)
    rng = np.random.default_rng(seed)
    with (source / mapping.path).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter=mapping.delimiter))
    key_at = rows[0].index(mapping.key_column)
    token = mapping.missing[0] if mapping.missing else ""
    for row in rows[1:]:
        for j, cell in enumerate(row):
            if j != key_at and cell.strip() not in mapping.missing and rng.random() < drop:
                row[j] = token
    with (target / mapping.path).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=mapping.delimiter, lineterminator="\n").writerows(rows)
    return target


def _sites(data_root: Path, work_root: Path, variant: str, scratch: Path, seed: int) -> dict[str, Any]:
    from fl_client.config import SiteConfig

    out = {}
    for name in site_names(data_root):
        profile_dir: Path | None = data_root / name
        if variant == "half missing":
            profile_dir = thinned_profile(data_root / name, scratch / f"{name}-seed{seed}", drop=DROP, seed=seed)
        elif variant == "no profile":
            profile_dir = None
        out[name] = SiteConfig(
            site_name=name,
            dicom_dir=data_root / name / "dicom",
            site_dir=work_root / name,
            labels_csv=data_root / name / "labels.csv",
            device="cpu",
            profile_dir=profile_dir,
        )
    return out


def score_run(
    config: Any, data_root: Path, work_root: Path, scratch: Path, *, variants: tuple[str, ...]
) -> dict[str, Any]:
    """The final bundle of a run scored at every site, once per profile variant."""
    from models.bundle import load_bundle
    from preprocessing.profile_features import ProfileNormalisation

    model, meta = load_bundle(config.run_path / "model" / "final")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    norm = meta.get("profile_normalisation")
    settings = config.round_settings(1, profile=ProfileNormalisation.from_dict(norm) if norm else None)
    return {
        variant: score(_sites(data_root, work_root, variant, scratch, config.seed), settings, state)
        for variant in variants
    }


def run(options: BenchOptions) -> Path:
    """Run every arm for every seed, score them, write ``fusion.json``."""
    started = time.perf_counter()
    plan = plan_for(options)
    out = Path(options.out)
    work = out / "work" / "fusion"
    configs = {
        (arm, seed): _config(plan, fusion=fusion, seed=seed, run_dir=work / "runs" / f"{arm}-seed{seed}")
        for seed in plan.seeds
        for arm, fusion in ARMS.items()
    }
    data_root = synthetic_sites(
        work / "data", sites=plan.sites, patients_per_site=plan.patients_per_site, seed=0, small=plan.small
    )
    work_root = work / "sites"
    t0 = time.perf_counter()
    run_federations(list(configs.values()), data_root, work_root, plan.sites)
    train_seconds = time.perf_counter() - t0
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for (arm, seed), config in configs.items():
        variants = ("as exported",) if arm == "image" else PROFILE_VARIANTS
        scored = score_run(config, data_root, work_root, work / "thinned", variants=variants)
        for variant, result in scored.items():
            name = arm if variant == "as exported" else f"{arm} / {variant}"
            per_seed.setdefault(name, []).append({"seed": seed, **result})
    arms = {
        name: {
            "per_seed": results,
            "summary": {key: summarise(r["overall"].get(key) for r in results) for key, _ in FIGURES},
        }
        for name, results in per_seed.items()
    }
    c_index = {name: arm["summary"]["test-c-index"]["mean"] for name, arm in arms.items()}
    image = c_index.get("image")
    gains = {
        a: c_index[a] - image if c_index.get(a) is not None and image is not None else None
        for a in ARMS
        if a != "image"
    }
    payload = {
        "what": "held-out test metrics of the final FedAvg model of each arm (same sites, seeds, rounds and epochs; only "
        "profile-fusion differs); overall = weighted mean of site values. '<arm> / half missing': each measured "
        f"profile value removed with probability {DROP} at test time; '<arm> / no profile': every value masked. "
        "Mean/std over seeds.",
        "plan": {**plan.__dict__, "seeds": list(plan.seeds), "run_config": dict(SMALL_RUN_CONFIG)},
        "figures": {k: label for k, label in FIGURES},
        "arms": arms,
        "fused_minus_image_c_index": gains,
        "train_seconds": train_seconds,
    }
    return write_result(out, "fusion", payload, options=options, started=started)


__all__ = [
    "ARMS",
    "PROFILE_VARIANTS",
    "FusionPlan",
    "plan_for",
    "run",
    "run_federations",
    "score_run",
    "thinned_profile",
]
