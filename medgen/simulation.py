"""`medgen simulate`: every site of the study as a simulated Flower SuperNode on Ray, one machine.

As Flower 1.41 runs a local simulation (what `flwr run` does): a SuperLink in simulation mode on
127.0.0.1 (a child process, its log in ``<run>/simulation/superlink.log``) is handed the study as a
run — an app bundle naming medgen's ServerApp and ClientApp, the resolved config and the run
directory in its run config, the SuperNodes and their Ray resources (``simulation.client_cpus`` /
``client_gpus``) in its simulation config. Flower's simulation process then runs the ServerApp and
each site's ClientApp in a Ray actor; what it prints goes to ``<run>/simulation/console.log``,
which this process prints as it grows (with a bar of the rounds on a terminal). Ray starts once
per run, not per round. The local Ray is the run's own (never a
cluster someone started here with ``ray start``) and listens on 127.0.0.1 only; or it is an
existing cluster (``simulation.ray_address``) — ``medgen/_compat/ray.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from medgen import logs
from medgen._compat.ray import ray_environment
from medgen.config import Config, ConfigError, dump_config
from medgen.server.errors import FederationError, StudyRefused
from medgen.server.rundir import RunDir, open_run

LINK_TIMEOUT_S = 60.0  # how long the SuperLink may take to answer on /health
POLL_S = 0.25  # how often the run directory (console, checkpoints, outcome) is read
STATUS_POLL_S = 2.0  # how often Flower is asked about the run (each ask costs both processes CPU)
GRID_PULL_S = 0.02  # how often the ServerApp's Grid looks for replies (Flower's default 0.1 s; in-memory)
CONSOLE_FILE = "console.log"  # under <run>/simulation/: the ServerApp's console output
DONE_FILE = "done"  # under <run>/simulation/: written when the ServerApp has returned

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def resolve_data(cfg: Config, log=logs.info) -> Config:
    """With ``data.root`` null, make the phantom cohort for these sites (once; cached by its
    parameters) and point ``data.root`` at it. Paths become absolute: sites may run elsewhere."""
    from medgen.data.dataset import cache_root

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


def stop_hung_sites(grace_s: float, log=logs.info) -> None:
    """The ServerApp's loop has returned, but Flower's simulation has not ended ``grace_s``
    (``simulation.hung_grace_s``) later: a site's ClientApp actor does not answer (stopped, or stuck
    in a call) and Ray waits for it for ever. Kill the run's ClientApp actors, which lets it end.
    The run's outcome is already written."""
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
    site at a time on both cores: 2 torch threads train a site 1.5-1.7x faster than 1 (benchmarks/README.md,
    "Federation vs a plain PyTorch loop", for the run against a plain loop)."""
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
    ``log`` takes this process' lines; the ServerApp's are printed here as they come (at the
    verbosity of ``medgen.logs``) and go to ``run.log``.
    """
    cfg, run = open_run(cfg, out, resume, overrides)
    try:
        ray_env = ray_environment(cfg.simulation.ray_address)
    except ValueError as e:
        raise ConfigError(f"simulation.ray_address={cfg.simulation.ray_address}: {e}") from None
    cpus = resolve_client_cpus(cfg).simulation.client_cpus
    if cpus != int(cpus):
        raise ConfigError(f"simulation.client_cpus={cpus:g}: Flower's simulation reserves whole CPUs per site")
    if cfg.simulation.ray_address is None and cfg.train.device != "cpu":  # the sites train on this machine
        from medgen.client.task import check_device  # imports torch; a CPU needs no check

        check_device(cfg)
    run.create(cfg)
    run.path = run.path.resolve()
    logs.to_run_log(run.path)
    run.set_status("starting")
    (run.path / "simulation" / DONE_FILE).unlink(missing_ok=True)
    link = start_link(run.path / "simulation", ray_env)  # it starts while the data is made ready
    try:
        data_cfg = resolve_client_cpus(resolve_data(cfg, log))
        log(f"run directory: {run.path}")
        run_on(link, data_cfg, run, log)
    finally:
        # once the ServerApp has returned, nothing in Flower's or Ray's processes holds anything of
        # the run: Ray's own shutdown on SIGTERM takes ~3.5 s, so what is left after 1 s gets SIGKILL
        link.stop(timeout=1.0 if (run.path / "simulation" / DONE_FILE).is_file() else 10.0)
    status = run.status()
    if status.get("status") != "completed":
        error = StudyRefused if status.get("refused") else FederationError  # refused: by the sites' policies
        raise error(f"simulation did not complete: {status.get('error', status.get('status'))} "
                    f"(run directory {run.path})")
    return run


