"""The coordinator: a Flower ServerApp running medgen's federated loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medgen import logs
from medgen.config import Config
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir


def make_server_app(cfg: Config, run: RunDir, on_done=None, log=logs.info) -> ServerApp:
    """The simulation's ServerApp, logging with ``log``; ``on_done()`` is called when its loop has
    returned, however."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg, run, log)
        finally:
            if on_done is not None:
                on_done()

    return app


# Deployment: `medgen-server start` submits this app to the SuperLink (see medgen/deployment/fab.py);
# the run config carries the medgen config (YAML text) and the run directory; medgen-server hands
# over the run's study signature (medgen/deployment/signing.py), which goes into every message.
app = ServerApp()


@app.main()
def deployed(grid: Grid, context: Context) -> None:
    from medgen.config import load_config_text
    from medgen.deployment.grid import quick_replies
    from medgen.deployment.signing import wait_for_signature
    from medgen.server.errors import FederationError
    from medgen.server.rundir import FileLog

    rc = context.run_config
    if not rc.get("medgen-config") or not rc.get("run-dir"):
        raise FederationError("the run config lacks medgen-config / run-dir: start runs with `medgen-server start`")
    run = RunDir(str(rc["run-dir"]))
    study = wait_for_signature(run.path, context.run_id)  # medgen-server signs the run once it has its id
    site_nodes = dict(pair.split("=") for pair in str(rc.get("site-nodes") or "").split(",") if pair)
    run_federation(quick_replies(grid), load_config_text(str(rc["medgen-config"])), run,
                   FileLog(run.path / "server.log"), {site: int(node) for site, node in site_nodes.items()}, study)
