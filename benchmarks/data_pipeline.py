"""Data pipeline throughput on the phantom cohort.

Measures, in one run on the same cohort:
  - phantom synthesis time (4 sites by default),
  - cold preprocessing throughput (volumes/s: NIfTI -> cached slices),
  - warm load from the slice cache, as a speed-up over cold preprocessing,
  - the header checks every load runs (cached or not: data.max_voxels, geometry, qform/sform), as
    a share of the warm load,
  - one cached epoch through SliceDataset + DataLoader (slices/s), as a ratio to the same epoch over
    a plain in-memory TensorDataset of the same tensors (the baseline: no medgen code in the loop).

Usage: python benchmarks/data_pipeline.py [--subjects 8] [--out benchmarks/results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from medgen.config import load_config
from medgen.data.dataset import SliceDataset, check_headers, load_site
from medgen.data.phantom import synthesize_cohort
from medgen.data.sites import discover_site


def _epoch(dataset, batch_size: int) -> float:
    start = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True):
        batch[0].sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="A,B,C,D")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json")
    args = parser.parse_args()
    sites = args.sites.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(None, [f"data.cache_dir={tmp / 'cache'}"]).data
        t0 = time.perf_counter()
        folders = synthesize_cohort(tmp / "cohort", sites, args.subjects, seed=0)
        synth_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        cold = [load_site(folders[s], cfg, s) for s in sites]
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = [load_site(folders[s], cfg, s) for s in sites]
        warm_s = time.perf_counter() - t0
        scans = [scan for s in sites for scan in discover_site(folders[s], cfg).scans]
        t0 = time.perf_counter()
        for scan in scans:
            check_headers(scan, cfg)
        headers_s = time.perf_counter() - t0
        n_files = sum(len(scan.files) for scan in scans)

        n_volumes = len(sites) * args.subjects
        n_slices = sum(len(s) for s in warm)
        ours = torch.utils.data.ConcatDataset([SliceDataset(s) for s in cold])
        plain = TensorDataset(*[torch.cat([getattr(ds, k) for ds in ours.datasets])
                                for k in ("images", "labels", "brain", "lesion")])
        _epoch(plain, args.batch_size)  # warm-up
        baseline_s = min(_epoch(plain, args.batch_size) for _ in range(3))
        epoch_s = min(_epoch(ours, args.batch_size) for _ in range(3))

    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.python_version()}",
        "cohort": f"{len(sites)} sites x {args.subjects} subjects, {n_slices} slices at "
                  f"{cfg.image_size}px / {cfg.spacing_mm[0]:g} mm",
        "synthesis_s": round(synth_s, 2),
        "preprocess_volumes_per_s": round(n_volumes / cold_s, 2),
        "cache_load_s": round(warm_s, 3),
        "cache_speedup_vs_preprocess": round(cold_s / warm_s, 1),
        "header_checks_ms_per_file": round(1000 * headers_s / n_files, 3),
        "header_checks_share_of_cache_load": round(headers_s / warm_s, 2),
        "cached_epoch_slices_per_s": round(n_slices / epoch_s),
        "baseline_tensordataset_slices_per_s": round(n_slices / baseline_s),
        "cached_epoch_time_ratio_vs_baseline": round(epoch_s / baseline_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