def start_link(work: Path, ray_env: dict[str, str]):
    """A ``flower-superlink --simulation`` on a free port of 127.0.0.1 (a ``procs.Child``), its
    output and its SuperExec's in ``work/superlink.log``: warnings and errors, everything with -v."""
    from medgen.deployment.procs import Child, flower_bin, flower_env, free_port
    from medgen.progress import ENV as PROGRESS_ENV

    port = free_port()
    level = "INFO" if logs.verbosity() > 0 else "WARNING"
    env = flower_env(work / "flwr-home", {**ray_env, "FLWR_LOG_LEVEL": level, PROGRESS_ENV: "0"})
    link = Child("SuperLink", [flower_bin("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
                               "--port", str(port), "--isolation", "subprocess",
                               "--disable-runtime-dependency-installation"], work / "superlink.log", env=env)
    link.address = f"127.0.0.1:{port}"
    return link


def run_on(link, cfg: Config, run: RunDir, log=logs.info) -> None:
    """The study ``cfg`` (resolved: data folder, CPUs) as a run of the simulation SuperLink ``link``,
    followed until the ServerApp (``medgen.server.app``, its ``simulated`` branch) has written the
    outcome and the report to ``run``, or Flower says the run has finished (see ``_follow``). On
    Ctrl-C / SIGTERM the run is stopped and marked resumable."""
    from medgen._compat.flwr import SimulationConfig
    from medgen.deployment.fab import build_fab
    from medgen.deployment.handshake import medgen_version
    from medgen.deployment.link import Control, wait_healthy
    from medgen.deployment.procs import shielded
    from medgen.progress import track

    verbose = logs.verbosity() > 0
    control, run_id, finished = None, None, False
    try:
        wait_healthy(link.address, None, LINK_TIMEOUT_S, link)
        control = Control(link.address, None)
        sim = cfg.simulation
        resources = SimulationConfig(
            num_supernodes=len(cfg.sites.all), backend="ray", verbose=verbose,
            client_resources_num_cpus=int(sim.client_cpus), client_resources_num_gpus=sim.client_gpus,
            init_args_logging_level="INFO" if verbose else "WARNING", init_args_log_to_driver=True)
        run_id = control.start_run(build_fab(medgen_version()), {
            "simulation": str(logs.verbosity()), "medgen-config": dump_config(cfg), "run-dir": str(run.path)}, resources)
        rounds = range(run.last_round() + 1, cfg.federation.rounds + 1)
        for _ in track(_follow(control, run_id, link, run, sim.hung_grace_s, log), f"study: {len(rounds)} rounds",
                       total=len(rounds), unit="rounds"):
            pass
        finished = True
        _, sub_status, details = control.run_status(run_id)
        if sub_status != "completed" and run.status().get("status") not in ("completed", "failed"):
            run.set_status("failed", round=run.last_round(),
                           error=f"Flower's simulation {sub_status}: {details} (log: {link.log_file})")
    except (KeyboardInterrupt, SystemExit) as e:
        with shielded():
            link.stop()  # the ServerApp first: its last words must not hide that the run was stopped
            if run.status().get("status") not in ("completed", "failed"):
                how = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
                run.set_status("failed", round=run.last_round(),
                               error=f"stopped ({how}); continue with `medgen simulate --resume {run.path}`")
        raise
    finally:
        if control is not None:
            if run_id is not None and not finished and link.running():
                try:
                    control.stop_run(run_id)
                except Exception:  # the link is stopped next, which ends the run anyway
                    pass
            control.close()


def _follow(control, run_id: int, link, run: RunDir, grace_s: float, log):
    """Until the ServerApp has written the run's outcome, or Flower says the run has finished:
    print the ServerApp's console lines and yield once per round checkpointed. Once the outcome
    is written nothing is left to wait for (Flower would shut Ray down, ≈2 s): the caller stops the
    SuperLink's tree. When the ServerApp returned without an outcome and Flower still waits
    ``grace_s`` later, the ClientApp actors keeping it waiting are stopped (``stop_hung_sites``)."""
    from medgen.deployment.link import DeploymentError
    from medgen.deployment.server import Follower

    console = Follower(run.path / "simulation" / CONSOLE_FILE, lambda line: print(line, flush=True))
    done, loop_ended, asked = run.last_round(), None, 0.0
    while True:
        console.poll()
        if not link.running():
            raise DeploymentError(f"the simulation SuperLink exited (code {link.proc.returncode}); its log "
                                  f"({link.log_file}) ends:\n{link.tail()}")
        while run.last_round() > done:
            done += 1
            yield done
        if loop_ended is None and (run.path / "simulation" / DONE_FILE).is_file():
            loop_ended = time.monotonic()
        if loop_ended is not None and run.status().get("status") in ("completed", "failed"):
            break
        if time.monotonic() - asked >= STATUS_POLL_S:
            if control.run_status(run_id)[0] == "finished":
                break
            asked = time.monotonic()
        if loop_ended is not None and time.monotonic() - loop_ended > grace_s:
            stop_hung_sites(grace_s, log)
            loop_ended = float("inf")
        time.sleep(POLL_S)
    console.poll()
