"""Federated simulation (Flower + Ray) against a plain PyTorch loop doing the same work.

Measures, in one run, at the default config (phantom cohort; sites A, B, C train, D held out):
  - federated: `medgen.simulation.simulate` wall time (Flower's simulation engine on Ray, for real),
    broken down from the run directory's time stamps: start-up (Ray + Flower + site actors, up to
    the first round), per round the training phase (`round-time-s`) against the sites' own
    `train-time-s`, the evaluation phase, and the server's per-round tail (sample grid, checkpoint);
  - plain: one process, no Flower, no Ray, no messages: for each round and training site, load the
    global weights into a model, `train_local` with the same data, steps and seeds, `FedAvg`, then
    `evaluate_local` on every site's evaluation slices, and on the full-evaluation rounds what a
    site's ClientApp adds (distances, anomaly detection, a training site's memorisation audit, under
    the server's evaluation plan) -- the same optimiser steps and evaluations.
    Also without evaluation, and without evaluation on one torch thread (the parallelism question);
  - the ratio federated / plain (issue #20's target: <= 1.10, <= 1.05 for the rounds alone);
  - scaling: round time for 2, 4, 8, 16 equal-size training sites (+ 1 held out), small sites and
    few local steps, with the plain loop's round time at each size for comparison.

The phantom cohort and its preprocessing are made before any timing (neither side pays for them).

Usage: python benchmarks/federation.py [--quick] [--cache DIR] [--out benchmarks/results/federation.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from medgen.client.task import evaluate_local, site_data, site_seed, train_local
from medgen.config import Config, load_config
from medgen.models import build_model
from medgen.server.federation import record_evaluation
from medgen.server.rundir import RunDir, load_checkpoint
from medgen.server.strategy import FedAvg, Update
from medgen.simulation import DONE_FILE, resolve_client_cpus, resolve_data, simulate

from medgen.evaluation.plan import EvaluationPlan, pooled_thresholds
from medgen.evaluation.site import evaluate_site  # the full evaluation the sites run on some rounds
from medgen.server.federation import is_full_evaluation


def _quiet(*_args, **_kwargs) -> None:
    pass


def prepare(cfg: Config) -> Config:
    """Make the phantom cohort and its slice cache now (and load every site once in this process)."""
    cfg = resolve_client_cpus(resolve_data(cfg, log=_quiet))
    for site in cfg.sites.all:
        site_data(cfg, site, Path(cfg.data.root) / site, heldout=site in cfg.sites.heldout)
    return cfg


def _data(cfg: Config) -> dict:
    root = Path(cfg.data.root)
    return {s: site_data(cfg, s, root / s, heldout=s in cfg.sites.heldout) for s in cfg.sites.all}


class OtherLoad:
    """CPU seconds used by processes that are not this one or its descendants (Ray's processes are
    ours), sampled from /proc every 0.5 s while the block runs, and the CPU time the hypervisor
    took away (steal): how contended a timing was."""

    def __init__(self) -> None:
        self.others_cpu_s, self.wall_s, self.steal_s = 0.0, 0.0, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _steal() -> float:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()
            return int(fields[8]) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    @staticmethod
    def _snapshot() -> tuple[dict[int, float], dict[int, int]]:
        ticks = os.sysconf("SC_CLK_TCK")
        cpu, parent = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
        return cpu, parent

    def _others(self, parent: dict[int, int]) -> set[int]:
        mine, others = {os.getpid()}, set()
        for pid in parent:
            chain, p = [], pid
            while p not in mine and p in parent and p > 1 and len(chain) < 64:
                chain.append(p)
                p = parent[p]
            (mine if p in mine else others).update(chain)
        return others

    def _watch(self) -> None:
        before, _ = self._snapshot()
        while not self._stop.wait(0.5):
            now, parent = self._snapshot()
            self.others_cpu_s += sum(now[p] - before.get(p, now[p]) for p in self._others(parent))
            before = now

    def __enter__(self) -> OtherLoad:
        self._t0 = time.perf_counter()
        self._steal0 = self._steal()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self._t0
        self.steal_s = self._steal() - self._steal0

    @property
    def share(self) -> float:
        """Other processes' CPU use as a share of the machine's CPU capacity over the block."""
        return round(self.others_cpu_s / max(1e-9, self.wall_s * (os.cpu_count() or 1)), 3)

    @property
    def steal_share(self) -> float:
        return round(self.steal_s / max(1e-9, self.wall_s * (os.cpu_count() or 1)), 3)


def _greedy_makespan(times: list[float], workers: int) -> float:
    """Length of a first-come list schedule of ``times`` (in order) on ``workers`` parallel workers:
    how long a round's training must take at least when the sites run on that many actors."""
    free = [0.0] * max(1, workers)
    for t in times:
        i = free.index(min(free))
        free[i] += t
    return max(free)


