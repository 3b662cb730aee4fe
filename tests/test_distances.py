"""Weight-free distances: radiomics features, FRD, KID, MS-SSIM diversity, precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medgen.evaluation import distances as D


def brains(n, seed, s=64, scale=1.0):
    """Brain-like slices (n, s, s) in [0, 1]: ellipses of random size with a brighter core and smooth
    texture, 0 outside; ``scale`` multiplies the intensities (a shifted distribution)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s] / s - 0.5
    out = np.zeros((n, s, s))
    for i in range(n):
        a, b = rng.uniform(0.3, 0.45, 2)
        r = np.sqrt((yy / a) ** 2 + (xx / b) ** 2)
        texture = gaussian_filter(rng.standard_normal((s, s)), rng.uniform(0.8, 2.0)) * rng.uniform(0.2, 0.4)
        out[i] = np.where(r < 1, np.clip(0.45 + 0.3 * (r < 0.6) + texture, 0.03, 1), 0)
    return out * scale


@pytest.fixture(scope="module")
def feats():
    """Features of two independent real-like samples and of intensity-scaled ones."""
    real = D.radiomics_features(brains(200, 0))
    other = D.radiomics_features(brains(200, 1))
    scaled = {k: D.radiomics_features(brains(200, 1, scale=k)) for k in (0.9, 0.7, 0.5)}
    return real, other, scaled


def test_features_finite_for_normal_empty_and_constant_slices():
    s = 32
    images = np.stack([brains(1, 0, s)[0], np.zeros((s, s)), np.full((s, s), 0.5), np.full((s, s), 1.0)])
    for x in (images, torch.from_numpy(images).float()[:, None]):
        f = D.radiomics_features(x)
        assert f.shape == (4, len(D.FEATURE_NAMES)) == (4, len(D.FEATURES))
        assert np.isfinite(f).all()
    assert np.all(f[1] == 0)  # empty brain: zeros
    named = dict(zip(D.FEATURE_NAMES, f[2]))
    assert named["mean"] == pytest.approx(0.5) and named["std"] == 0 and named["glcm_contrast"] == 0
    assert named["area_fraction"] == 1 and named["glcm_correlation"] == 1
    # explicit masks: an empty one gives zeros for a non-empty image too
    masks = np.ones_like(images, bool)
    masks[0] = False
    g = D.radiomics_features(images, masks)
    assert np.isfinite(g).all() and np.all(g[0] == 0) and g[1, 0] == 0 and g[1, -3] == 1


def test_first_order_features_match_numpy():
    from scipy import stats

    image = brains(1, 3)[0]
    f = dict(zip(D.FEATURE_NAMES, D.radiomics_features(image[None])[0]))
    v = image[image > 0.02]
    assert f["mean"] == pytest.approx(v.mean()) and f["std"] == pytest.approx(v.std())
    assert f["skewness"] == pytest.approx(stats.skew(v)) and f["kurtosis"] == pytest.approx(stats.kurtosis(v))
    assert [f["p10"], f["p50"], f["p90"]] == pytest.approx(np.percentile(v, [10, 50, 90]))
    assert f["area_fraction"] == pytest.approx(v.size / image.size)


def test_glcm_by_hand():
    # vertical stripes 0 1 0 1, 2 grey levels: horizontal and both diagonal neighbours always differ
    # (contrast 1, homogeneity 1/2, correlation -1), vertical ones never (0, 1, +1); energy 1/2 in all
    stripes = np.tile([0.0, 1.0, 0.0, 1.0], (4, 1))[None]
    f = dict(zip(D.FEATURE_NAMES, D.radiomics_features(stripes, np.ones_like(stripes, bool), levels=2)[0]))
    assert f["glcm_contrast"] == pytest.approx(3 / 4)
    assert f["glcm_dissimilarity"] == pytest.approx(3 / 4)
    assert f["glcm_homogeneity"] == pytest.approx((0.5 + 1 + 0.5 + 0.5) / 4)
    assert f["glcm_correlation"] == pytest.approx((-1 + 1 - 1 - 1) / 4)
    assert f["glcm_energy"] == pytest.approx(0.5)
    # one direction, with a mask: horizontal pairs (0,0) (0,1) (1,1) (1,1) (0,1) (1,0), symmetric
    img = np.array([[[0, 0, 1], [1, 1, 1], [0, 1, 0]]])
    p = D.glcm(img, np.ones_like(img, bool), 2, (0, 1))[0]
    assert p == pytest.approx(np.array([[2, 3], [3, 4]]) / 12)
    assert D.glcm_features(p[None])[0, 0] == pytest.approx(6 / 12)
    mask = np.ones_like(img, bool)
    mask[0, 2, 2] = False  # drops the last (1, 0) pair
    assert D.glcm(img, mask, 2, (0, 1))[0] == pytest.approx(np.array([[2, 2], [2, 4]]) / 10)


