"""`flwr run .`: the study as a run of Flower's local simulation SuperLink (Flower 1.41).

The repository's ``pyproject.toml`` names the ServerApp (``medgen.server.app:app``) and the
ClientApp, and lists the run config: ``config-file`` (a medgen YAML config; empty: the defaults,
on the phantom cohort), ``run-dir`` (empty: ``runs/<time>-<family>-<strategy>``), and every medgen
config key with the value ``""`` ("not set here"). A value given with ``flwr run . --run-config
'federation.rounds=1'`` overrides that key as ``medgen simulate --set federation.rounds=1`` does.

The simulated SuperNodes carry ``partition-id``; the ClientApp binds partition ``i`` to site
``sites.all[i]`` (``medgen/client/app.py``), so the federation needs exactly ``len(sites.all)``
SuperNodes (``--federation-config "num-supernodes=N"``). The run directory and its report are
written as by ``medgen simulate``; ``simulation.ray_address`` and ``simulation.hung_grace_s`` are
not used (the SuperLink runs Flower's own simulation engine; its federation config sets the Ray
resources).
"""

from __future__ import annotations

import time
from pathlib import Path

from medgen import logs
from medgen.config import Config, load_config
from medgen.server.errors import FederationError
from medgen.server.rundir import RunDir, open_run

RUN_KEYS = ("config-file", "run-dir")  # the run config keys that are not medgen config keys
NODES_WAIT_S = 10.0  # how long the simulated SuperNodes may take to appear (they exist when the ServerApp starts)


def overrides(run_config: dict) -> list[str]:
    """The ``key=value`` overrides of a run config: every medgen key whose value is not ``""``."""
    out = []
    for key, value in sorted(run_config.items()):
        if key in RUN_KEYS or value == "":
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        out.append(f"{key}={text}")
    return out


def open_flwr_run(run_config: dict) -> tuple[Config, RunDir]:
    """The config (``config-file`` plus the overrides) and the new run directory of a `flwr run`."""
    config_file = str(run_config.get("config-file") or "") or None
    cfg = load_config(Path(config_file).resolve() if config_file else None, overrides(run_config))
    run_dir = str(run_config.get("run-dir") or "") or None
    cfg, run = open_run(cfg, Path(run_dir).resolve() if run_dir else None, None)
    return cfg, RunDir(run.path.resolve())


def wait_for_nodes(grid, sites: list[str], wait_s: float = NODES_WAIT_S) -> None:
    """FederationError unless the simulation has one SuperNode per site (partition i is sites.all[i])."""
    deadline = time.monotonic() + wait_s
    while True:
        found = len(list(grid.get_node_ids()))
        if found >= len(sites) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if found != len(sites):
        raise FederationError(
            f"the local federation has {found} SuperNode(s) but the study has {len(sites)} sites "
            f"({', '.join(sites)}; sites.train + sites.heldout): run it with "
            f"`flwr run . --federation-config \"num-supernodes={len(sites)}\"`")


def run_flwr(grid, run_config: dict, log=logs.info) -> RunDir:
    """The ServerApp's work in a `flwr run` of the local simulation."""
    from medgen.client.task import check_device
    from medgen.server.federation import run_federation
    from medgen.simulation import resolve_client_cpus, resolve_data

    cfg, run = open_flwr_run(run_config)
    check_device(cfg)
    run.create(cfg)
    logs.to_run_log(run.path)
    log(f"run directory: {run.path}")
    try:
        wait_for_nodes(grid, cfg.sites.all)
    except FederationError as e:
        run.set_status("failed", round=0, error=str(e))
        log(f"FAILED: {e}")
        raise
    run_federation(grid, resolve_client_cpus(resolve_data(cfg, log)), run, log)
    from medgen.evaluation.report import build_report

    log(f"report: {build_report(run.path)}")
    return run
