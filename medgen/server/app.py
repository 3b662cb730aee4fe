"""The coordinator: a Flower ServerApp running medgen's federated loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medgen.config import Config
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir


def make_server_app(cfg: Config, run: RunDir) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run)

    return app
