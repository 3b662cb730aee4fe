"""The coordinator: a Flower ServerApp running medgen's federated loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medgen import logs
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir


# The module-level ServerApp serves every way of starting a run:
# - `medgen simulate`: Flower's simulation on a SuperLink of its own (medgen/simulation.py); the run
#   config carries the resolved medgen config (YAML text), the run directory and, as `simulation`,
#   the console verbosity;
# - deployment: `medgen-server start` submits it to its SuperLink (medgen/deployment/fab.py); the run
#   config carries the medgen config (YAML text), the run directory and the version handshake;
#   medgen-server hands over the run's study signature (medgen/deployment/signing.py), which goes
#   into every message;
# - `flwr run .` from the repository root: Flower's local simulation (medgen/server/flwrrun.py); the
#   run config is the repository's pyproject.toml [tool.flwr.app.config] plus --run-config.
# Only medgen-server's run config has medgen-version (the repository's pyproject does not list it, so
# `flwr run --run-config` cannot set it). A deployed site refuses a run without the handshake or the
# signature either way (medgen/client/app.py), so choosing the path here weakens nothing at a site.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config.get("medgen-version"):
        deployed(grid, context)
    elif context.run_config.get("simulation"):
        simulated(grid, context)
    else:
        from medgen.server.flwrrun import run_flwr

        run_flwr(grid, dict(context.run_config))


def simulated(grid: Grid, context: Context) -> None:
    import sys

    from medgen._compat.flwr import quick_simulation_pulls
    from medgen.config import load_config_text
    from medgen.simulation import CONSOLE_FILE, DONE_FILE, GRID_PULL_S

    rc = context.run_config
    run = RunDir(str(rc["run-dir"]))
    quick_simulation_pulls(grid, GRID_PULL_S)  # a reply is seen 0.02 s after it arrives, not up to 0.1 s
    # Flower's simulation process has no terminal (its output goes nowhere): what the ServerApp and
    # the Ray actors print goes to a file that `medgen simulate` prints as it grows
    sys.stdout = sys.stderr = (run.path / "simulation" / CONSOLE_FILE).open("a", buffering=1, encoding="utf-8")
    logs.configure(int(rc["simulation"]))
    logs.to_run_log(run.path)
    try:
        run_federation(grid, load_config_text(str(rc["medgen-config"])), run, logs.info)
        from medgen.evaluation.report import build_report

        build_report(run.path)  # here, where torch and the evaluation code are imported already
    finally:
        (run.path / "simulation" / DONE_FILE).touch()


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
