"""Preprocessing a site's scans one after the other vs in parallel threads (``data.workers``),
on real heads: the first ``--n`` IXI T1 scans of ../shared/data/ixi-t1 as one site, no brain masks
supplied, so each scan gets the deepbet mask (``data.brain_mask=model``, the default on real scans)
or the Otsu threshold (``threshold``). Both runs start from an empty slice cache, in this process
with torch's default threads (the baseline: what a site did before), and must give identical
slices.

Usage: python benchmarks/parallel_preprocess.py [--n 24] [--data ../shared/data/ixi-t1]
                                                [--out benchmarks/results/parallel_preprocess.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medgen.config import load_config
from medgen.data.dataset import load_site


def timed_load(site: Path, cache: Path, brain_mask: str, workers: int | None):
    cfg = load_config(None, [f"data.cache_dir={cache}", f"data.brain_mask={brain_mask}", "data.bias_correction=none",
                             f"data.workers={'null' if workers is None else workers}"]).data
    start = time.perf_counter()
    slices = load_site(site, cfg)
    return time.perf_counter() - start, slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/ixi-t1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "parallel_preprocess.json")
    args = parser.parse_args()
    scans = sorted((args.data / "scans").glob("*_T1.nii.gz"))[: args.n]
    if len(scans) < args.n:
        raise SystemExit(f"need {args.n} scans in {args.data / 'scans'}, found {len(scans)}")
    results = {"n_scans": len(scans), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "IXI"
        site.mkdir()
        for scan in scans:
            (site / scan.name).symlink_to(scan.resolve())
        for brain_mask in ("model", "threshold"):
            serial_s, serial = timed_load(site, Path(tmp) / f"cache-{brain_mask}-1", brain_mask, 1)
            parallel_s, pooled = timed_load(site, Path(tmp) / f"cache-{brain_mask}-parallel", brain_mask, None)
            same = all(np.array_equal(getattr(serial, k), getattr(pooled, k))
                       for k in ("images", "brain", "lesion", "slice_index", "subjects"))
            results["runs"][brain_mask] = {"serial_s": round(serial_s, 2), "parallel_s": round(parallel_s, 2),
                                           "speedup": round(serial_s / parallel_s, 2), "identical_slices": same,
                                           "slices": int(len(serial.images))}
            print(f"data.brain_mask={brain_mask}: {len(scans)} scans one after the other {serial_s:.1f} s, "
                  f"{torch.get_num_threads()} threads {parallel_s:.1f} s: {serial_s / parallel_s:.2f}x, identical: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
