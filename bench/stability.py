"""FedAvg stability across seeds: each federated variant's final model against pooled training (issue #20.5).

For every seed, the pooled arm and each federated *variant* (a strategy plus run-config overrides, e.g.
``fedavg``, ``fedavg:bn-mode=local``, ``fedavg:model-norm=group``) start from the same initial weights and get the
same budget of local epochs; every final model is scored by :func:`bench.quality.score` on the same held-out test
studies. The figure that matters is the *worst* seed's ratio federated / pooled test macro AUC, not the mean: a
default must never land on a bad final model.

Reuses the quality benchmark's public functions (``score``, ``train_pooled``, ``run_federated``, ``final_state``)
so that the figures are comparable with ``fedct bench quality``. Writes ``stability.json``.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m bench.stability --out /tmp/stab --variants fedavg,fedavg:bn-mode=local
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import quality
from bench.common import SMALL_RUN_CONFIG, synthetic_sites

KEY = "test-auc-macro"


@dataclass(frozen=True)
class Variant:
    """One federated arm: a strategy name and run-config overrides (values kept as the run config's strings)."""

    name: str
    strategy: str
    overrides: tuple[tuple[str, str], ...]


def parse_variant(text: str) -> Variant:
    """``strategy[:key=value[:key=value...]]`` -> :class:`Variant`; a malformed override is an error naming it."""
    strategy, *parts = text.strip().split(":")
    if not strategy:
        raise ValueError(f"variant {text!r}: no strategy name before ':'")
    overrides = []
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {text!r}: override {part!r} is not key=value")
        overrides.append((key, value))
    return Variant(name=text.strip(), strategy=strategy, overrides=tuple(overrides))


def _typed(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def run(
    out: Path,
    variants: Sequence[Variant],
    *,
    seeds: Sequence[int],
    sites: int = 3,
    patients_per_site: int = 30,
    rounds: int = 3,
    local_epochs: int = 3,
    run_config: Mapping[str, Any] | None = None,
) -> Path:
    """Score pooled and every variant for every seed; write and return ``out/stability.json``."""
    from preprocessing.ingest import prepare_site

    out = out.resolve()
    work = out / "work"
    base_rc = dict(SMALL_RUN_CONFIG if run_config is None else run_config)
    configs = {}
    for v in variants:
        for seed in seeds:
            plan = quality.QualityPlan(
                sites=sites,
                patients_per_site=patients_per_site,
                small=True,
                seeds=tuple(seeds),
                rounds=rounds,
                local_epochs=local_epochs,
                strategies=(v.strategy,),
                run_config={**base_rc, **{k: _typed(x) for k, x in v.overrides}},
            )
            run_dir = work / "runs" / f"{v.name.replace(':', '_').replace('=', '-')}-seed{seed}"
            configs[(v.name, seed)] = quality._server_config(plan, seed=seed, run_dir=run_dir, strategy=v.strategy)
    data_root = synthetic_sites(work / "data", sites=sites, patients_per_site=patients_per_site, seed=0, small=True)
    work_root = work / "sites"
    site_cfgs = quality._site_configs(data_root, work_root)
    base = next(iter(configs.values()))
    for site in site_cfgs.values():
        prepare_site(
            site.dicom_dir,
            site.site_dir,
            labels_csv=site.labels_csv,
            pipeline=base.pipeline,
            split=base.round_settings(1).split,
        )
    budget = rounds * local_epochs
    path = out / "stability.json"
    per_seed: dict[str, list[dict[str, Any]]] = json.loads(path.read_text())["per_seed"] if path.is_file() else {}

    def save() -> None:
        ratios = {}
        for v in variants:
            pairs = [
                (p[KEY], f[KEY])
                for p in per_seed.get("pooled", [])
                for f in per_seed.get(v.name, [])
                if p["seed"] == f["seed"]
            ]
            rs = [f / p for p, f in pairs if p and f is not None]
            ratios[v.name] = {"per_seed": rs, "min": min(rs) if rs else None, "mean": sum(rs) / len(rs) if rs else None}
        payload = {
            "what": f"final-model {KEY} per seed, pooled vs federated variants; ratio = federated / pooled",
            "plan": {
                "sites": sites,
                "patients_per_site": patients_per_site,
                "rounds": rounds,
                "local_epochs": local_epochs,
                "seeds": list(seeds),
                "run_config": base_rc,
            },
            "per_seed": per_seed,
            "ratio_to_pooled": ratios,
        }
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str))

    def done(arm: str, seed: int) -> bool:
        return any(r["seed"] == seed for r in per_seed.get(arm, []))

    for seed in seeds:
        config = configs[(variants[0].name, seed)]
        settings = replace(config.round_settings(1), local_epochs=budget)
        if not done("pooled", seed):
            t0 = time.perf_counter()
            state = quality.train_pooled(site_cfgs, settings, quality._initial_state(config), epochs=budget)
            s = quality.score(site_cfgs, settings, state)
            per_seed.setdefault("pooled", []).append(
                {"seed": seed, KEY: s["overall"].get(KEY), "seconds": time.perf_counter() - t0}
            )
            save()
        for v in variants:
            if done(v.name, seed):
                continue
            t0 = time.perf_counter()
            cfg = configs[(v.name, seed)]
            quality.run_federated(cfg, data_root, work_root, sites)
            s = quality.score(site_cfgs, replace(cfg.round_settings(1), local_epochs=budget), quality.final_state(cfg))
            per_seed.setdefault(v.name, []).append(
                {"seed": seed, KEY: s["overall"].get(KEY), "seconds": time.perf_counter() - t0}
            )
            save()
    save()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="fedavg", help="comma-separated strategy[:key=value...] federated arms")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--patients-per-site", type=int, default=30)
    args = p.parse_args(argv)
    variants = [parse_variant(t) for t in args.variants.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    path = run(
        args.out,
        variants,
        seeds=seeds,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        patients_per_site=args.patients_per_site,
    )
    print(json.dumps(json.loads(path.read_text())["ratio_to_pooled"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
