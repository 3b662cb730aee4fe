"""Seed spread of the real-anatomy benchmark: per family, the rows of results/real_anatomy.json
trained at different seeds (``FAMILY`` is seed 0, ``FAMILY-seedN`` from ``real_anatomy.py
--train-seed N``) on the same scored slices of IXI's site D, summarised per metric as mean, sample
standard deviation (n - 1) and range, beside the references of those slices.

    python benchmarks/real_anatomy_seeds.py [--families vae,cevae,vqvae,flow] [--variant "median 5"]

Trains nothing. Writes results/real_anatomy_seeds.json. A family with one seed row is listed
with n = 1 and no spread.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("pixel_auroc", "pixel_auprc", "dice_at_threshold", "best_dice_upper_bound", "slice_auroc")
DISTANCES = ("radfd-healthy", "kid-healthy")


def seed_rows(rows: dict, family: str) -> dict[int, dict]:
    """{seed: row} of ``family``: its plain key (seed 0) and its ``-seedN`` keys."""
    found = {0: rows[family]} if family in rows else {}
    for key, row in rows.items():
        m = re.fullmatch(re.escape(family) + r"-seed(\d+)", key)
        if m:
            found[int(m.group(1))] = row
    return dict(sorted(found.items()))


def summary(values: list[float]) -> dict:
    v = np.asarray(values, float)
    out = {"n": len(v), "values": [round(float(x), 4) for x in v], "mean": round(float(v.mean()), 4)}
    if len(v) > 1:
        out |= {"std": round(float(v.std(ddof=1)), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="vae,cevae,vqvae,flow")
    parser.add_argument("--variant", default="median 5", help="post-processing variant (default: the default, median 5)")
    args = parser.parse_args()
    rows = json.loads((RESULTS / "real_anatomy.json").read_text())["cohorts"]["ixi"]
    out = {"variant": args.variant, "source": "results/real_anatomy.json (cohort ixi)", "families": {}}
    for family in args.families.split(","):
        by_seed = seed_rows(rows, family)
        if not by_seed:
            continue
        entry = {"seeds": list(by_seed), "slices": sorted({(r["n_scored_slices"], r["n_scored_lesion_slices"],
                                                             r["n_calibration_slices"]) for r in by_seed.values()})}
        for m in METRICS:
            entry[m] = summary([r["variants"][args.variant]["model"][m] for r in by_seed.values()])
        for d in DISTANCES:
            # rows of 2026-12-02 name RadFD-20 "frd-healthy" (renamed since; the same distance)
            vals = [r["distances_at_D"].get(d, r["distances_at_D"].get(d.replace("radfd", "frd")))
                    for r in by_seed.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                entry[d] = summary(vals)
        # the no-model score each row computed on its slices: rows before 2026-12-03 have the symmetric
        # |x - median| (no bright/dark thresholds), later ones the two-sided score; one entry per version
        refs = {json.dumps(r["variants"][args.variant]["intensity outlier"], sort_keys=True) for r in by_seed.values()}
        entry["intensity outlier"] = [json.loads(r) for r in sorted(refs)]
        entry["references"] = sorted({json.dumps(r["references"], sort_keys=True) for r in by_seed.values()})
        entry["references"] = [json.loads(r) for r in entry["references"]]
        out["families"][family] = entry
    (RESULTS / "real_anatomy_seeds.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
