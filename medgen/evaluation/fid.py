"""Fréchet Inception Distance, as pytorch-fid (and the seeds) define it.

Features: the 2048-d final average-pool activations of pytorch-fid's FID InceptionV3
(:mod:`medgen.evaluation.inception`) on images resized to 299x299 (bilinear, align_corners=False)
and scaled from [0, 1] to [-1, 1]; grey images are repeated to three channels. Distance: the
Fréchet distance between Gaussians fitted to the two feature sets (mean, ``np.cov`` covariance) —
pytorch-fid's quantity, but its trace term tr((S1 S2)^(1/2)) is computed exactly from the features
by the low-rank identity (:func:`frechet_distance_features`: milliseconds, not pytorch-fid's
minutes-long ``sqrtm`` of a singular 2048 x 2048 product), equal to pytorch-fid's value up to the
round-off of its ``sqrtm`` (tested against ``scipy.linalg.sqrtm``).

The weights (``pt_inception-2015-12-05-6726825d.pth``) are never downloaded: they are read from a
configured path, else from the torch hub cache. Without them there is no FID, and the report says
so (:func:`unavailable_message`); no other network is ever used under that name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

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
    features = _checked(features)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _checked(features) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """A (min(N, D), D) matrix F with F^T F = the unbiased covariance of (N, D) ``features``: the
    centred rows / sqrt(N - 1), or, when N > D, the R of their QR decomposition (same F^T F)."""
    a = (features - features.mean(axis=0)) / np.sqrt(len(features) - 1)
    return np.linalg.qr(a, mode="r") if len(a) > a.shape[1] else a


def frechet_distance_features(x, y) -> float:
    """The Fréchet distance of :func:`frechet_distance` between Gaussians fitted (mean, unbiased
    covariance) to features ``x`` (N, D) and ``y`` (M, D), N, M >= 2, without forming the D x D
    covariances: with S1 = A^T A and S2 = B^T B (:func:`_covariance_factor`), tr((S1 S2)^(1/2)) is
    the sum of the singular values of A B^T, a matrix of at most min(N, D) x min(M, D) (64 x 64
    for 64 InceptionV3 feature vectors: milliseconds, where sqrtm of 2048 x 2048 takes tens of
    seconds). Exact, not an approximation: the eigenvalues of S1 S2 are the squared singular values
    of A B^T. The SVD is backward stable and its singular values are >= 0, so none of sqrtm's
    numerical trouble (complex parts, an eps offset on singular covariances) arises; the result
    may be below 0 by round-off (~1e-12 relative) for two identical sets."""
    x, y = _checked(x), _checked(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature counts differ: {x.shape[1]} and {y.shape[1]}")
    a, b = _covariance_factor(x), _covariance_factor(y)
    diff = x.mean(axis=0) - y.mean(axis=0)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


def _clipped_eigvalsh(s: np.ndarray, what: str, eigenvectors: bool = False):
    """Eigenvalues (and vectors) of the symmetric part of ``s``, those below round-off set to 0."""
    s = (s + s.T) / 2
    w, v = np.linalg.eigh(s) if eigenvectors else (np.linalg.eigvalsh(s), None)
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    tol = len(w) * np.finfo(np.float64).eps * scale  # numpy's matrix_rank tolerance
    if w.min(initial=0.0) < -1e-6 * scale:
        raise ValueError(f"{what} is not positive semi-definite (eigenvalue {w.min():.3g}, largest {scale:.3g})")
    w = np.where(w > tol, w, 0.0)
    return (w, v) if eigenvectors else w


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), >= 0 up to round-off:

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    For callers that have only statistics (D-vectors, D x D covariances); with the features
    themselves :func:`frechet_distance_features` is exact and far faster."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2

    # pytorch-fid takes scipy's sqrtm of the non-symmetric sigma1 @ sigma2: minutes for D = 2048 on
    # a CPU, inf/nan when the covariances are singular (fewer samples than dimensions: then it adds
    # eps to the diagonals, which biases the result), and a complex result when round-off pushes
    # eigenvalues below 0. Instead, with sigma1 = V W V^T: sigma1 sigma2 is similar to the symmetric
    # PSD C = W^(1/2) V^T sigma2 V W^(1/2) (= sigma1^(1/2) sigma2 sigma1^(1/2) in V's basis), so
    # tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(C)): two symmetric eigendecompositions
    # (seconds at D = 2048), real by construction. Eigenvalues of sigma1 and of C within round-off
    # of 0 (|lambda| <= D eps lambda_max, numpy's rank tolerance) are set to 0 so that the D - N null
    # directions of a rank-deficient covariance add nothing (each would add sqrt(eps)-sized noise);
    # clearly negative ones mean the inputs are not covariances, and raise. On the same statistics
    # this equals pytorch-fid's value to ~1e-12 relative when sqrtm is accurate (full rank), and is
    # the more accurate of the two when it is not (sqrtm's error was ~1e-7 relative at 64 x 2048).
    w, v = _clipped_eigvalsh(sigma1, "sigma1", eigenvectors=True)
    root = v * np.sqrt(w)  # V W^(1/2)
    lam = _clipped_eigvalsh(root.T @ sigma2 @ root, "sigma1^(1/2) sigma2 sigma1^(1/2)")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(lam).sum())


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
    return frechet_distance_features(net(real_images), net(fake_images))