# ----------------------------------------------------------------------------- federated
def run_federated(cfg: Config, out: Path, log_file: Path) -> dict:
    """One `simulate` run; wall time and the breakdown from its metrics.jsonl time stamps."""
    actors = max(1, int((os.cpu_count() or 1) / cfg.simulation.client_cpus))
    t_start = time.time()
    p0 = time.perf_counter()
    with log_file.open("a") as f, contextlib.redirect_stdout(f):
        run = simulate(cfg, out=out, log=_quiet)
    wall = time.perf_counter() - p0
    t_end = time.time()
    records = run.records()
    server_done = (run.path / "status.json").stat().st_mtime
    # the ServerApp builds the HTML report after the outcome, then marks its loop done
    report_s = (run.path / "simulation" / DONE_FILE).stat().st_mtime - server_done

    def one(round_: int, site: str, phase: str) -> dict | None:
        found = [r for r in records if r["round"] == round_ and r["site"] == site and r["phase"] == phase]
        return found[0] if found else None

    rounds = []
    starts = []
    for r in range(1, cfg.federation.rounds + 1):
        g = one(r, "global", "train")
        starts.append(g["time"] - g["round-time-s"])
    starts.append(server_done)
    for r in range(1, cfg.federation.rounds + 1):
        g = one(r, "global", "train")
        ev = one(r, "global", "evaluate")
        site_times = [one(r, s, "train")["train-time-s"] for s in cfg.sites.train]
        critical = _greedy_makespan(site_times, actors)
        train_end = g["time"]
        eval_end = ev["time"] if ev else train_end
        rounds.append({
            "round": r,
            "round_s": round(starts[r] - starts[r - 1], 3),
            "train_phase_s": round(g["round-time-s"], 3),
            "slowest_site_train_s": round(max(site_times), 3),
            "sum_site_train_s": round(sum(site_times), 3),
            "site_train_on_actors_s": round(critical, 3),
            "train_phase_overhead_s": round(g["round-time-s"] - critical, 3),
            "evaluate_phase_s": round(eval_end - train_end, 3),
            "tail_s": round(starts[r] - eval_end, 3),
        })
    ckpt = load_checkpoint(run.last_checkpoint())["model"]
    return {"wall_s": wall, "startup_s": starts[0] - t_start, "shutdown_s": t_end - server_done, "report_s": report_s,
            "actors": actors, "rounds": rounds, "final_state": ckpt, "t_start": t_start}


# ----------------------------------------------------------------------------- plain loop
def _site_evaluation(model, data, cfg: Config, full: bool, train=None, plan=None) -> tuple[dict, dict, float]:
    """What a site's ClientApp does for an evaluate message: `evaluate_local`, plus the full
    evaluation (distances, anomaly detection, and with a training site's ``train`` slices the
    memorisation audit) on the rounds that ask for it, under the server's ``plan``. Returns
    (metrics, arrays, seconds spent in the full evaluation)."""
    metrics = evaluate_local(model, data, cfg)
    if not full:
        return metrics, {}, 0.0
    f0 = time.perf_counter()
    scores, arrays = evaluate_site(model, data, cfg, train=train, plan=plan)
    return {**metrics, **scores}, arrays, time.perf_counter() - f0


