"""Which aggregation strategy wins on the synthetic federation? All strategies in one Flower simulation.

Writes ``<out>/strategies.json``: for each strategy the last round's and the best round's validation macro AUC,
test macro AUC and validation loss (aggregated over sites), and the run's seconds. The sites, data and seeds are
the same for every strategy, so differences come from aggregation alone (at this size, a few hundredths are noise).

    PYTHONPATH=. .venv/bin/python bench/compare_strategies.py --out /abs/bench --rounds 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fl_client.client_app import build_client_app
from fl_server.config import STRATEGIES, ServerConfig
from fl_server.rounds import run_federation
from fl_server.strategy import build_strategy
from synthetic.hospitals import write_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients-per-site", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--model-name", default="smallcnn")
    parser.add_argument("--input-size", default="32,32,32")
    parser.add_argument("--target-spacing-mm", default="10.0,10.0,10.0")
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated runs: a strategy, optionally with run-config overrides, "
        "e.g. 'fedavg,fedavg:bn-mode=local,fedavg:model-norm=group'",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    data = out / "data"
    if not data.is_dir():
        write_federation(data, sites=args.sites, patients_per_site=args.patients_per_site, seed=0)
    strategies = [s for s in args.strategies.split(",") if s]
    results_path = out / "strategies.json"
    results = json.loads(results_path.read_text())["results"] if results_path.is_file() else {}
    app = ServerApp()

    @app.main()
    def server(grid, context):
        for name in strategies:
            strategy, *overrides = name.split(":")
            base = ServerConfig(
                strategy=strategy,
                num_server_rounds=args.rounds,
                local_epochs=args.local_epochs,
                model_name=args.model_name,
                input_size=args.input_size,
                target_spacing_mm=args.target_spacing_mm,
                learning_rate=args.learning_rate,
                min_sites=args.sites,
                run_dir=str(out / "runs" / name.replace(":", "_").replace("=", "-")),
            )
            config = ServerConfig.from_run_config({**base.to_run_config(), **dict(o.split("=", 1) for o in overrides)})
            t0 = time.perf_counter()
            run_log = run_federation(grid, config, build_strategy(config))
            last = run_log.rounds[-1]["evaluate"]["aggregate"]
            best = next(r for r in run_log.rounds if run_log.best and r["round"] == run_log.best.round)["evaluate"][
                "aggregate"
            ]
            results[name] = {
                "last_round": {k: last.get(k) for k in ("val-auc-macro", "test-auc-macro", "val-loss", "val-accuracy")},
                "best_round": run_log.best.round if run_log.best else None,
                "best": {k: best.get(k) for k in ("val-auc-macro", "test-auc-macro", "val-loss", "val-accuracy")},
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results_path.write_text(
                json.dumps({"settings": vars(args) | {"out": str(out)}, "results": results}, indent=2, default=str)
            )

    run_simulation(
        server_app=app,
        client_app=build_client_app({"sim-data-root": str(data), "sim-work-root": str(out / "sites")}),
        num_supernodes=args.sites,
        backend_config=simulation_backend_config(),
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
