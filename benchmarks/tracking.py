"""What tracking (tracking.tensorboard / tracking.mlflow) costs the server, against the same run
directory writing metrics.jsonl and sample grids alone, in one run.

The server's records of a run are replayed through `RunDir.log` and `RunDir.save_samples`, as the
federated loop calls them: by default records shaped like a default-config run's (5 rounds; training
sites A, B, C; held-out D; every site evaluated every round, the last round fully), or those of a
real run's metrics.jsonl (``--records``). Per setting: opening the trackers (once per run), the records
and grids of one round, and closing (the final metrics).

Usage: python benchmarks/tracking.py [--records runs/X/metrics.jsonl] [--repeat 3] [--out benchmarks/results/tracking.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medgen.config import load_config
from medgen.server.rundir import RunDir

SETTINGS = {"none": [], "tensorboard": ["tracking.tensorboard=true"], "mlflow": ["tracking.mlflow=mlflow"],
            "both": ["tracking.tensorboard=true", "tracking.mlflow=mlflow"]}


def default_records(rounds: int = 5) -> list[dict]:
    """Records shaped like a default run's: 14 numbers per site's training, 30 per evaluation, 90
    in the last round's full evaluation (distances, lesion detection, references)."""
    out = []
    for r in range(1, rounds + 1):
        for site in "ABC":
            out.append({"round": r, "site": site, "phase": "train", **{f"train-{i}": 0.1 * i for i in range(14)}})
        out.append({"round": r, "site": "global", "phase": "train", **{f"global-{i}": float(i) for i in range(6)}})
        for site in ["A", "B", "C", "D", "global"]:
            n = 90 if r == rounds else 30
            out.append({"round": r, "site": site, "phase": "evaluate", **{f"eval-{i}": 0.01 * i for i in range(n)},
                        "warnings": ["text: not a metric"]})
    return out


def replay(records: list[dict], overrides: list[str], folder: Path) -> dict:
    cfg = load_config(None, overrides)
    run = RunDir(folder)
    run.create(cfg)
    images = torch.rand(16, 1, 64, 64)  # federation.samples_per_class=8, two classes, 64 px
    t0 = time.perf_counter()
    run.track(cfg, log=print)
    opened = time.perf_counter()
    per_round = []
    for r in sorted({rec["round"] for rec in records}):
        t = time.perf_counter()
        for rec in (x for x in records if x["round"] == r):
            run.log(rec["round"], rec["site"], rec["phase"], {k: v for k, v in rec.items()
                                                             if k not in ("round", "site", "phase", "time")})
        run.save_samples(r, images, rows=2)
        per_round.append(time.perf_counter() - t)
    t = time.perf_counter()
    run.close_tracking("completed")
    return {"open-s": opened - t0, "round-s": statistics.median(per_round), "close-s": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, help="a run's metrics.jsonl to replay")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tracking.json"))
    args = parser.parse_args()
    records = RunDir(args.records.parent).records() if args.records else default_records()
    numbers = sum(isinstance(v, (int, float)) for r in records for k, v in r.items() if k not in ("round", "time"))
    results = {}
    for name, overrides in SETTINGS.items():
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(replay(records, overrides, Path(tmp) / "run"))
        results[name] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    base = results["none"]["round-s"]
    for name, r in results.items():
        r["round-ratio"] = r["round-s"] / base
        print(f"{name:12s} open {r['open-s']:6.2f} s   one round {1000 * r['round-s']:7.1f} ms "
              f"(x{r['round-ratio']:.1f} of metrics.jsonl + PNG alone)   close {1000 * r['close-s']:6.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                                    "records": len(records), "numbers": numbers, "repeat": args.repeat,
                                    "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