def _plans(cfg: Config, data: dict) -> tuple[tuple, bool]:
    """What the server's evaluation plan holds for this data: the classes that trained, and whether
    the training sites send calibration quantiles first (``Federation.evaluate``)."""
    from types import SimpleNamespace

    from medgen.client.app import data_summary
    from medgen.server.federation import Federation
    from medgen.server.guards import trained_classes

    summaries = {s: data_summary(*data[s]) for s in cfg.sites.all}
    calibrate = Federation._needs_pooled_threshold(SimpleNamespace(cfg=cfg, summaries=summaries,
                                                                   nodes=dict.fromkeys(cfg.sites.all)))
    return trained_classes(summaries, cfg.sites.train), calibrate


def _is_full(cfg: Config, round_: int) -> bool:
    return is_full_evaluation(cfg, round_)


def run_plain(cfg: Config, evaluate: bool = True, threads: int | None = None,
              bookkeeping: Path | None = None, rounds: int | None = None) -> dict:
    """The same rounds in one process: train each site in turn, FedAvg, evaluate every site with the
    global model. With ``bookkeeping`` (a folder) also do the server's per-round writing (metrics,
    sample grid, artefacts, checkpoint), timed apart. ``rounds`` runs only the first rounds (probes)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = _data(cfg)
        classes, calibrate_first = _plans(cfg, data)
        state = build_model(cfg).state_dict()
        aggregator = FedAvg()
        site_train, eval_s, full_s, book_s = [], 0.0, 0.0, 0.0
        run = RunDir(bookkeeping) if bookkeeping else None
        if run is not None:
            run.create(cfg)
        p0 = time.perf_counter()
        last = rounds or cfg.federation.rounds
        for round_ in range(1, last + 1):
            updates = []
            for site in cfg.sites.train:
                model = build_model(cfg)
                model.load_state_dict(state)
                metrics = train_local(model, data[site][0], cfg, site_seed(cfg, site, round_))
                site_train.append(metrics["train-time-s"])
                updates.append(Update(site, model.state_dict(), int(metrics["num-examples"])))
            state = aggregator.aggregate(state, updates)
            results, artefacts = {}, {}
            if evaluate and (round_ % cfg.federation.eval_every == 0 or round_ == cfg.federation.rounds):
                e0 = time.perf_counter()
                full = _is_full(cfg, round_)
                calibrate = full and calibrate_first
                first = [s for s in cfg.sites.all if s in cfg.sites.train] if calibrate else list(cfg.sites.all)
                thresholds = {}
                for group, plan in ((first, EvaluationPlan(classes, send_calibration=calibrate)),
                                    ([s for s in cfg.sites.all if s not in first], None)):
                    if plan is None:
                        thresholds = pooled_thresholds({s: results[s] for s in first if s in results})
                        plan = EvaluationPlan(classes, thresholds)
                    for site in group:
                        train, held = data[site]
                        if len(held):
                            model = build_model(cfg)
                            model.load_state_dict(state)
                            results[site], artefacts[site], took = _site_evaluation(model, held, cfg, full, train, plan)
                            full_s += took
                eval_s += time.perf_counter() - e0
            if run is not None:
                b0 = time.perf_counter()
                if results:
                    record_evaluation(run, cfg, round_, results, state, _quiet, artefacts, classes)
                run.save_checkpoint(round_, state, aggregator.state(), cfg)
                book_s += time.perf_counter() - b0
        total = time.perf_counter() - p0
    finally:
        torch.set_num_threads(before)
    return {"total_s": total - book_s, "train_s": sum(site_train), "evaluate_s": eval_s, "full_evaluation_s": full_s,
            "bookkeeping_s": book_s, "site_train_s": site_train, "threads": threads or before,
            "final_state": state, "rounds": last}


def _warm_up(cfg: Config) -> None:
    """A few steps so that the plain loop does not pay torch's first-call costs inside the timing
    (the federated side pays them in its actors: that is part of its real cost)."""
    data = _data(cfg)
    model = build_model(cfg)
    site = cfg.sites.train[0]
    train_local(model, data[site][0], cfg, 0, steps=3)
    evaluate_local(model, data[site][1] if len(data[site][1]) else data[site][0], cfg)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _probe(code: str) -> float | None:
    """Run ``code`` in a fresh interpreter; it prints a number of seconds as its last line."""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return round(float(out.stdout.strip().splitlines()[-1]), 2)
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def startup_probes() -> dict:
    """What the federated start-up is made of, each measured alone in a fresh process: a bare
    `ray.init` (2 CPUs, no dashboard; imports excluded) and the import of the ClientApp module
    (torch + flwr + medgen), which every Ray actor pays once."""
    return {
        "ray_init_alone_s": _probe(
            "import time, ray; t = time.perf_counter(); "
            "ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR', log_to_driver=False); "
            "print(time.perf_counter() - t); ray.shutdown()"),
        "clientapp_import_s": _probe(
            "import time; t = time.perf_counter(); import medgen.client.app; print(time.perf_counter() - t)"),
    }


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 subjects per site, 2 rounds x 10 steps, scaling over 2 and 4 sites")
    parser.add_argument("--cache", type=Path, default=None,
                        help="persistent data.cache_dir (phantom + slices); default: a temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra section.key=value override for the main comparison")
    parser.add_argument("--variants", action="store_true",
                        help="also run the whole plain loop again without evaluation (by default its time is the "
                             "plain run minus its timed evaluation), and the simulation with one actor per "
                             "training site (simulation.client_cpus = CPUs / sites)")
    parser.add_argument("--scaling", default=None, help="training-site counts, e.g. 2,4,8,16 ('' to skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    out_file = args.out or results / ("federation-quick.json" if args.quick else "federation.json")
    sizes = [int(n) for n in (args.scaling if args.scaling is not None else
                              ("2,4" if args.quick else "2,4,8,16")).split(",") if n.strip()]

    contention, steal = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = args.cache or tmp / "cache"
        log_file = tmp / "simulation.log"
        main_overrides = [f"data.cache_dir={cache}"]
        if args.quick:
            main_overrides += ["phantom.subjects_per_site=2", "federation.rounds=2", "train.local_steps=10"]
        cfg = prepare(load_config(None, main_overrides + args.overrides))
        n_train = {s: len(t) for s, (t, _) in _data(cfg).items() if s in cfg.sites.train}
        n_eval = {s: len(e) for s, (_, e) in _data(cfg).items()}

        print(f"federated: {cfg.federation.rounds} rounds x {len(cfg.sites.train)} sites x "
              f"{cfg.train.local_steps} steps ...", flush=True)
        with OtherLoad() as other:
            fed = run_federated(cfg, tmp / "run", log_file)
        contention["federated"], steal["federated"] = other.share, other.steal_share
        print(f"  {fed['wall_s']:.1f} s", flush=True)
        _warm_up(cfg)
        print("plain loop (with evaluation, bookkeeping timed apart) ...", flush=True)
        with OtherLoad() as other:
            plain = run_plain(cfg, evaluate=True, bookkeeping=tmp / "plain-run")
            print(f"  {plain['total_s']:.1f} s", flush=True)
            plain_noeval = run_plain(cfg, evaluate=False) if args.variants else None
            # parallelism probe: one round of the same training on one torch thread, like an actor
            plain_1t = run_plain(cfg, evaluate=False, threads=1, rounds=1)
        contention["plain"], steal["plain"] = other.share, other.steal_share
        probes = startup_probes()
        fed_spread = None
        if args.variants:  # one actor per training site: no idle actor in a round's last wave
            cpus = (os.cpu_count() or 1) / len(cfg.sites.train)
            if cpus < cfg.simulation.client_cpus:
                spread_cfg = cfg.model_copy(update={"simulation": cfg.simulation.model_copy(
                    update={"client_cpus": int(cpus * 100) / 100})})
                print(f"federated, simulation.client_cpus={spread_cfg.simulation.client_cpus:g} ...", flush=True)
                with OtherLoad() as other:
                    fed_spread = run_federated(spread_cfg, tmp / "run-spread", log_file)
                contention["federated-one-actor-per-site"] = other.share
                steal["federated-one-actor-per-site"] = other.steal_share

        scaling = []
        if sizes:
            names = [f"S{i:02d}" for i in range(1, max(sizes) + 1)]
            base = ["phantom.subjects_per_site=2", "train.local_steps=5" if args.quick else "train.local_steps=20",
                    "federation.rounds=3", f"data.cache_dir={cache}"]
            big = prepare(load_config(None, base + [f"sites.train=[{','.join(names)}]", "sites.heldout=[H]"]))
            for n in sizes:
                scfg = prepare(load_config(None, base + [f"data.root={big.data.root}",
                                                         f"sites.train=[{','.join(names[:n])}]", "sites.heldout=[H]"]))
                print(f"scaling: {n} training sites ...", flush=True)
                with OtherLoad() as other:
                    f = run_federated(scfg, tmp / f"scale-{n}", log_file)
                    p = run_plain(scfg, evaluate=True, rounds=1)
                contention[f"scaling-{n}"], steal[f"scaling-{n}"] = other.share, other.steal_share
                per_round = [r["round_s"] for r in f["rounds"]]
                steady = f["rounds"][1]  # round 2: past the actors' first calls, before the last round's full evaluation
                plain_round = p["total_s"]
                scaling.append({
                    "training_sites": n,
                    "slices_per_site": round(sum(len(site_data(scfg, s, Path(scfg.data.root) / s)[0])
                                                 for s in scfg.sites.train) / n),
                    "wall_s": round(f["wall_s"], 2),
                    "startup_s": round(f["startup_s"], 2),
                    "round_s": per_round,
                    "train_phase_s": [r["train_phase_s"] for r in f["rounds"]],
                    "evaluate_phase_s": [r["evaluate_phase_s"] for r in f["rounds"]],
                    "steady_round_s": steady["round_s"],
                    "steady_round_s_per_site": round(steady["round_s"] / n, 3),
                    "steady_train_phase_overhead_s": steady["train_phase_overhead_s"],
                    "plain_round_s": round(plain_round, 3),
                    "plain_round_s_per_site": round(plain_round / n, 3),
                    "steady_round_ratio_federated_vs_plain": round(steady["round_s"] / plain_round, 2),
                })
                print(f"  round 2: {steady['round_s']:.2f} s (plain {plain_round:.2f} s)", flush=True)

    r_fed = fed["rounds"]
    rounds_s = sum(r["round_s"] for r in r_fed)
    overhead = sum(r["train_phase_overhead_s"] for r in r_fed)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s), "
                   f"{platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "other_processes_cpu_share": contention,
        "hypervisor_steal_share": steal,
        "config": (f"{cfg.model.family}, {cfg.data.image_size}px, batch {cfg.train.batch_size}, "
                   f"{cfg.federation.rounds} rounds x {cfg.train.local_steps} local steps, train sites "
                   f"{n_train}, evaluation slices {n_eval}, client_cpus={cfg.simulation.client_cpus:g} "
                   f"-> {fed['actors']} Ray actors"),
        "federated_s": round(fed["wall_s"], 2),
        "plain_s": round(plain["total_s"], 2),
        "ratio_federated_vs_plain": round(fed["wall_s"] / plain["total_s"], 2),
        "ratio_rounds_only_vs_plain": round(rounds_s / plain["total_s"], 2),
        # the plain loop writes no HTML report: the same work, without it
        "ratio_federated_without_report_vs_plain": round((fed["wall_s"] - fed["report_s"]) / plain["total_s"], 2),
        "federated": {
            "startup_s": round(fed["startup_s"], 2),
            **probes,
            "rounds_s": round(rounds_s, 2),
            "shutdown_s": round(fed["shutdown_s"], 2),
            "report_s": round(fed["report_s"], 2),
            "train_phase_overhead_s_total": round(overhead, 2),
            "evaluate_phase_s_total": round(sum(r["evaluate_phase_s"] for r in r_fed), 2),
            "tail_s_total": round(sum(r["tail_s"] for r in r_fed), 2),
            "per_round": r_fed,
        },
        "plain": {
            "threads": plain["threads"],
            "train_s": round(plain["train_s"], 2),
            "evaluate_s": round(plain["evaluate_s"], 2),
            "full_evaluation_s": round(plain["full_evaluation_s"], 2),
            "without_evaluation_s": round(plain_noeval["total_s"] if plain_noeval else
                                          plain["total_s"] - plain["evaluate_s"], 2),
            "without_evaluation_measured": plain_noeval is not None,
            "server_bookkeeping_s": round(plain["bookkeeping_s"], 2),
        },
        "parallelism": {
            "site_train_s_plain_default_threads": round(plain["train_s"] / len(plain["site_train_s"]), 3),
            "site_train_s_plain_1_thread": round(plain_1t["train_s"] / len(plain_1t["site_train_s"]), 3),
            "site_train_s_federated_actor": round(sum(r["sum_site_train_s"] for r in r_fed)
                                                  / (len(r_fed) * len(cfg.sites.train)), 3),
            "torch_threads_speedup": round(plain_1t["train_s"] / len(plain_1t["site_train_s"])
                                           / (plain["train_s"] / len(plain["site_train_s"])), 2),
            "sites_per_actor_wave": f"{len(cfg.sites.train)} sites on {fed['actors']} actors = "
                                    f"{-(-len(cfg.sites.train) // fed['actors'])} waves per round",
            "training_ratio_federated_vs_plain": round(sum(r["site_train_on_actors_s"] for r in r_fed)
                                                       / plain["train_s"], 2),
            "plain_1_thread_estimated_s": round(plain["total_s"] - plain["train_s"] + plain_1t["train_s"]
                                                * cfg.federation.rounds / plain_1t["rounds"], 2),
        },
        "variant_one_actor_per_site": None if fed_spread is None else {
            "client_cpus": int((os.cpu_count() or 1) / len(cfg.sites.train) * 100) / 100,
            "actors": fed_spread["actors"],
            "federated_s": round(fed_spread["wall_s"], 2),
            "ratio_vs_plain": round(fed_spread["wall_s"] / plain["total_s"], 2),
            "rounds_s": round(sum(r["round_s"] for r in fed_spread["rounds"]), 2),
            "site_train_s_federated_actor": round(sum(r["sum_site_train_s"] for r in fed_spread["rounds"])
                                                  / (len(fed_spread["rounds"]) * len(cfg.sites.train)), 3),
        },
        "max_abs_weight_diff_federated_vs_plain": _max_diff(fed["final_state"], plain["final_state"]),
        "scaling": {
            "config": "2 phantom subjects per site, 20 local steps (5 with --quick), 3 rounds, 1 held-out site; "
                      "round_s = start of a round to start of the next (train + evaluate + server writing); "
                      "steady round = round 2 (round 1 also pays the actors' first calls, the last round the "
                      "full evaluation); plain_round_s = one round of the plain loop (train every site in "
                      "turn, FedAvg, evaluate every site), the same work as the steady round",
            "points": scaling,
        },
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    busy = sorted(k for k in contention if contention[k] > 0.1 or steal.get(k, 0) > 0.05)
    if busy:
        print(f"WARNING: other processes (> 10% of the machine) or the hypervisor (> 5% steal) took CPU during "
              f"{busy}: these timings are not representative; run again on a quiet machine.", file=sys.stderr)


if __name__ == "__main__":
    main()
