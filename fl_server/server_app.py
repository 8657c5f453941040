"""Flower ServerApp: run config → strategy → round loop (checkpoints, metrics and model bundles).

The handler is thin: :class:`fl_server.config.ServerConfig` reads the run config, :func:`fl_server.strategy.build_strategy`
builds Flower's strategy, :func:`fl_server.rounds.run_federation` drives it round by round with the round loop
:func:`round_loop_class` chooses (SecAgg+'s or the plain one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

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
        strategy = wrap_strategy(build_strategy(config), config.privacy, expected_sites=config.min_sites)  # DP wrapper if dp-mode
        run_federation(grid, config, strategy, round_extras=privacy_round_extras(strategy), registry=registry,
                       loop_class=round_loop_class(config))

    return app


#: Entry point named in pyproject.toml ([tool.flwr.app.components] serverapp).
app = build_server_app()
