"""Other anomaly scores from one trained VAE, on the held-out site of a real-anatomy run
(`benchmarks/real_anatomy.py`): what the literature proposes beyond the reconstruction error,
each scored like the configured map (median 5, threshold on healthy calibration slices).

    python benchmarks/vae_scores.py runs/bench-real-anatomy/ixi/run-vae

- ``reconstruction``: |x - x_hat|^2 of the pseudo-healthy reconstruction (medgen's map);
- ``KL gradient``: |d KL(q(z|x) || p(z)) / dx| (Zimmerer et al., 2019), Gaussian-smoothed;
- ``reconstruction x KL gradient``: their combined score;
- ``reconstruction x intensity outlier``: the reconstruction error where the intensity is also
  unusual: the report's two-sided intensity-outlier map (``anomaly.outlier_map``, each side's
  deviation from the median healthy brain intensity over that side's healthy quantile, fixed on
  the calibration slices by ``anomaly.outlier_calibration``; before 2026-12-04 the one-sided
  |x - median|), unfiltered here: the product is post-processed like every score;
- ``reconstruction, z per position``: the error standardised by the healthy calibration
  slices' mean and spread at each pixel position (slices are cropped to the brain, so positions
  roughly correspond).

Results: benchmarks/results/vae_scores.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_anatomy import MAX_SLICES, maps_of, score  # noqa: E402

from medgen.config import load_config_text  # noqa: E402
from medgen.data.dataset import load_site  # noqa: E402
from medgen.evaluation import anomaly  # noqa: E402
from medgen.evaluation.site import split_for_threshold  # noqa: E402
from medgen.models import build_model  # noqa: E402
from medgen.models.base import HEALTHY  # noqa: E402
from medgen.server.rundir import load_checkpoint, load_weights  # noqa: E402


def kl_gradient(net, images: np.ndarray) -> np.ndarray:
    """|d KL / dx| per pixel (N, S, S), the label forced to healthy, Gaussian-smoothed (1 px)."""
    out = []
    for at in range(0, len(images), 32):
        x = torch.from_numpy(images[at: at + 32]).unsqueeze(1).requires_grad_(True)
        mu, logvar = net.encode(x, torch.full((len(x),), HEALTHY, dtype=torch.long))
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).sum()
        (grad,) = torch.autograd.grad(kl, x)
        out.append(grad.abs().numpy()[:, 0])
    return np.stack([ndimage.gaussian_filter(g, 1.0) for g in np.concatenate(out)])


def main() -> None:
    run = Path(sys.argv[1])
    checkpoint = sorted((run / "checkpoints").glob("round-*.pt"))[-1]
    ckpt = load_checkpoint(checkpoint)
    cfg = load_config_text(ckpt["config"])
    model = build_model(cfg)
    load_weights(model, ckpt, checkpoint)
    site = cfg.sites.heldout[0]
    data = load_site(Path(cfg.data.root) / site, cfg.data, site)
    calib, scored = split_for_threshold(data, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ci = np.sort(rng.permutation(np.flatnonzero(calib))[:MAX_SLICES])
    si = np.sort(rng.permutation(np.flatnonzero(scored))[:MAX_SLICES])
    net = model._net.eval()
    recon = {i: maps_of(model, data.images[ix], data.brain[ix]) for i, ix in (("c", ci), ("s", si))}
    grad = {i: kl_gradient(net, data.images[ix]) * data.brain[ix] for i, ix in (("c", ci), ("s", si))}
    q = cfg.evaluation.healthy_quantile
    # the site evaluation's no-model reference, two-sided, calibrated on the same healthy slices
    calibration = anomaly.outlier_calibration(data.images[ci], data.brain[ci], q)
    outlier = {i: anomaly.outlier_map(data.images[ix], data.brain[ix], calibration) for i, ix in (("c", ci), ("s", si))}
    mean, spread = recon["c"].mean(0), recon["c"].std(0) + 1e-3
    scores = {
        "reconstruction": recon,
        "KL gradient": grad,
        "reconstruction x KL gradient": {i: recon[i] * grad[i] for i in "cs"},
        "reconstruction x intensity outlier": {i: recon[i] * outlier[i] for i in "cs"},
        "reconstruction, z per position": {i: np.clip((recon[i] - mean) / spread, 0, None) for i in "cs"},
    }
    results = {"run": str(run.relative_to(ROOT) if run.is_absolute() else run), "n_scored_slices": int(len(si)),
               "post-processing": "median 5",
               "intensity outlier": "two-sided (anomaly.outlier_map)", "scores": {}}
    for name, maps in scores.items():
        post = [anomaly.postprocess(maps[i], data.brain[ix], 5, 0) for i, ix in (("c", ci), ("s", si))]
        results["scores"][name] = score(*post, data, ci, si, q)
        print(name, results["scores"][name])
    (ROOT / "benchmarks" / "results" / "vae_scores.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
