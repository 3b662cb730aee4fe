"""Per-slice image-restoration metrics of reconstructions against the truth.

Images (N, 1, S, S) in [0, 1] (data range 1). PSNR = 10 log10(1 / MSE) in dB over the whole
slice; SSIM as :func:`medgen.evaluation.distances.ssim` (Wang et al. 2004: 11x11 Gaussian window,
sigma 1.5, K1 0.01, K2 0.03; tests check it against MONAI's ``SSIMMetric``); RMSE over the whole
slice and over a region (the brain; an inpainting task's hole).
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.evaluation.distances import ssim


def per_slice(x: torch.Tensor, truth: torch.Tensor, regions: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """(N,) arrays ``psnr``, ``ssim``, ``rmse`` and ``rmse-<region>`` for each bool (N|1, 1, S, S)
    region (NaN for a slice whose region is empty)."""
    x, truth = x.detach().cpu().double().clamp(0, 1), truth.detach().cpu().double()
    err = (x - truth) ** 2
    mse = err.flatten(1).mean(1)
    out = {"psnr": (10 * torch.log10(1 / mse.clamp_min(1e-12))).numpy(), "ssim": ssim(x, truth),
           "rmse": mse.sqrt().numpy()}
    for name, region in regions.items():
        r = region.cpu().expand_as(err).double()
        n = r.flatten(1).sum(1)
        out[f"rmse-{name}"] = torch.where(n > 0, ((err * r).flatten(1).sum(1) / n.clamp_min(1)).sqrt(),
                                          torch.full_like(n, float("nan"))).numpy()
    return out


def summary(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Each metric's mean, std and n over slices (NaN slices left out of its n)."""
    out = {}
    for name, v in values.items():
        v = v[np.isfinite(v)]
        out[name] = {"mean": float(v.mean()) if len(v) else float("nan"),
                     "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": int(len(v))}
    return out
