"""Deployment (a real SuperLink and SuperNodes over loopback, TLS and SuperNode authentication)
against the simulation (Flower's engine on Ray) doing the same work, in one run.

Same config, cohort, seeds and rounds (sites A, B train, C held out):
  - simulation: `medgen.simulation.simulate` in this process;
  - deployment, worker: `medgen-server start` + three `medgen-client join` processes, each site's
    ClientApp in one long-lived worker process (medgen's default);
  - deployment, per-message: the same with `--clientapp per-message`, Flower's default isolation
    (a fresh `flwr-clientapp` process, importing torch and medgen, for every message).

For each: the wall time from the start until the run directory says `completed` (neither side
builds the HTML report; the deployment's includes starting the SuperLink and the SuperNodes
connecting), and the round period — the time between the ends of consecutive rounds (training,
evaluation, checkpoint) for rounds 2..N, i.e. the per-round cost once everything is up. The
ratios deployment / simulation are computed from numbers measured in this same run.

The phantom cohort and its slice cache are made before any timing.

Usage: python benchmarks/deployment.py [--rounds 4] [--steps 20] [--skip-per-message]
       [--out benchmarks/results/deployment.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medgen.client.task import site_data
from medgen.config import load_config
from medgen.deployment.certs import init_ca, make_site_keys
from medgen.deployment.procs import free_port
from medgen.server.rundir import RunDir
from medgen.simulation import resolve_data, simulate

BIN = Path(sys.executable).parent


def settings(rounds: int, steps: int, cache: Path) -> list[str]:
    return ["sites.train=[A,B]", "sites.heldout=[C]", "phantom.subjects_per_site=4", f"train.local_steps={steps}",
            "train.batch_size=16", "model.width=8", "model.latent_dim=16", "data.image_size=32",
            "federation.samples_per_class=2", f"federation.rounds={rounds}", f"data.cache_dir={cache}"]


def round_periods(run: RunDir) -> list[float]:
    """Seconds between the ends of consecutive rounds (the last record of each round)."""
    ends: dict[int, float] = {}
    for r in run.records():
        if r["round"] > 0:
            ends[r["round"]] = max(ends.get(r["round"], 0.0), r["time"])
    rounds = sorted(ends)
    return [ends[b] - ends[a] for a, b in zip(rounds, rounds[1:])]


TRACE = {"supernode_pull_s": re.compile(r"medgen-trace pull ([\d.]+) s"),
         "supernode_push_s": re.compile(r"medgen-trace push ([\d.]+) s"),
         "supernode_waits_for_reply_s": re.compile(r"after waiting ([\d.]+) s for the reply"),
         "worker_pull_s": re.compile(r"completed in [\d.]+ s \(pull ([\d.]+)"),
         "worker_app_s": re.compile(r"completed in [\d.]+ s \(pull [\d.]+, app ([\d.]+)"),
         "worker_push_s": re.compile(r"completed in [\d.]+ s \(.*push ([\d.]+)\)")}


def hops(state_dirs: list[Path]) -> dict:
    """Median seconds of each hop of a deployed exchange, over every message of the sites: the
    SuperNode's SuperLink requests for a message and for its reply (and its wait for the reply in
    between), the worker's pull from the SuperNode, medgen's ClientApp, the worker's push."""
    found: dict[str, list[float]] = {k: [] for k in TRACE}
    for folder in state_dirs:
        text = (folder / "supernode.log").read_text(errors="replace") if (folder / "supernode.log").is_file() else ""
        for key, pattern in TRACE.items():
            found[key] += [float(x) for x in pattern.findall(text)]
    return {k: {"median": round(statistics.median(v), 4), "n": len(v)} for k, v in found.items() if v}


def startup_s(run: RunDir, t_start: float) -> float:
    """Seconds from the start (``time.time()``) until round 1 began (its train phase)."""
    first = next(r for r in run.records() if r["round"] == 1 and r["site"] == "global" and r["phase"] == "train")
    return first["time"] - first["round-time-s"] - t_start


def run_simulation(sets: list[str], out: Path) -> dict:
    cfg = load_config(None, sets)
    t_start, t0 = time.time(), time.perf_counter()
    run = simulate(cfg, out=out, log=lambda _: None)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "startup_s": startup_s(run, t_start), "round_periods_s": round_periods(run)}


