"""Flower ServerApp: run config → strategy → round loop (checkpoints, metrics and model bundles).

The handler is thin: :class:`fl_server.config.ServerConfig` reads the run config, :func:`fl_server.strategy.build_strategy`
builds Flower's strategy, :func:`fl_server.rounds.run_federation` drives it round by round with the round loop
:func:`round_loop_class` chooses (SecAgg+'s or the plain one). With a model registry (``model-registry``),
:mod:`fl_server.campaign` checks ``init-from`` before the first round and registers the final bundle at the end, and
:mod:`fl_server.champion` sends the registry's champion to the sites before the first round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_server.campaign import finish_campaign, prepare_campaign
from fl_server.champion import send_champion
from fl_server.config import ServerConfig, SiteRegistry
from fl_server.privacy import privacy_round_extras, wrap_strategy
from fl_server.rounds import RoundLoop, run_federation
from fl_server.secagg import SecAggRoundLoop
from fl_server.strategy import build_strategy

__all__ = ["app", "build_server_app", "round_loop_class", "run_federation"]


def round_loop_class(config: ServerConfig) -> type[RoundLoop]:
    """The round loop the run asks for: SecAgg+'s with ``secure-aggregation = true``, else the plain one."""
    return SecAggRoundLoop if config.privacy.secure_aggregation else RoundLoop


def build_server_app(run_config_overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``run_config_overrides`` stand in for the run config where Flower passes none
    (in-process simulation)."""
    overrides = dict(run_config_overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ServerConfig.from_run_config({**dict(context.run_config), **overrides})
        registry = SiteRegistry.from_environ()  # FEDCT_SITE_REGISTRY (fedct server start): who each node is
        campaign = prepare_campaign(config)  # init-from weights (refused here, before round 1) and the champion
        send_champion(grid, config, registry=registry)  # the sites get the current champion (fl_server/champion.py)
        strategy = wrap_strategy(
            build_strategy(config), config.privacy, expected_sites=config.min_sites
        )  # DP wrapper if dp-mode
        run_log = run_federation(
            grid,
            config,
            strategy,
            round_extras=privacy_round_extras(strategy),
            registry=registry,
            loop_class=round_loop_class(config),
            initial=campaign.initial,
            champion=campaign.champion_pair,
        )
        finish_campaign(
            config,
            campaign,
            config.run_path,
            champion_evaluation=run_log.champion_evaluation,
            aggregated_rounds=sum(1 for r in run_log.rounds if not r.get("skipped")),
        )

    return app


#: Entry point named in pyproject.toml ([tool.flwr.app.components] serverapp).
app = build_server_app()
