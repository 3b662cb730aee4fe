"""`medgen simulate`: every site of the study as a simulated Flower SuperNode on Ray, one machine.

Flower's simulation engine runs the ServerApp in this process and each site's ClientApp in a Ray
actor (``simulation.client_cpus`` CPUs each), or on an existing Ray cluster
(``simulation.ray_address``). Ray starts once per run, not per round. The local Ray is the run's
own (never a cluster someone started here with ``ray start``) and listens on 127.0.0.1 only
(``medgen/_compat/ray.py``): by default its GCS, raylet and workers listen on every interface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import warnings
from pathlib import Path

from medgen import logs
from medgen._compat.ray import ray_init_args
from medgen.config import Config, ConfigError
from medgen.data.dataset import cache_root
from medgen.server.errors import FederationError
from medgen.server.rundir import RunDir, open_run

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def resolve_data(cfg: Config, log=logs.info) -> Config:
    """With ``data.root`` null, make the phantom cohort for these sites (once; cached by its
    parameters) and point ``data.root`` at it. Paths become absolute: sites may run elsewhere."""
    cache = cache_root(cfg.data).resolve()
    if cfg.data.root is not None:
        return cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"root": Path(cfg.data.root).resolve(), "cache_dir": cache})})
    from medgen.data.phantom import synthesize_cohort

    spec = {"sites": cfg.sites.all, "subjects": cfg.phantom.subjects_per_site,
            "lesion_fraction": cfg.phantom.lesion_fraction, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
    folder = cache / "phantom" / key
    if not (folder / "done").is_file():
        log(f"making the phantom cohort ({len(spec['sites'])} sites x {spec['subjects']} subjects) in {folder}")
        synthesize_cohort(folder, spec["sites"], spec["subjects"], spec["seed"], spec["lesion_fraction"])
        (folder / "done").write_text(json.dumps(spec))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": folder, "cache_dir": cache})})


def release_hung_sites(loop_done: threading.Event, engine_done: threading.Event, grace_s: float,
                       log=logs.info) -> None:
    """Once the federated loop has returned, give the simulation engine ``grace_s``
    (``simulation.hung_grace_s``) to shut down; if it has not, a site's ClientApp actor does not
    answer (stopped, or stuck in a call) and Ray waits for it forever: kill the run's ClientApp
    actors, which lets the engine end. The run's outcome is already written."""
    loop_done.wait()
    if engine_done.wait(grace_s):
        return
    from medgen.deployment.procs import descendants

    stuck = []
    for pid in descendants(os.getpid()):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if name.startswith("ray::ClientAppActor"):
            stuck.append(pid)
            os.kill(pid, signal.SIGKILL)
    log(f"the run has ended, but a site's ClientApp process did not answer for {grace_s:g} s; "
        f"stopped the ClientApp actors ({', '.join(map(str, stuck)) or 'none found'})")


def resolve_client_cpus(cfg: Config) -> Config:
    """``simulation.client_cpus`` made concrete. null: at least 2 CPUs (and torch threads) per site,
    CPUs / training sites when the machine has more, never more than it has. On 2 cores that is one
    site at a time on both cores: 2 torch threads train a site 1.7x faster than 1, and the run
    comes within 1.24x of a plain loop (benchmarks/README.md, "Federation vs a plain PyTorch loop")."""
    if cfg.simulation.client_cpus is not None:
        return cfg
    cpus = os.cpu_count() or 1
    value = float(min(cpus, max(2, cpus // len(cfg.sites.train))))
    return cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update={"client_cpus": value})})


def simulate(cfg: Config | None = None, out: str | Path | None = None, resume: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = (), log=logs.info) -> RunDir:
    """Run (or, with ``resume``, continue) a simulated federation; returns its run directory.

    With ``resume`` the config is the run's own ``config.yaml`` plus ``overrides`` (e.g. more
    rounds). Raises FederationError when the run fails; finished rounds stay in the run directory.
    """
    cfg, run = open_run(cfg, out, resume, overrides)
    try:
        ray_args = ray_init_args(cfg.simulation.ray_address)
    except ValueError as e:
        raise ConfigError(f"simulation.ray_address={cfg.simulation.ray_address}: {e}") from None
    if cfg.simulation.ray_address is None:  # the sites train on this machine
        from medgen.client.task import check_device

        check_device(cfg)
    run.create(cfg)
    logs.to_run_log(run.path)
    data_cfg = resolve_client_cpus(resolve_data(cfg, log))

    from flwr.simulation import run_simulation

    from medgen.client.app import app as client_app
    from medgen.server.app import make_server_app

    # run_simulation is deprecated in favour of `flwr run` (a SuperLink plus an app bundle); it is
    # still Flower's in-process simulation engine, and it needs neither.
    logs.configure(logs.verbosity())  # importing flwr set its logger to DEBUG: errors only, unless -v
    backend = {"client_resources": {"num_cpus": data_cfg.simulation.client_cpus,
                                    "num_gpus": cfg.simulation.client_gpus},
               "init_args": {"include_dashboard": False, "log_to_driver": True, **ray_args,
                             "logging_level": logging.INFO if logs.verbosity() > 0 else logging.WARNING}}
    log(f"run directory: {run.path}")
    loop_done, engine_done = threading.Event(), threading.Event()
    if not cfg.simulation.ray_address:
        threading.Thread(target=release_hung_sites, args=(loop_done, engine_done, cfg.simulation.hung_grace_s, log),
                         daemon=True).start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(make_server_app(data_cfg, run, on_done=loop_done.set, log=log), client_app,
                           num_supernodes=len(cfg.sites.all), backend_config=backend)
    finally:
        engine_done.set()
    status = run.status()
    if status.get("status") != "completed":
        raise FederationError(f"simulation did not complete: {status.get('error', status.get('status'))} "
                              f"(run directory {run.path})")
    return run
