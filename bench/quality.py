"""Quality benchmark (FLamby-style): federated against pooled and local-only training, same model, budget and seeds.

On the default non-IID synthetic federation (sites differ in scanner, slice thickness, noise, prevalence and
size), every arm starts from the same initial weights (``torch.manual_seed(seed)``, as the server does) and gets
the same budget of local epochs (``rounds x local_epochs``):

- ``pooled``: all sites' training studies in one loader (what one would do if data could be shared);
- ``local:<site>``: each site alone on its own training studies;
- ``federated:<strategy>``: Flower's simulation engine with fedct's ServerApp and ClientApp, ``rounds`` rounds of
  ``local_epochs`` (or ``federated_local_epochs``: e.g. as many as there are sites, so that each site takes as many
  sequential optimisation steps per round as the pooled arm takes per epoch); the final global model is scored.

Training and scoring reuse fedct's functions (``fl_client.train.train_model``/``train_round``/
``recalibrate_batch_norm``/``evaluate_round`` and ``fl_server.run_log.aggregate``), so every arm is trained by the
same loop and scored on the same held-out test studies by the same metric code: diagnosis macro AUC and
prognosis C-index per site, and over all sites (weighted mean of site values; ``pooled-auc-macro`` = AUC of all
sites' predictions pooled). Each figure is given as mean ± standard deviation over the seeds.

Writes ``quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bench.common import SMALL_RUN_CONFIG, BenchOptions, site_names, summarise, synthetic_sites, write_result

#: Figures reported per arm (metric key in fedct's evaluation, label).
FIGURES = (
    ("test-auc-macro", "diagnosis macro AUC"),
    ("test-pooled-auc-macro", "diagnosis AUC, pooled predictions"),
    ("test-c-index", "prognosis C-index"),
)
#: Figures on the external validation family (inference.external), per arm.
EXTERNAL_FIGURES = (
    ("external-auc-covid-vs-normal", "external family: COVID vs normal AUC"),
    ("external-auc-macro", "external family: diagnosis macro AUC"),
)
#: Goal of the validity issue: a model that learned the finding, not the generator (COVID vs normal, external family).
EXTERNAL_AUC_GOAL = 0.85


#: Strategies compared by the full ``fedct bench quality`` (names of the run config's ``strategy`` key).
DEFAULT_STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True)
class QualityPlan:
    """Size of the comparison."""

    sites: int
    patients_per_site: int
    small: bool
    seeds: tuple[int, ...]
    rounds: int
    local_epochs: int
    strategies: tuple[str, ...] = ("fedavg",)
    run_config: Mapping[str, Any] = field(default_factory=dict)
    external_studies: int = 24  # studies of the external validation family (synthetic.external), scored only
    site_images: tuple[int, float, float] | None = None  # (rows, pixel mm, slice mm) of the sites; None: by ``small``
    external_small: bool | None = None  # small external studies (32x32); None: as ``small``
    size: str = ""  # the size's name, recorded with the results ("": the mode of the options)
    randomisation: float = 1.0  # strength of the sites' domain randomisation (SiteProfile.domain_randomisation)
    # epochs short of the budget at which the pooled and federated arms are scored as well (arms ``pooled@E`` and
    # ``federated:<strategy>@E``, from the same training: is an arm still improving at the budget?)
    score_at: tuple[int, ...] = ()
    # local epochs per round of the federated arms; None: ``local_epochs`` (every arm sees each study equally often).
    # With S sites of similar size, S x ``local_epochs`` gives every site as many sequential optimisation steps per
    # round as the pooled arm takes per round's epochs (the same wall-clock when the sites train at once; S times the
    # gradient computations in all)
    federated_local_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.sites < 2:
            raise ValueError(f"the quality benchmark needs at least 2 sites, got {self.sites}")
        if not self.seeds:
            raise ValueError("the quality benchmark needs at least one seed")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local epochs must be >= 1, got {self.rounds} and {self.local_epochs}")
        if self.federated_local_epochs is not None and self.federated_local_epochs < 1:
            raise ValueError(f"federated local epochs must be >= 1, got {self.federated_local_epochs!r}")
        if not self.strategies:
            raise ValueError("the quality benchmark needs at least one federated strategy")
        if self.external_studies < 3:
            raise ValueError(f"external studies must be >= 3 (one of each diagnosis), got {self.external_studies!r}")
        if not 0.0 < self.randomisation <= 1.0:
            raise ValueError(f"randomisation must be a strength in (0, 1], got {self.randomisation!r}")
        budget = self.rounds * self.local_epochs
        for epochs in self.score_at:
            if not 0 < epochs < budget:
                raise ValueError(f"score_at {epochs!r}: must lie between 0 and the budget of {budget} epochs")
            if epochs % self.local_epochs:
                raise ValueError(
                    f"score_at {epochs!r}: not a whole number of rounds of {self.local_epochs} local epochs"
                )
        if list(self.score_at) != sorted(set(self.score_at)):
            raise ValueError(f"score_at must be increasing and without repeats, got {self.score_at!r}")

    @property
    def fed_local_epochs(self) -> int:
        """Local epochs per round of the federated arms."""
        return self.local_epochs if self.federated_local_epochs is None else self.federated_local_epochs


def plan_for(options: BenchOptions, *, strategies: Sequence[str] | None = None) -> QualityPlan:
    """Tiny: seconds, for the test suite, 1 seed, FedAvg; quick: 3 seeds, small images, small CNN, a budget of 9
    epochs (enough to learn: 3 epochs left every arm at chance), about 3 minutes, mostly Flower's simulation start;
    full: the demo's federation and model, 3 seeds (hours on 2 cores). ``strategies`` default: FedAvg (tiny),
    :data:`DEFAULT_STRATEGIES` (quick and full)."""
    if strategies is None:
        strategies = ("fedavg",) if options.tiny else DEFAULT_STRATEGIES
    if options.tiny:
        return QualityPlan(
            sites=2,
            patients_per_site=8,
            small=True,
            seeds=(0,),
            rounds=2,
            local_epochs=1,
            strategies=tuple(strategies),
            run_config=SMALL_RUN_CONFIG,
            external_studies=6,
            score_at=(1,),
        )
    if options.quick:
        return QualityPlan(
            sites=3,
            patients_per_site=30,
            small=True,
            seeds=(0, 1, 2),
            rounds=3,
            local_epochs=3,
            strategies=tuple(strategies),
            run_config=SMALL_RUN_CONFIG,
        )
    return QualityPlan(
        sites=3,
        patients_per_site=40,
        small=False,
        seeds=(0, 1, 2),
        rounds=10,
        local_epochs=2,
        strategies=tuple(strategies),
        external_studies=96,
    )


#: Run config of the medium size: 32^3 inputs of 10 mm (a 320 mm cube: the randomised phantom's scans and the
#: external family's fit), small CNN.
MEDIUM_RUN_CONFIG: dict[str, Any] = {
    "model-name": "smallcnn",
    "input-size": "32,32,32",
    "target-spacing-mm": "10.0,10.0,10.0",
    "batch-size": 4,
    "learning-rate": 0.003,
}


def medium_plan(
    *,
    seeds: Sequence[int] = (0,),
    strategies: Sequence[str] = ("fedavg",),
    randomisation: float = 1.0,
    patients_per_site: int = 40,
    rounds: int = 12,
    local_epochs: int = 1,
    run_config: Mapping[str, Any] | None = None,
    score_at: Sequence[int] | None = None,
    federated_local_epochs: int | None = None,
    external_studies: int = 96,
) -> QualityPlan:
    """Between quick and full (issue #20.1: at the quick size's 16^3 inputs of 16 mm a lesion is a voxel or two):
    3 sites x 40 patients (``patients_per_site``) of 64x64 pixels of 6 mm and 5 mm slices, 32^3 inputs of 10 mm, a
    budget of 12 epochs, 96 full-size external studies (128x128, 1.25-7 mm slices). Tens of minutes per seed on 2
    cores (300 patients per site, 20 epochs: about 11).

    The federated arm spends the budget as ``rounds`` 12 rounds of ``local_epochs`` 1 (fedct's own default): on
    these sites the same budget as 5 rounds x 4 local epochs ended at 87 % of pooled, as 20 x 1 at 92 %
    (bench/results/2026-12-06, README "300 patients per site"); the pooled and local arms train it in one call.

    ``run_config``: run-config keys that override :data:`MEDIUM_RUN_CONFIG` for every arm (e.g. ``{"hu-max": -200}``
    for a lung window); checked by the server's config before anything runs, recorded with the plan. ``score_at``:
    epochs short of the budget at which the pooled and federated arms are scored too (:attr:`QualityPlan.score_at`);
    default: half the budget in whole rounds (at 300 patients per site, lung window, pooled still gained 0.12-0.17 AUC
    and FedAvg 0.08-0.09 from 20 to 40 epochs: a comparison at one budget alone can mislead).
    ``federated_local_epochs``: :attr:`QualityPlan.federated_local_epochs` (default: ``local_epochs``). At 300 patients
    per site (lung window, 40 rounds, 3 seeds) one-epoch rounds ended at 85 % of pooled, rounds of 3 local epochs
    (each site then takes the pooled arm's sequential steps) at 103 % (README, "Step-matched rounds").
    ``external_studies``: size of the external family (default 96, about 100 s to write once; 24 studies hold 8
    COVID-19 and 8 normal ones, whose COVID-vs-normal AUC has a 95 % interval about 0.4 wide: the same two pooled
    models scored 0.89 / 0.67 on 24 and 0.65 / 0.75 on 96 studies, README "How sure an external figure is")."""
    if score_at is None:
        half = (rounds // 2) * local_epochs
        score_at = (half,) if half > 0 else ()
    return QualityPlan(
        sites=3,
        patients_per_site=patients_per_site,
        small=True,
        seeds=tuple(seeds),
        rounds=rounds,
        local_epochs=local_epochs,
        strategies=tuple(strategies),
        run_config={**MEDIUM_RUN_CONFIG, **(run_config or {})},
        site_images=(64, 6.0, 5.0),
        external_small=False,
        size="medium",
        randomisation=randomisation,
        score_at=tuple(score_at),
        federated_local_epochs=federated_local_epochs,
        external_studies=external_studies,
    )


def _server_config(plan: QualityPlan, *, seed: int, run_dir: Path, strategy: str | None) -> Any:
    """fedct's ServerConfig of one federated arm (checked before anything starts; a strategy the config
    does not know is an error naming it)."""
    from fl_server.config import ServerConfig

    run_config: dict[str, Any] = {
        **plan.run_config,
        "num-server-rounds": plan.rounds,
        "local-epochs": plan.fed_local_epochs,
        "min-sites": plan.sites,
        "seed": seed,
        "run-dir": str(run_dir.resolve()),
    }
    if strategy is not None:
        if "strategy" not in {f.name for f in fields(ServerConfig)}:
            raise ValueError(f"strategy {strategy!r} asked for, but this fedct's run config has no 'strategy' key")
        run_config["strategy"] = strategy
    return ServerConfig.from_run_config(run_config)


def _site_configs(data_root: Path, work_root: Path, *, epochs_budget: int = 1) -> dict[str, Any]:
    """The benchmark's sites; their local-epoch limit admits ``epochs_budget`` (the pooled and local arms train the
    whole budget in one call, which a real site's default limit of 20 per round would refuse)."""
    from fl_client.config import SiteConfig
    from fl_client.limits import SiteLimits

    default = SiteLimits()
    limits = replace(default, max_local_epochs=max(default.max_local_epochs, epochs_budget))
    return {
        name: SiteConfig(
            site_name=name,
            dicom_dir=data_root / name / "dicom",
            site_dir=work_root / name,
            labels_csv=data_root / name / "labels.csv",
            device="cpu",
            limits=limits,
        )
        for name in site_names(data_root)
    }


def _initial_state(config: Any) -> dict[str, Any]:
    """The server's initial weights for this seed (fl_server.server_app.run_federation does the same)."""
    import torch

    from models.factory import build_model

    torch.manual_seed(config.seed)
    return {k: v.detach().clone() for k, v in build_model(config.model).state_dict().items()}


def score(sites: Mapping[str, Any], settings: Any, state: Mapping[str, Any], *, external: Any = None) -> dict[str, Any]:
    """fedct's evaluation of ``state`` at every site (test split) and its aggregate over sites; with ``external`` (the
    family's :class:`ExternalFamily`) also its figures on the external validation family."""
    from fl_client.train import evaluate_round
    from fl_server.run_log import aggregate

    per_site = {name: evaluate_round(site, settings, state) for name, site in sites.items()}
    overall = aggregate(per_site)
    keys = [k for k, _ in FIGURES] + ["test-n", "test-n-events"]
    result = {
        "overall": {k: overall.get(k) for k in keys},
        "sites": {n: {k: m.get(k) for k in keys} for n, m in per_site.items()},
    }
    if external is not None:
        from inference.external import score_external

        result["external"] = score_external(
            state,
            model=settings.model,
            pipeline=settings.pipeline,
            dicom_dir=external.dicom_dir,
            labels_csv=external.labels_csv,
            work_dir=external.work_dir,
        ).metrics()
    return result


@dataclass(frozen=True)
class ExternalFamily:
    """Where the external validation family lives: its DICOM and labels, and its ingestion folder."""

    dicom_dir: Path
    labels_csv: Path
    work_dir: Path


def external_family(root: Path, work_dir: Path, *, studies: int, small: bool) -> ExternalFamily:
    """The external validation family under ``root`` (written by :mod:`synthetic.external` unless already there with
    the same settings), never used for training; ingested into ``work_dir`` when scored. A family of other settings
    is removed first, with its ingestion (:func:`synthetic.external.ensure_external_family`)."""
    from synthetic.external import ensure_external_family

    root = Path(root)
    ensure_external_family(root, studies=studies, seed=0, small=small, derived=(Path(work_dir),))
    return ExternalFamily(root / "dicom", root / "labels.csv", Path(work_dir))


def train_pooled(sites: Mapping[str, Any], settings: Any, state: Mapping[str, Any], *, epochs: int) -> dict[str, Any]:
    """All sites' training studies in one loader, ``epochs`` epochs of fedct's training loop; returns the weights."""
    return train_pooled_at(sites, settings, state, epochs=(epochs,))[epochs]


def train_pooled_at(
    sites: Mapping[str, Any], settings: Any, state: Mapping[str, Any], *, epochs: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """:func:`train_pooled` to the last of ``epochs`` (increasing), its weights after each of them: one training run
    (one Adam, one data order), each snapshot with its own BatchNorm recalibration; ``{epochs: weights}``."""
    import copy

    import torch
    from monai.data import DataLoader
    from monai.utils import set_determinism
    from torch.utils.data import ConcatDataset

    from fl_client.train import load_site, recalibrate_batch_norm, train_model
    from models.factory import build_model
    from preprocessing.cache import make_dataset

    set_determinism(seed=settings.seed * 1000 + 1)
    device = torch.device("cpu")

    def loader(augment: bool) -> DataLoader:
        parts = []
        for site in sites.values():
            manifest = load_site(site, settings)
            items = [e.item() for e in manifest.split("train", labelled_only=False)]
            parts.append(make_dataset(items, settings.pipeline, manifest.site_dir, augment=augment))
        generator = torch.Generator().manual_seed(settings.seed * 1000 + 1)
        return DataLoader(
            ConcatDataset(parts), batch_size=settings.batch_size, shuffle=augment, num_workers=0, generator=generator
        )

    marks = list(epochs)
    if not marks or marks != sorted(set(marks)) or marks[0] < 1:
        raise ValueError(f"epochs must be increasing positive counts, got {marks!r}")
    model = build_model(settings.model)
    model.load_state_dict(dict(state))
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    train_loader = loader(True)
    out: dict[int, dict[str, Any]] = {}
    done = 0
    for mark in marks:
        train_model(
            model,
            train_loader,
            epochs=mark - done,
            lr=settings.learning_rate,
            device=device,
            loss_weights=settings.loss_weights,
            optimiser=optimiser,
        )
        done = mark
        snapshot = copy.deepcopy(model) if mark != marks[-1] else model
        recalibrate_batch_norm(snapshot, loader(False), device=device)
        out[mark] = {k: v.detach().cpu().clone() for k, v in snapshot.state_dict().items()}
    return out


def run_federated(config: Any, data_root: Path, work_root: Path, n_sites: int) -> dict[str, Any]:
    """One federated run in Flower's simulation engine with fedct's apps; returns its metrics.json."""
    from flwr.simulation import run_simulation

    from fedct.demo import simulation_backend_config
    from fl_client.client_app import build_client_app
    from fl_server.server_app import build_server_app

    run_simulation(
        server_app=build_server_app(config.to_run_config()),
        client_app=build_client_app({"sim-data-root": str(data_root), "sim-work-root": str(work_root)}),
        num_supernodes=n_sites,
        backend_config=simulation_backend_config(),
    )
    path = config.run_path / "metrics.json"
    if not path.is_file():
        raise RuntimeError(f"the federated run wrote no {path} (see the log above)")
    return json.loads(path.read_text())


def final_state(config: Any) -> dict[str, Any]:
    """The final global model of a federated run (its ``model/final`` bundle), to be scored like every other arm:
    by fedct's evaluation at each site, not by the metrics the sites sent (those pass the privacy floor)."""
    from models.bundle import load_bundle

    model, _ = load_bundle(config.run_path / "model" / "final")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def round_state(config: Any, server_round: int) -> dict[str, Any]:
    """The global weights of a federated run after ``server_round`` (its ``checkpoints/round-NNN.pt``)."""
    import torch

    path = config.run_path / "checkpoints" / f"round-{server_round:03d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"the federated run wrote no {path}")
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def _summaries(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": {}, "sites": {}, "external": {}}
    for key, _ in FIGURES:
        out["overall"][key] = summarise(r["overall"].get(key) for r in per_seed)
        for site in per_seed[0]["sites"]:
            out["sites"].setdefault(site, {})[key] = summarise(r["sites"][site].get(key) for r in per_seed)
    for key, _ in EXTERNAL_FIGURES:
        out["external"][key] = summarise(r.get("external", {}).get(key) for r in per_seed)
    return out


def plot(path: Path, arms: Mapping[str, Any]) -> Path:
    """Bar chart: per arm, each site's and the overall test macro AUC and C-index (mean, error bar = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(arms)
    sites = sorted(next(iter(arms.values()))["summary"]["sites"])
    groups = ["overall", *sites]
    fig, axes = plt.subplots(1, 3, figsize=(max(14, 1.6 * len(names) * 3), 4.5))
    width = 0.8 / len(groups)
    for ax, (key, title) in zip(axes[:2], (FIGURES[0], FIGURES[2]), strict=True):
        x = np.arange(len(names))
        for g, group in enumerate(groups):
            stats = [arms[a]["summary"]["overall" if group == "overall" else "sites"] for a in names]
            stats = [s[key] if group == "overall" else s[group][key] for s in stats]
            means = [s["mean"] if s["mean"] is not None else float("nan") for s in stats]  # undefined: no bar
            errors = [s["std"] or 0.0 for s in stats]
            ax.bar(
                x + (g - (len(groups) - 1) / 2) * width,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=group,
                color="black" if group == "overall" else None,
                alpha=1.0 if group == "overall" else 0.75,
            )
        ax.axhline(0.5, color="red", linestyle=":", linewidth=1)
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"held-out test: {title} (no bar: undefined, e.g. no event at that site)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    key, title = EXTERNAL_FIGURES[0]
    stats = [arms[a]["summary"].get("external", {}).get(key, {}) for a in names]
    x = np.arange(len(names))
    axes[2].bar(
        x,
        [s.get("mean") if s.get("mean") is not None else float("nan") for s in stats],
        0.6,
        yerr=[s.get("std") or 0.0 for s in stats],
        capsize=2,
        color="tab:purple",
    )
    axes[2].axhline(EXTERNAL_AUC_GOAL, color="green", linestyle="--", linewidth=1, label=f"goal {EXTERNAL_AUC_GOAL:g}")
    axes[2].axhline(0.5, color="red", linestyle=":", linewidth=1)
    axes[2].set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    axes[2].set_ylim(0.0, 1.02)
    axes[2].set_title(title, fontsize=9)
    axes[2].grid(alpha=0.3, axis="y")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: Written after every finished arm run (per seed); ``--resume`` continues from it.
PARTIAL_NAME = "quality.partial.json"


def plan_record_of(plan: QualityPlan) -> dict[str, Any]:
    """What must match for a partial result to be continued (the run config's overrides included)."""
    from fl_server.config import ServerConfig

    return {
        "sites": plan.sites,
        "patients_per_site": plan.patients_per_site,
        "small_images": plan.small,
        "seeds": list(plan.seeds),
        "rounds": plan.rounds,
        "local_epochs": plan.local_epochs,
        "strategies": list(plan.strategies),
        "run_config": {k: plan.run_config[k] for k in sorted(plan.run_config)},
        "external_studies": plan.external_studies,
        "site_images": list(plan.site_images) if plan.site_images else None,
        "external_small": plan.small if plan.external_small is None else plan.external_small,
        "randomisation": plan.randomisation,
        "score_at": list(plan.score_at),
        "federated_local_epochs": plan.fed_local_epochs,
        # every arm is scored as the run config evaluates (a partial of one-view scores is not continued with flips)
        "test_time_flips": str(plan.run_config.get("test-time-flips", ServerConfig.test_time_flips)),
    }


def load_partial(
    path: Path, plan_record: Mapping[str, Any]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Finished arm runs and their seconds from a partial result written for the same plan; empty when there is none.

    Only arms, seeds and sizes of this plan are kept; a partial result of another plan (other sizes, rounds,
    budget or run config) is refused with the differences named, rather than mixed into this one.
    """
    path = Path(path)
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    theirs = data.get("plan")
    if not isinstance(theirs, dict):
        raise ValueError(
            f"{path}: no plan recorded, cannot tell whether it belongs to this run; move it away to start over"
        )
    sizes = (
        "sites",
        "patients_per_site",
        "small_images",
        "rounds",
        "local_epochs",
        "run_config",
        "external_studies",
        "site_images",
        "external_small",
        "randomisation",
        "federated_local_epochs",
        "test_time_flips",
    )
    # partial results from before the strength existed: full strength; before federated local epochs: local epochs;
    # before test-time flips: scored with one view
    theirs = {
        "randomisation": 1.0,
        "federated_local_epochs": theirs.get("local_epochs"),
        "test_time_flips": "",
        **theirs,
    }
    differ = [
        f"{k}: {theirs.get(k)!r} there, {plan_record[k]!r} here" for k in sizes if theirs.get(k) != plan_record[k]
    ]
    if differ:
        raise ValueError(f"{path} was written for another plan ({'; '.join(differ)}); move it away to start over")
    bases = ["pooled", *(f"federated:{s}" for s in plan_record["strategies"])]
    wanted_arms = {*bases, *(f"{b}@{e}" for b in bases for e in plan_record.get("score_at", []))}
    per_seed = {
        arm: [r for r in results if r.get("seed") in plan_record["seeds"]]
        for arm, results in data.get("per_seed", {}).items()
        if arm in wanted_arms or arm.startswith("local:")
    }
    per_seed = {arm: results for arm, results in per_seed.items() if results}
    seconds = {arm: float(v) for arm, v in data.get("seconds", {}).items() if arm in per_seed}
    return per_seed, seconds


def run(options: BenchOptions, *, strategies: Sequence[str] | None = None, plan: QualityPlan | None = None) -> Path:
    """Run the comparison and write ``quality.json`` and ``quality.png``; returns the JSON's path. ``plan``: another
    size than ``options``' (e.g. :func:`medium_plan`)."""
    from fl_client.train import train_round
    from preprocessing.ingest import prepare_site

    started = time.perf_counter()
    plan = plan if plan is not None else plan_for(options, strategies=strategies)
    out = Path(options.out)
    work = out / "work" / "quality"
    # Every configuration is checked before anything runs.
    configs = {
        (s, seed): _server_config(plan, seed=seed, run_dir=work / "runs" / f"{s}-seed{seed}", strategy=s)
        for s in plan.strategies
        for seed in plan.seeds
    }
    data_root = synthetic_sites(
        work / "data",
        sites=plan.sites,
        patients_per_site=plan.patients_per_site,
        seed=0,
        small=plan.small,
        images=plan.site_images,
        randomised=plan.randomisation,  # issue #20.1: the lesions are the signal
    )
    work_root = work / "sites"
    budget = plan.rounds * plan.local_epochs
    sites = _site_configs(data_root, work_root, epochs_budget=max(budget, plan.fed_local_epochs))
    base = next(iter(configs.values()))
    for site in sites.values():  # ingest once; every arm reads the same caches and splits
        prepare_site(
            site.dicom_dir,
            site.site_dir,
            labels_csv=site.labels_csv,
            pipeline=base.pipeline,
            split=base.round_settings(1).split,
        )
    external = external_family(
        work / "external",
        work / "external-site",
        studies=plan.external_studies,
        small=plan.small if plan.external_small is None else plan.external_small,
    )
    partial_path = out / PARTIAL_NAME
    plan_record = plan_record_of(plan)
    per_seed, seconds = load_partial(partial_path, plan_record) if options.resume else ({}, {})
    if per_seed:
        print(
            f"bench quality: continuing {partial_path}: {sum(map(len, per_seed.values()))} arm runs already done",
            flush=True,
        )

    def done(arm: str, seed: int) -> bool:
        return any(r["seed"] == seed for r in per_seed.get(arm, []))

    def record(arm: str, result: dict[str, Any], t0: float) -> None:
        per_seed.setdefault(arm, []).append(result)
        seconds[arm] = seconds.get(arm, 0.0) + time.perf_counter() - t0
        # every finished arm is kept at once: the full mode runs for hours, an interrupted run still shows what it
        # got, and ``--resume`` continues from it
        partial_path.write_text(
            json.dumps({"plan": plan_record, "per_seed": per_seed, "seconds": seconds}, indent=1, default=str)
        )

    for seed in plan.seeds:
        config = configs[(plan.strategies[0], seed)]
        settings = replace(config.round_settings(1), local_epochs=budget)
        state0 = _initial_state(config)
        if not all(done(arm, seed) for arm in ("pooled", *(f"pooled@{e}" for e in plan.score_at))):
            t0 = time.perf_counter()
            pooled_states = train_pooled_at(sites, settings, state0, epochs=(*plan.score_at, budget))
            for epochs, state in pooled_states.items():
                arm = "pooled" if epochs == budget else f"pooled@{epochs}"
                if not done(arm, seed):
                    record(arm, {"seed": seed, **score(sites, settings, state, external=external)}, t0)
                    t0 = time.perf_counter()
        for name, site in sites.items():
            if done(f"local:{name}", seed):
                continue
            t0 = time.perf_counter()
            state, _ = train_round(site, settings, state0)
            record(f"local:{name}", {"seed": seed, **score(sites, settings, state, external=external)}, t0)
        for strategy in plan.strategies:
            arm = f"federated:{strategy}"
            if all(done(a, seed) for a in (arm, *(f"{arm}@{e}" for e in plan.score_at))):
                continue
            t0 = time.perf_counter()
            config = configs[(strategy, seed)]
            run_federated(config, data_root, work_root, plan.sites)
            for epochs in plan.score_at:
                if not done(f"{arm}@{epochs}", seed):
                    state = round_state(config, epochs // plan.local_epochs)
                    record(f"{arm}@{epochs}", {"seed": seed, **score(sites, settings, state, external=external)}, t0)
                    t0 = time.perf_counter()
            if not done(arm, seed):
                record(arm, {"seed": seed, **score(sites, settings, final_state(config), external=external)}, t0)
    for results in per_seed.values():  # resumed arms: seed order, whatever order they finished in
        results.sort(key=lambda r: plan.seeds.index(r["seed"]))
    arms = {
        arm: {"per_seed": results, "summary": _summaries(results), "seconds": seconds[arm]}
        for arm, results in per_seed.items()
    }
    key = FIGURES[0][0]
    pooled = arms["pooled"]["summary"]["overall"][key]["mean"]
    locals_ = {a: v["summary"]["overall"][key]["mean"] for a, v in arms.items() if a.startswith("local:")}
    best_local = max(locals_, key=lambda a: locals_[a] if locals_[a] is not None else -1.0)
    verdict = {}
    for strategy in plan.strategies:
        fed = arms[f"federated:{strategy}"]["summary"]["overall"][key]["mean"]
        verdict[strategy] = {
            "federated_over_pooled": fed / pooled if fed is not None and pooled is not None and pooled > 0 else None,
            "target_federated_over_pooled": 0.99,
            "federated_minus_best_local": fed - locals_[best_local]
            if fed is not None and locals_[best_local] is not None
            else None,
            "best_local_arm": best_local,
            "external_auc_covid_vs_normal": arms[f"federated:{strategy}"]["summary"]["external"][
                EXTERNAL_FIGURES[0][0]
            ]["mean"],
            "target_external_auc_covid_vs_normal": EXTERNAL_AUC_GOAL,
        }
    # an arm still improving at the budget has not converged: its ratio to another arm says little
    curves = {
        base: [
            {
                "epochs": epochs,
                "internal_auc_macro": arms[name]["summary"]["overall"][key]["mean"],
                "external_auc_covid_vs_normal": arms[name]["summary"]["external"][EXTERNAL_FIGURES[0][0]]["mean"],
            }
            for epochs, name in [*((e, f"{base}@{e}") for e in plan.score_at), (budget, base)]
        ]
        for base in ("pooled", *(f"federated:{s}" for s in plan.strategies))
    }
    payload = {
        "what": "held-out test metrics of the final model of each arm (same initial weights per seed, same budget of local "
        "epochs — federated: rounds of plan.federated_local_epochs —, same training loop and metric code); "
        "overall = weighted mean of site values (macro AUC by test studies, "
        "C-index by events); pooled-auc-macro = AUC of all sites' predictions pooled. A local:<site> model is scored at "
        "every site. external = the same model on the external validation family (synthetic.external: another generator, "
        "never trained on). <arm>@E = the same training's model after E epochs (pooled) or E / local epochs rounds "
        "(federated), short of the budget; budget_curves lists them per arm. Mean/std over seeds.",
        "external_family": {"studies": plan.external_studies, "generator": "synthetic.external"},
        "plan": {
            **plan_record,
            "epochs_budget": budget,
            "model": base.model_name,
            "input_size": base.input_size,
            "size": plan.size or ("tiny" if options.tiny else "quick" if options.quick else "full"),
            "training_data": "domain-randomised",
        },
        "resumed": options.resume,
        "site_studies": {
            name: {
                s: len(
                    prepare_site(
                        site.dicom_dir,
                        site.site_dir,
                        labels_csv=site.labels_csv,
                        pipeline=base.pipeline,
                        split=base.round_settings(1).split,
                    ).split(s)
                )
                for s in ("train", "val", "test")
            }
            for name, site in sites.items()
        },
        "figures": {k: label for k, label in FIGURES},
        "arms": arms,
        "verdict_on_macro_auc": verdict,
        "budget_curves": curves,
    }
    plot(out / "quality.png", arms)
    return write_result(out, "quality", payload, options=options, started=started)


def _score_at_argument(text: str | None) -> list[int] | None:
    """``--score-at``: None (not given: the plan's default), ``none`` (only the budget) or comma-separated epochs."""
    if text is None:
        return None
    if text.strip() == "none":
        return []
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.quality --medium [--seeds 0,1] [--strategies fedavg] --out DIR``: the medium size, which the
    ``fedct bench`` command line does not offer."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.quality", description=main.__doc__)
    p.add_argument("--medium", action="store_true", required=True, help="the medium size (medium_plan)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--strategies", default="fedavg", help="comma-separated run-config strategies (default fedavg)")
    p.add_argument("--resume", action="store_true", help="continue from quality.partial.json in --out")
    p.add_argument(
        "--randomisation", type=float, default=1.0, help="domain randomisation strength in (0, 1] (default 1)"
    )
    p.add_argument("--patients", type=int, default=40, help="patients per site (default 40)")
    p.add_argument("--rounds", type=int, default=12, help="federated rounds (default 12)")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        help="local epochs per round (default 1); the pooled and local arms train rounds x local epochs",
    )
    p.add_argument(
        "--federated-local-epochs",
        type=int,
        default=None,
        help="local epochs per round of the federated arms only (default: --local-epochs); as many as there are sites "
        "gives each site the pooled arm's sequential optimisation steps per round",
    )
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key for every arm, over the medium size's own (repeatable; e.g. hu-max=-200)",
    )
    p.add_argument(
        "--score-at",
        default=None,
        metavar="EPOCHS",
        help="comma-separated epochs short of the budget at which the pooled and federated arms are scored too "
        "(from the same training; default: half the budget in whole rounds; 'none': only the budget)",
    )
    p.add_argument(
        "--external-studies",
        type=int,
        default=96,
        help="studies of the external validation family (default 96; its COVID-vs-normal AUC is only as sure as its "
        "95 %% interval, reported per arm: on 24 studies it is about twice as wide)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    overrides = {}
    for item in args.run_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--run-config wants KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    plan = medium_plan(
        seeds=[int(x) for x in args.seeds.split(",")],
        strategies=[x for x in args.strategies.split(",") if x],
        randomisation=args.randomisation,
        patients_per_site=args.patients,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        run_config=overrides,
        score_at=_score_at_argument(args.score_at),
        federated_local_epochs=args.federated_local_epochs,
        external_studies=args.external_studies,
    )
    print(run(BenchOptions(out=Path(args.out), quick=True, resume=args.resume), plan=plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
