"""Peak memory of `medgen simulate` with many small sites: the whole process tree, not one process.

The scaling study of `benchmarks/federation.py --quick --scaling 10,25,50,100` times the rounds;
this script runs the same studies (2 phantom subjects per site, 5 local steps, 3 rounds, one
held-out site H) as a `medgen simulate` child process and samples, every 0.5 s, the memory of that
child and all its descendants (the SuperLink, the `flwr-simulation` process, Ray's GCS, raylet and
workers) from /proc:

  - PSS (proportional set size, /proc/PID/smaps_rollup): each shared page is split between the
    processes that map it, so the sum over the tree is the tree's real share of the machine's memory;
  - RSS: each process's resident pages, shared ones counted in every process (an upper bound);
  - the machine's used memory (MemTotal - MemAvailable) above its value before the run (every process
    on the machine, the page cache excluded: a cross-check, disturbed by anything else running).

The cohort and its slice cache are made before any run (untimed, not sampled).

Usage: python benchmarks/fleet_memory.py [--sites 10,50,100] [--out benchmarks/results/fleet_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from medgen.client.task import site_data
from medgen.config import load_config
from medgen.simulation import resolve_data

ROOT = Path(__file__).resolve().parents[1]
BASE = ["phantom.subjects_per_site=2", "train.local_steps=5", "federation.rounds=3"]


def _kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _tree(root: int) -> list[int]:
    parent = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def _used_kib() -> int:
    meminfo = Path("/proc/meminfo")
    return _kib(meminfo, "MemTotal:") - _kib(meminfo, "MemAvailable:")


class TreeMemory:
    """Peak PSS / RSS sums over a process and its descendants, sampled every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_pss_kib = self.peak_rss_kib = self.peak_used_kib = self.peak_processes = 0
        self.used0_kib = _used_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        pss = rss = 0
        pids = _tree(self.pid)
        for pid in pids:
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup")
                pss += _kib(rollup, "Pss:")
                rss += _kib(rollup, "Rss:")
            except (OSError, ValueError):
                continue  # the process ended between the listing and the read
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_used_kib = max(self.peak_used_kib, _used_kib() - self.used0_kib)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="10,50,100", help="training-site counts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet_memory.json")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sites.split(",") if n.strip()]
    names = [f"S{i:03d}" for i in range(1, max(sizes) + 1)]
    with tempfile.TemporaryDirectory(prefix="medgen-fleet-memory-") as tmp:
        common = BASE + [f"data.cache_dir={tmp}/cache"]
        cohort = resolve_data(load_config(None, common + [f"sites.train=[{','.join(names)}]", "sites.heldout=[H]"]),
                              log=lambda *a, **k: None)
        common.append(f"data.root={cohort.data.root}")
        for site in cohort.sites.all:  # fill the slice cache before any run
            site_data(cohort, site, Path(cohort.data.root) / site, heldout=site in cohort.sites.heldout)
        points = []
        for n in sizes:
            sets = common + [f"sites.train=[{','.join(names[:n])}]", "sites.heldout=[H]"]
            cmd = [sys.executable, "-m", "medgen.cli.main", "simulate", "-q", "--out", f"{tmp}/run-{n}"]
            for s in sets:
                cmd += ["--set", s]
            print(f"{n} training sites ...", flush=True)
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            with TreeMemory(child.pid) as mem:
                _, err = child.communicate()
            wall = time.perf_counter() - t0
            if child.returncode != 0:
                raise SystemExit(f"medgen simulate with {n} sites failed ({child.returncode}):\n{err[-2000:]}")
            point = {"training_sites": n, "wall_s": round(wall, 1),
                     "peak_tree_pss_mib": round(mem.peak_pss_kib / 1024), "peak_tree_rss_mib": round(mem.peak_rss_kib / 1024),
                     "peak_machine_used_above_start_mib": round(mem.peak_used_kib / 1024),
                     "peak_processes": mem.peak_processes}
            points.append(point)
            print(f"  {point}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "config": ", ".join(BASE) + ", one held-out site H; `medgen simulate -q` as a child process",
              "sampling": "every 0.5 s over the child and its descendants (/proc/PID/smaps_rollup)",
              "points": points}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
