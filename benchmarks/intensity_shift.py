"""How far apart sites' brain-intensity histograms are, as the server's guard sees them
(``medgen.server.guards``): the Jensen-Shannon divergence (bits) of each site's 32-bin histogram
of normalised brain intensities (what a site sends when it connects) from the pooled histogram of
the training sites A-C of its cohort. It sets ``evaluation.max_intensity_shift``.

    python benchmarks/intensity_shift.py [--out benchmarks/results/intensity_shift.json]

Sites: the phantom's A-D and IXI's A-D as ``benchmarks/real_anatomy.py`` makes them (under
runs/bench-real-anatomy/), and the real lesion cases of ../shared/data/real-lesions (chronic
stroke T2; ISLES FLAIR, DWI, ADC) with deepbet brain masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from medgen.config import load_config_text, with_overrides  # noqa: E402
from medgen.data.dataset import load_site  # noqa: E402
from medgen.server.guards import js_divergence  # noqa: E402

BENCH = ROOT / "runs" / "bench-real-anatomy"
LESIONS = ROOT.parent / "shared" / "data" / "real-lesions"


def histogram(folder: Path, overrides: list[str]) -> tuple[np.ndarray, int]:
    cfg = with_overrides(load_config_text((ROOT / "examples" / "phantom.yaml").read_text()), overrides)
    data = load_site(folder, cfg.data, folder.name)
    hist, _ = np.histogram(data.images[data.brain], bins=32, range=(0.0, 1.0))
    return hist / hist.sum(), len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intensity_shift.json")
    args = parser.parse_args()
    for cohort in ("phantom", "ixi"):
        if not (BENCH / cohort / "sites").is_dir():
            sys.exit(f"{BENCH / cohort / 'sites'} missing: run benchmarks/real_anatomy.py --cohorts {cohort} first")
    hists = {f"{c}-{s}": histogram(BENCH / c / "sites" / s, ["data.brain_mask=threshold"] if c == "phantom" else [])
             for c in ("phantom", "ixi") for s in "ABCD"}
    with tempfile.TemporaryDirectory() as tmp:  # the T2 case as a site: scan and mask named as medgen reads them
        t2 = Path(tmp) / "t2"
        t2.mkdir()
        (t2 / "case_T2.nii").symlink_to(LESIONS / "chronic-stroke-t2" / "T2.nii")
        (t2 / "case_T2_mask.nii").symlink_to(LESIONS / "chronic-stroke-t2" / "lesionT2.nii")
        hists["stroke-T2"] = histogram(t2, ["data.brain_mask=model"])
    for suffix in ("flair", "dwi", "adc"):
        hists[f"isles-{suffix}"] = histogram(LESIONS / "isles22-strokecase0009",
                                             [f"data.bids_suffix={suffix}", "data.brain_mask=model"])
    result = {"metric": "Jensen-Shannon divergence (bits) from the cohort's training sites A-C pooled",
              "slices": {name: n for name, (_, n) in hists.items()}}
    for cohort in ("phantom", "ixi"):
        train = [hists[f"{cohort}-{s}"] for s in "ABC"]
        pooled = sum(h * n for h, n in train)
        result[f"from {cohort} A-C"] = {name: round(js_divergence(h, pooled), 4) for name, (h, _) in hists.items()}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
