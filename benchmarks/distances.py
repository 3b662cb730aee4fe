"""The distances' numerics and informativeness, each against a baseline measured in the same run.

- FID's trace term on 64 x 2048 random features (what 64 generated images give): pytorch-fid's
  ``scipy.linalg.sqrtm`` of the product of the covariances (baseline) against the low-rank identity
  on the features (``frechet_distance_features``, what ``fid()`` uses) and the eigendecomposition
  route for callers with only statistics (``frechet_distance``); time and agreement.
- Precision / recall on real IXI T1 slices (``../shared/data``, reference brain masks, default
  64 px preprocessing): 64 slices of half of the subjects against 64 of the other half, and against
  the same slices Gaussian-blurred (sigma in px), averaged over random subject splits; the paper's
  setting (k = 3, all 20 radiomics features) against the default (k = 5, 2 principal components)
  and neighbours of it; also the samples of the real-anatomy benchmark's models (the 16-image grids
  in results/, 8-bit PNGs: precision only).
- MS-SSIM diversity of real slices: the whole square (baseline) against the brain's bounding box.

Usage: python benchmarks/distances.py [--subjects 16] [--splits 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from scipy.ndimage import gaussian_filter

from medgen.config import Config
from medgen.data.nifti import load_mask, load_volume
from medgen.data.preprocess import preprocess_subject
from medgen.evaluation import distances as D
from medgen.evaluation.fid import frechet_distance, frechet_distance_features, statistics

IXI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ixi-t1"
RESULTS = Path(__file__).parent / "results"
SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)
SETTINGS = {"paper: k=3, 20 features": (3, None), "k=10, 20 features": (10, None), "k=5, 3 components": (5, 3),
            "k=5, 2 components (default)": (5, 2), "k=10, 2 components": (10, 2)}
GRIDS = ("gan", "vae", "vae-beta1")


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def fid_trace(n: int = 64, d: int = 2048) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.1
    (m1, s1), (m2, s2) = statistics(x), statistics(y)

    def sqrtm_fid():  # pytorch-fid's computation on the same statistics
        covmean = linalg.sqrtm(s1 @ s2)
        return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)

    base, t_base = _timed(sqrtm_fid)
    fast, t_fast = min((_timed(lambda: frechet_distance_features(x, y)) for _ in range(5)), key=lambda v: v[1])
    eig, t_eig = _timed(lambda: frechet_distance(m1, s1, m2, s2))
    return {"features": f"{n} x {d} (two sets, N(0,1) and N(0.1,1))", "sqrtm_s": round(t_base, 2),
            "low_rank_s": round(t_fast, 4), "eigen_statistics_s": round(t_eig, 2),
            "speed_up_low_rank": round(t_base / t_fast), "speed_up_eigen": round(t_base / t_eig, 1),
            "fid_sqrtm": base, "fid_low_rank": fast, "fid_eigen": eig,
            "relative_difference_low_rank_vs_sqrtm": abs(fast - base) / base,
            "relative_difference_low_rank_vs_eigen": abs(fast - eig) / eig}


def ixi_subjects(count: int) -> list[np.ndarray]:
    cfg = Config().data
    out = []
    for scan in sorted((IXI / "scans").glob("*_T1.nii.gz"))[:count]:
        mask = IXI / "brainmasks" / scan.name.replace("_T1.nii.gz", "_brainmask.nii.gz")
        out.append(preprocess_subject(load_volume(scan), cfg, brain=load_mask(mask)).images)
    return out


def grid(name: str, size: int = 64, pad: int = 2) -> np.ndarray:
    """The 16 images of a 2 x 8 sample grid PNG (samples.save_grid), in [0, 1]."""
    im = np.asarray(Image.open(RESULTS / f"real_anatomy-samples-ixi-{name}.png"), np.float64) / 255
    step = size + pad
    return np.stack([im[pad + r * step: pad + r * step + size, pad + c * step: pad + c * step + size]
                     for r in range(2) for c in range(8)])


def _precision(real_f, fake_f, k, components) -> float:
    real, fake = D.standardise(real_f, fake_f)
    if components is not None:
        real, fake = D.principal_components(real, fake, components)
    return D._coverage(fake, real, D._knn_radii(real, k))  # recall needs more than k fakes


def precision_recall(subjects: list[np.ndarray], splits: int, n: int) -> dict:
    grids = {g: D.radiomics_features(grid(g)) for g in GRIDS if (RESULTS / f"real_anatomy-samples-ixi-{g}.png").is_file()}
    rows = {name: [] for name in SETTINGS}
    grid_rows = {name: [] for name in SETTINGS}
    for split in range(splits):
        rng = np.random.default_rng(split)
        order = rng.permutation(len(subjects))
        half = len(subjects) // 2
        a, b = (np.concatenate([subjects[i] for i in part]) for part in (order[:half], order[half:]))
        a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
        fa = D.radiomics_features(a)
        fakes = [D.radiomics_features(b)] + [D.radiomics_features(np.clip(gaussian_filter(b, (0, s, s)), 0, 1))
                                             for s in SIGMAS]
        for name, (k, c) in SETTINGS.items():
            rows[name].append([D.precision_recall(fa, f, k, c) for f in fakes])
            grid_rows[name].append([_precision(fa, f, k, c) for f in grids.values()])
    out = {}
    for name in SETTINGS:
        mean = np.mean(rows[name], 0)
        out[name] = {"precision": dict(zip(["real"] + [f"blur {s}" for s in SIGMAS], mean[:, 0].round(2).tolist())),
                     "recall": dict(zip(["real"] + [f"blur {s}" for s in SIGMAS], mean[:, 1].round(2).tolist())),
                     "precision_model_samples": dict(zip(grids, np.mean(grid_rows[name], 0).round(2).tolist()))}
    return out


def ms_ssim_reference(subjects: list[np.ndarray], n: int, repeats: int = 3) -> dict:
    pool = np.concatenate(subjects)
    whole, boxed = [], []
    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        x = pool[rng.permutation(len(pool))[:n]]
        i = rng.integers(0, n, 500)
        j = (i + rng.integers(1, n, 500)) % n
        whole.append(D.ms_ssim(x[i], x[j]).mean())
        boxed.append(D.ms_ssim_pairs(x, i, j).mean())
    out = {"real_whole_square": round(float(np.mean(whole)), 3), "real_brain_box": round(float(np.mean(boxed)), 3)}
    for g in GRIDS:
        if (RESULTS / f"real_anatomy-samples-ixi-{g}.png").is_file():
            x = grid(g)
            rng = np.random.default_rng(0)
            i = rng.integers(0, len(x), 500)
            j = (i + rng.integers(1, len(x), 500)) % len(x)
            out[f"{g}_whole_square"] = round(float(D.ms_ssim(x[i], x[j]).mean()), 3)
            out[f"{g}_brain_box"] = round(float(D.ms_ssim_pairs(x, i, j).mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=16, help="IXI subjects (split in halves)")
    parser.add_argument("--splits", type=int, default=6, help="random subject splits averaged")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "distances.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d")}
    result["fid_trace"] = fid_trace()
    print("fid", result["fid_trace"], flush=True)
    if (IXI / "scans").is_dir():
        subjects = ixi_subjects(args.subjects)
        result["ixi"] = f"{len(subjects)} subjects, {sum(map(len, subjects))} slices; n slices from each half, " \
                        f"{args.splits} splits"
        for n in (32, 64, 128):
            result[f"precision_recall_n{n}"] = precision_recall(subjects, args.splits, n)
            print(f"precision/recall n={n}", json.dumps(result[f"precision_recall_n{n}"], indent=1), flush=True)
        result["ms_ssim_n64"] = ms_ssim_reference(subjects, 64)
        print("ms-ssim", result["ms_ssim_n64"], flush=True)
    else:
        print(f"no IXI scans at {IXI}: FID timing only")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
