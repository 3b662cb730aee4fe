"""Fréchet Inception Distance, exactly as pytorch-fid (and the seeds) define it.

Features: the 2048-d final average-pool activations of pytorch-fid's FID InceptionV3
(:mod:`medgen.evaluation.inception`) on images resized to 299x299 (bilinear, align_corners=False)
and scaled from [0, 1] to [-1, 1]; grey images are repeated to three channels. Distance: the
Fréchet distance between Gaussians fitted to the two feature sets (mean, ``np.cov`` covariance),
with pytorch-fid's numerics.

The weights (``pt_inception-2015-12-05-6726825d.pth``) are never downloaded: they are read from a
configured path, else from the torch hub cache. Without them there is no FID, and the report says
so (:func:`unavailable_message`); no other network is ever used under that name.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from medgen.evaluation.inception import FEATURE_DIM, FIDInceptionV3

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def default_weights() -> Path:
    """Where torch hub (and pytorch-fid) caches the FID Inception weights (follows $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


DEFAULT_WEIGHTS = default_weights()


def find_weights(path: str | Path | None = None) -> Path | None:
    """The weights file to use: ``path`` when configured (and nothing else then), else the torch hub
    cache file. None when that file does not exist."""
    candidate = Path(path).expanduser() if path is not None else default_weights()
    return candidate if candidate.is_file() else None


def unavailable_message(path: str | Path | None = None) -> str:
    """The report line when there are no weights; ``path`` is where they were looked for."""
    where = path if path is not None else default_weights()
    return f"FID: unavailable (no InceptionV3 weights found at {where})"


class InceptionFeatures:
    """pytorch-fid's FID InceptionV3 with weights loaded (strictly) from a local file; eval mode,
    no gradients. Call it on images in [0, 1] to get (N, 2048) float64 pool features."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 50):
        self.weights = Path(weights)
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"InceptionV3 weights file not found: {self.weights}") from None
        except Exception as e:
            raise RuntimeError(f"cannot read InceptionV3 weights file {self.weights}: {e}") from e
        net = FIDInceptionV3()
        try:
            net.load_state_dict(state, strict=True)
        except Exception as e:  # missing / unexpected keys, wrong shapes, not a state dict
            raise RuntimeError(
                f"{self.weights} is not pytorch-fid's FID InceptionV3 weights file ({WEIGHTS_FILE}): {e}"
            ) from e
        self.net = net.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        """``images``: array or tensor (N, 1, H, W) or (N, 3, H, W) in [0, 1] -> (N, 2048) float64.

        Values slightly outside [0, 1] (e.g. from a sampler) are clipped, as writing them to an
        image file for pytorch-fid would; values far outside mean another convention and raise."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1|3, H, W), got shape {tuple(x.shape)}")
        x = x.float()
        if x.numel() and (x.min() < -0.5 or x.max() > 1.5):
            raise ValueError(f"images must be in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]")
        out = np.empty((len(x), FEATURE_DIM), np.float64)
        for at in range(0, len(x), self.batch_size):
            batch = x[at: at + self.batch_size].clamp(0, 1).to(self.device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)  # grey -> RGB with equal channels
            out[at: at + len(batch)] = self.net.features(batch).cpu().double().numpy()
        return out


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, variables in columns) of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    computed as pytorch-fid does (same result on the same statistics)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2

    # sigma1 @ sigma2 is not symmetric, but it is similar to the PSD matrix
    # sigma1^(1/2) sigma2 sigma1^(1/2), so its eigenvalues are real and >= 0 and it has a square root
    # with the same trace. Numerically, with fewer samples than dimensions both covariances are
    # singular and sqrtm can fail (inf / nan): then, as pytorch-fid, add eps to the diagonals.
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product of covariances; adding {eps} to the diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # Round-off can push tiny eigenvalues below zero, which gives the square root a (small)
    # imaginary part. Discard it when negligible (pytorch-fid's test: diagonal within 1e-3 of 0);
    # a large one means the statistics are not covariances and the result would be meaningless.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(s1 s2)")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@lru_cache(maxsize=2)
def _extractor(path: str, mtime_ns: int, size: int, device: str) -> InceptionFeatures:
    # keyed on the file's identity too, so a replaced file is reloaded
    return InceptionFeatures(path, device=device)


def fid(real_images, fake_images, weights: str | Path | None, device: str = "cpu") -> float | None:
    """FID between two image sets ((N, 1|3, H, W) in [0, 1], N >= 2 each) with the weights file
    ``weights`` (from :func:`find_weights`). None when ``weights`` is None: the caller reports
    :func:`unavailable_message` instead. The loaded network is cached between calls."""
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"InceptionV3 weights file not found: {path}")
    st = path.stat()
    net = _extractor(str(path.resolve()), st.st_mtime_ns, st.st_size, str(device))
    mu1, s1 = statistics(net(real_images))
    mu2, s2 = statistics(net(fake_images))
    return frechet_distance(mu1, s1, mu2, s2)
