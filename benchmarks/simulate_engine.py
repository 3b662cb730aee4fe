"""`medgen simulate` before and after a change of its engine, side by side in one run.

Runs the same study from two medgen source trees, alternately (before, after, before, after, ...):
``--before DIR``, a checkout of the earlier commit (``git worktree add /tmp/medgen-before COMMIT``),
and this tree. Each run is a fresh ``medgen simulate -q`` process — imports, Flower, Ray, the
rounds, the report: what a user waits for — on a phantom cohort made (and preprocessed) by a first,
untimed run, so neither side pays for it. Reported per run: the wall time, the time until the
first round's first line in ``run.log`` (start-up), and from there to the end (rounds + tail);
medians and the ratio after / before go to ``benchmarks/results/simulate-engine.json``.

Usage: python benchmarks/simulate_engine.py --before DIR [--pairs 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(tree: Path, out: Path, sets: list[str]) -> dict:
    """Wall time and its split (from run.log's time stamps) of one `medgen simulate` from ``tree``."""
    cmd = [sys.executable, "-m", "medgen.cli.main", "simulate", "-q", "--out", str(out),
           *[x for kv in sets for x in ("--set", kv)]]
    started = time.time()
    done = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: medgen simulate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    first = next(line for line in (out / "run.log").read_text().splitlines() if " round 1/" in line)
    at = datetime.datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {"wall_s": round(wall, 2), "startup_s": round(at - started, 2), "rest_s": round(started + wall - at, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulate-engine.json")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT}
    commits = {name: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() for name, tree in trees.items()}
    with tempfile.TemporaryDirectory() as work:
        sets = [f"data.cache_dir={work}/cache", *args.sets]
        one_run(ROOT, Path(work) / "warm-up", sets)  # the cohort and its slice cache, untimed
        runs = {"before": [], "after": []}
        for i in range(args.pairs):
            for name, tree in trees.items():
                runs[name].append(one_run(tree, Path(work) / f"{name}-{i}", sets))
                print(name, runs[name][-1], flush=True)
    median = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "commits": commits, "sets": args.sets, "runs": runs, "median": median,
              "ratio_after_over_before": {key: round(median["after"][key] / median["before"][key], 3)
                                          for key in median["after"]}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"]), "\nratio after/before:", result["ratio_after_over_before"])


if __name__ == "__main__":
    main()