def test_frd(feats):
    real, other, scaled = feats
    assert D.frd(real, real) == pytest.approx(0, abs=1e-6)
    same = D.frd(real, other)
    values = [D.frd(real, scaled[k]) for k in (0.9, 0.7, 0.5)]
    assert same < values[0] < values[1] < values[2], (same, values)
    assert values[0] > 3 * same
    backwards = D.frd(scaled[0.7], real)
    assert 0.2 < backwards / values[1] < 5  # symmetric up to the z-scoring reference
    with pytest.raises(ValueError, match="feature counts"):
        D.frd(real, other[:, :5])


def test_kid(feats):
    real, other, scaled = feats
    same_mean, same_std = D.kid(real, other, subsets=20, subset_size=100)
    diff_mean, diff_std = D.kid(real, scaled[0.7], subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05 and same_std >= 0
    assert diff_mean > 0.2 and diff_mean > 10 * abs(same_mean) and diff_mean > 3 * diff_std
    assert D.kid(real, other, subsets=5, subset_size=50, seed=1) == D.kid(real, other, subsets=5, subset_size=50, seed=1)


def test_ssim_and_ms_ssim():
    x = torch.from_numpy(brains(4, 5))
    y = torch.from_numpy(brains(4, 6))
    assert D.ssim(x, x) == pytest.approx(1.0) and D.ms_ssim(x, x) == pytest.approx(1.0)
    assert np.all(D.ms_ssim(x, y) < 0.95) and np.all(D.ssim(x, y) < 0.95)
    assert np.all(D.ms_ssim(x, 0.8 * x) < 1) and np.all(D.ms_ssim(x, 0.8 * x) > D.ms_ssim(x, y))
    # constant images: only the luminance term differs from 1
    a, b = np.full((1, 16, 16), 0.5), np.full((1, 16, 16), 0.3)
    c1 = 0.01**2
    assert D.ssim(a, b)[0] == pytest.approx((2 * 0.5 * 0.3 + c1) / (0.25 + 0.09 + c1))
    assert [D.ms_ssim_levels(s) for s in (16, 32, 64, 128, 256)] == [1, 2, 3, 4, 5]
    assert D.ms_ssim(x[:, 8:40, 8:40], y[:, 8:40, 8:40]).shape == (4,)
    with pytest.raises(ValueError, match="at least 11"):
        D.ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))


def test_ms_ssim_diversity_detects_collapse():
    one = brains(1, 7)
    collapsed = np.repeat(one, 20, 0)
    diverse = brains(20, 8)
    assert D.ms_ssim_diversity(collapsed, pairs=50) == pytest.approx(1.0)
    assert D.ms_ssim_diversity(diverse, pairs=50) < 0.9
    assert D.ms_ssim_diversity(diverse, pairs=50, seed=3) == D.ms_ssim_diversity(diverse, pairs=50, seed=3)


def test_precision_recall():
    rng = np.random.default_rng(0)
    d, n = 8, 400
    centres = np.zeros((2, d))
    centres[1, 0] = 12.0
    real = centres[rng.integers(0, 2, n)] + rng.standard_normal((n, d))
    same = centres[rng.integers(0, 2, n)] + rng.standard_normal((n, d))
    p, r = D.precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    one_mode = centres[0] + rng.standard_normal((n, d))  # realistic but half the modes
    p, r = D.precision_recall(real, one_mode)
    assert p > 0.8 and r < 0.6
    off = centres[0] + 6.0 + rng.standard_normal((n, d))  # off the real manifold
    p, _ = D.precision_recall(real, off)
    assert p < 0.1
    with pytest.raises(ValueError, match="more than 3"):
        D.precision_recall(real, same[:3])