def run_deployment(sets: list[str], out: Path, work: Path, root: Path, cache: Path, clientapp: str) -> dict:
    certs = work / "certs"
    if not certs.is_dir():
        init_ca(certs)
        for site in "ABC":
            make_site_keys(certs, site)
    port = free_port()
    # one torch thread per site, as each simulated site has (simulation.client_cpus = 1): three sites
    # on these 2 cores with a thread per core each oversubscribe them (their training took 6-35x longer)
    env = {**os.environ, "MEDGEN_CACHE_DIR": str(cache), "MEDGEN_CLIENT_THREADS": "1"}
    logs = work / f"logs-{clientapp}"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name, args):
        return subprocess.Popen([str(a) for a in args], stdout=(logs / f"{name}.out").open("w"),
                                stderr=subprocess.STDOUT, env=env)

    t_start, t0 = time.time(), time.perf_counter()
    server = start("server", [BIN / "medgen-server", "start", "--address", "127.0.0.1", "--port", port,
                              "--certs", certs, "--out", out, *[x for kv in sets for x in ("--set", kv)]])
    policy = work / "policy.yaml"  # the safe default policy requires DP-SGD, which this study does not use
    policy.write_text("require_dp: false\n")
    sites = [start(f"site-{s}", [BIN / "medgen-client", "join", "--site", s, "--server", f"localhost:{port}",
                                 "--data", root / s, "--certs", certs, "--state-dir", work / f"state-{clientapp}-{s}",
                                 "--policy", policy, "--clientapp", clientapp]) for s in "ABC"]
    run = RunDir(out)
    try:
        while run.status().get("status") != "completed":
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode}: {(logs / 'server.out').read_text()[-3000:]}")
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        server.wait(timeout=300)
    finally:
        for p in [server, *sites]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [server, *sites]:
            p.wait(timeout=60)
    return {"wall_s": wall, "startup_s": startup_s(run, t_start), "round_periods_s": round_periods(run),
            "hops_s": hops([work / f"state-{clientapp}-{s}" for s in "ABC"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deployment.json"))
    parser.add_argument("--skip-per-message", action="store_true", help="leave out Flower's process per message (~4 min)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medgen-bench-deploy-"))
    cache = work / "cache"
    sets = settings(args.rounds, args.steps, cache)
    cfg = resolve_data(load_config(None, sets), log=lambda _: None)  # cohort + slice cache, before timing
    root = Path(cfg.data.root)
    for site in cfg.sites.all:
        site_data(cfg, site, root / site, heldout=site in cfg.sites.heldout)

    results = {"simulation": run_simulation(sets, work / "sim"),
               "deployment-worker": run_deployment(sets, work / "dep-worker", work, root, cache, "worker")}
    if not args.skip_per_message:
        results["deployment-per-message"] = run_deployment(sets, work / "dep-msg", work, root, cache, "per-message")
    sim = results["simulation"]
    for name, r in results.items():
        r["round_period_median_s"] = statistics.median(r["round_periods_s"])
        r["wall_ratio_vs_simulation"] = r["wall_s"] / sim["wall_s"]
        r["round_ratio_vs_simulation"] = r["round_period_median_s"] / statistics.median(sim["round_periods_s"])
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min_at_end": os.getloadavg()[0], "rounds": args.rounds, "local_steps": args.steps,
              "config": sets[:-1], "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"{'':26s} {'wall (s)':>9s} {'start-up (s)':>13s} {'round (s)':>10s} {'wall ratio':>11s} {'round ratio':>12s}")
    for name, r in results.items():
        print(f"{name:26s} {r['wall_s']:9.1f} {r['startup_s']:13.1f} {r['round_period_median_s']:10.2f} "
              f"{r['wall_ratio_vs_simulation']:11.2f} {r['round_ratio_vs_simulation']:12.2f}")
    for name, r in results.items():
        if r.get("hops_s"):
            print(f"{name} hops (median s, n): " + ", ".join(f"{k} {v['median']} ({v['n']})" for k, v in r["hops_s"].items()))
    print(f"written: {args.out}; run directories and logs: {work}")


if __name__ == "__main__":
    main()
