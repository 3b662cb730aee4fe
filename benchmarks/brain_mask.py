"""Brain masks and N4 on real heads: the shared IXI T1 scans (../shared/data/ixi-t1, skull and neck
present) scored against their reference parcellations (every label > 0 is brain).

Per subject, in the default 2 mm RAS+ grid the pipeline works in (``data.spacing_mm``):
  - Dice against the reference of the deepbet mask (``data.brain_mask=model``) and of the Otsu
    threshold mask (``threshold``, the fallback), and the seconds each takes;
  - the axial slices ``select_slices`` keeps (``data.min_brain_fraction``) with each mask and with the
    reference;
  - N4 (``data.bias_correction=n4``) seconds inside the deepbet mask, and the coefficient of
    variation inside the reference brain before / after (a rough sign that it did something: the
    grey/white contrast dominates it).

Usage: python benchmarks/brain_mask.py [--n 139] [--data ../shared/data/ixi-t1]
                                       [--out benchmarks/results/brain_mask.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medgen.config import DataConfig
from medgen.data.bias import n4_correct, shrink_factor
from medgen.data.brain_mask import cache_tag, model_mask
from medgen.data.nifti import load_volume
from medgen.data.preprocess import (Grid, estimate_brain_mask, resample, resample_image, select_slices,
                                    target_grid)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def reference(path: Path, grid: Grid) -> np.ndarray:
    """The parcellation's brain (label > 0) in ``grid``: bool."""
    img = nib.load(str(path))
    brain = (np.asarray(img.dataobj) > 0).astype(np.float32)
    return resample(brain, img.affine, grid, order=1) >= 0.5


def timed(f, *args):
    start = time.perf_counter()
    out = f(*args)
    return out, time.perf_counter() - start


def stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}


def summarise(rows: list[dict], cfg: DataConfig, args, of: int) -> dict:
    keys = [k for k in rows[0] if k != "subject"]
    result = {
        "what": "brain-mask Dice vs the IXI reference parcellations (label > 0), seconds per volume, N4 cost, "
                "axial slices kept by select_slices with each mask",
        "n": len(rows), "of": of, "grid": f"{cfg.spacing_mm} mm RAS+ (data.spacing_mm default)",
        "min_brain_fraction": cfg.min_brain_fraction, "model": cache_tag("model"),
        "n4_shrink": shrink_factor(cfg.spacing_mm), "torch_threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d"),
        "summary": {k: stats([r[k] for r in rows]) for k in keys},
        "subjects": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=139, help="subjects (sorted by id)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ixi-t1"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "brain_mask.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DataConfig()
    scans = sorted((args.data / "scans").glob("*_T1.nii.gz"))[: args.n]
    if not scans:
        raise SystemExit(f"no scans under {args.data / 'scans'}")
    rows = []
    for i, path in enumerate(scans):
        sid = path.name[: -len("_T1.nii.gz")]
        image = load_volume(path, None, cfg.max_voxels)
        grid = target_grid(image.data.shape, image.affine, cfg.spacing_mm)
        data = resample_image(image, grid)
        ref = reference(args.data / "brainmasks" / f"{sid}_brainmask.nii.gz", grid)
        if i == 0:  # one-off start-up (networks loaded, SimpleITK's first N4): not part of the per-volume times
            n4_correct(data, model_mask(data), grid.spacing)
        model, t_model = timed(model_mask, data)
        thresh, t_thresh = timed(estimate_brain_mask, data, grid.spacing)
        corrected, t_n4 = timed(n4_correct, data, model, grid.spacing)
        cv = lambda a: float(a[ref].std() / a[ref].mean())  # noqa: E731
        row = {"subject": sid, "dice_model": round(dice(model, ref), 4), "dice_threshold": round(dice(thresh, ref), 4),
               "s_model": round(t_model, 3), "s_threshold": round(t_thresh, 3), "s_n4": round(t_n4, 3),
               "brain_cv_before_n4": round(cv(data), 4), "brain_cv_after_n4": round(cv(corrected), 4),
               **{f"slices_{k}": int(len(select_slices(m, cfg.min_brain_fraction)))
                  for k, m in (("model", model), ("threshold", thresh), ("reference", ref))}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        result = summarise(rows, cfg, args, of=len(scans))  # rewritten after each subject: a cut run keeps its n
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
