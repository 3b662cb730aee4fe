"""Weight-free distances: radiomics features, RadFD-20, KID, MS-SSIM diversity, precision/recall;
precision/recall and the MS-SSIM reference also on real IXI T1 slices from ../shared/data (skipped
when absent); MS-SSIM against MONAI's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medgen.config import Config
from medgen.data.nifti import load_mask, load_volume
from medgen.data.preprocess import preprocess_subject
from medgen.evaluation import distances as D

IXI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ixi-t1"
needs_ixi = pytest.mark.skipif(not (IXI / "scans").is_dir(),
                               reason=f"real scans not found at {IXI} (see /work/shared/data/README.md)")


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


def test_radfd(feats):
    real, other, scaled = feats
    assert D.radfd(real, real) == pytest.approx(0, abs=1e-6)
    same = D.radfd(real, other)
    values = [D.radfd(real, scaled[k]) for k in (0.9, 0.7, 0.5)]
    assert same < values[0] < values[1] < values[2], (same, values)
    assert values[0] > 3 * same
    backwards = D.radfd(scaled[0.7], real)
    assert 0.2 < backwards / values[1] < 5  # symmetric up to the z-scoring reference
    # the Fréchet distance of the real set's z-scores (the sqrtm route gives the same, test_fid.py)
    from medgen.evaluation.fid import frechet_distance, statistics
    z_real, z_other = D.standardise(real, other)
    assert same == pytest.approx(frechet_distance(*statistics(z_real), *statistics(z_other)), rel=1e-9)
    with pytest.raises(ValueError, match="feature counts"):
        D.radfd(real, other[:, :5])
    with pytest.raises(ValueError, match="RadFD-20 needs at least 2"):
        D.radfd(real, other[:1])


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
    with pytest.raises(ValueError, match="at least 2"):
        D.ms_ssim_diversity(one)


def test_brain_boxes_and_pair_box_by_hand():
    x = np.zeros((3, 64, 64))
    x[0, 10:21, 5:31] = 0.5
    x[0, 60, 60] = 0.9  # a stray speck: < 10 % of the brain's area, not brain
    x[1, 30:34, 2:6] = x[1, 30:34, 40:44] = 0.5  # two parts of equal size: both brain
    boxes = D.brain_boxes(x)
    assert boxes.tolist() == [[10, 21, 5, 31], [30, 34, 2, 44], [0, 64, 0, 64]]  # the last: empty
    # the union of the two boxes, widened about its centre to 44 px (3 scales at 64) inside the slice
    assert D.pair_box(boxes[0], boxes[1], (64, 64)) == (0, 44, 1, 45)
    assert D.pair_box((50, 60, 0, 64), (55, 64, 0, 64), (64, 64)) == (20, 64, 0, 64)
    assert D.pair_box((0, 10, 0, 10), (0, 10, 0, 10), (32, 32)) == (0, 22, 0, 22)  # 2 scales at 32


def test_ms_ssim_ignores_the_background_around_the_brain():
    small = brains(12, 9, s=32)
    rng = np.random.default_rng(0)
    i = rng.integers(0, 12, 40)
    j = (i + rng.integers(1, 12, 40)) % 12
    whole, boxed = [], []
    for size in (64, 80):  # the same brains in a wider and a still wider empty frame (3 scales both)
        framed = np.zeros((12, size, size))
        at = (size - 32) // 2
        framed[:, at:at + 32, at:at + 32] = small
        whole.append(D.ms_ssim(framed[i], framed[j]).mean())  # every empty window counts as SSIM 1
        boxed.append(D.ms_ssim_pairs(framed, i, j))
    assert boxed[0].shape == (40,)
    assert whole[1] > whole[0] > boxed[0].mean() + 0.02  # the whole square drifts with the frame ...
    assert boxed[1] == pytest.approx(boxed[0], abs=1e-12)  # ... the brain's box does not


def test_ms_ssim_equals_monai():
    monai = pytest.importorskip("monai.metrics.regression", reason="MONAI (a test dependency) is not installed")
    rng = np.random.default_rng(4)
    a, b = brains(6, 10), brains(6, 11)
    b[:3] = np.clip(a[:3] + 0.05 * rng.standard_normal(a[:3].shape), 0, 1)  # near pairs too
    ta, tb = (torch.from_numpy(v[:, None]).float() for v in (a, b))
    weights = np.array(D.MS_SSIM_WEIGHTS[:3]) / sum(D.MS_SSIM_WEIGHTS[:3])  # our 3 scales at 64x64
    theirs = monai.compute_ms_ssim(ta, tb, spatial_dims=2, data_range=1.0, weights=tuple(weights))
    np.testing.assert_allclose(D.ms_ssim(a, b), theirs.numpy().ravel(), rtol=1e-4)
    ssim_map, _ = monai.compute_ssim_and_cs(ta, tb, spatial_dims=2, kernel_size=(11, 11), kernel_sigma=(1.5, 1.5))
    np.testing.assert_allclose(D.ssim(a, b), ssim_map.flatten(1).mean(1).numpy(), rtol=1e-4)
    # a box-shaped crop, as ms_ssim_pairs compares
    crop = (slice(None), slice(8, 52), slice(4, 54))
    theirs = monai.compute_ms_ssim(ta[crop[:1] + (slice(None),) + crop[1:]], tb[crop[:1] + (slice(None),) + crop[1:]],
                                   spatial_dims=2, data_range=1.0, weights=tuple(weights))
    np.testing.assert_allclose(D.ms_ssim(a[crop], b[crop]), theirs.numpy().ravel(), rtol=1e-4)


def test_precision_recall():
    rng = np.random.default_rng(0)
    d, n = 8, 400
    centres = np.zeros((2, d))
    centres[1] = 6.0  # two modes apart in every feature: correlated features, as radiomics
    real = centres[rng.integers(0, 2, n)] + rng.standard_normal((n, d))
    same = centres[rng.integers(0, 2, n)] + rng.standard_normal((n, d))
    one_mode = centres[0] + rng.standard_normal((n, d))  # realistic but half the modes
    off = centres[0] + 3.0 + rng.standard_normal((n, d))  # off the real manifold (between the modes)
    for setting in ({"k": 3, "components": None}, {}):  # the paper's, and ours (2 principal components)
        p, r = D.precision_recall(real, same, **setting)
        assert p > 0.8 and r > 0.8
        p, r = D.precision_recall(real, one_mode, **setting)
        assert p > 0.8 and r < 0.6
        p, _ = D.precision_recall(real, off, **setting)
        assert p < 0.1
    with pytest.raises(ValueError, match="more than 5"):
        D.precision_recall(real, same[:5])


def test_principal_components():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((200, 3)) * [5.0, 1.0, 0.1]
    fake = real[:50] + [0.0, 0.0, 3.0]  # moved along the real set's least varying axis only
    r, f = D.principal_components(real, fake, 2)
    assert r.shape == (200, 2) and f.shape == (50, 2)
    np.testing.assert_allclose(r.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(r.std(0), 1)
    np.testing.assert_allclose(np.abs(np.corrcoef(r[:, 0], real[:, 0])[0, 1]), 1, atol=1e-3)
    np.testing.assert_allclose(f, r[:50], atol=1e-2)  # invisible in the 2 leading components


# ---- real IXI T1 slices ----------------------------------------------------------------------------

SIGMAS = (0.5, 1.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def ixi_halves():
    """Healthy axial slices (default preprocessing: 64 px, 2 mm, their reference brain masks) of 12
    IXI T1 subjects, as two sets of 64 slices drawn from disjoint halves of 6 subjects each."""
    cfg = Config().data
    scans = sorted((IXI / "scans").glob("*_T1.nii.gz"))[:12]
    subjects = [preprocess_subject(load_volume(scan), cfg, brain=load_mask(
        IXI / "brainmasks" / scan.name.replace("_T1.nii.gz", "_brainmask.nii.gz"))).images for scan in scans]
    rng = np.random.default_rng(0)
    halves = [np.concatenate(subjects[start::2]) for start in (0, 1)]
    return [h[rng.permutation(len(h))[:64]] for h in halves]


@needs_ixi
def test_precision_recall_on_real_slices_is_one_for_real_and_graded_for_blur(ixi_halves):
    a, b = ixi_halves
    fa, fb = D.radiomics_features(a), D.radiomics_features(b)
    blurred = [D.radiomics_features(np.clip(gaussian_filter(b, (0, s, s)), 0, 1)) for s in SIGMAS]
    p, r = D.precision_recall(fa, fb)
    assert p >= 0.9 and r >= 0.9, (p, r)
    values = [D.precision_recall(fa, f) for f in blurred]
    precision = [v[0] for v in values]
    assert precision[0] > 0.7 and 0.2 < precision[1] < 0.8 and precision[-1] < 0.1, precision
    assert all(x > y for x, y in zip(precision, precision[1:-1])), precision  # graded: falls with sigma
    assert values[-1][1] < 0.1  # nor does the blurred set cover the real one
    # the paper's setting in all 20 dimensions says nothing here: 0 from 1 pixel of blur on
    p_all, r_all = D.precision_recall(fa, blurred[1], k=3, components=None)
    assert p_all < 0.1 and r_all < 0.1


@needs_ixi
def test_ms_ssim_real_reference_on_real_slices(ixi_halves):
    a, b = ixi_halves
    values = [D.ms_ssim_diversity(h) for h in (a, b)]
    assert all(0.15 < v < 0.4 for v in values), values
    assert abs(values[0] - values[1]) < 0.1  # a reference: about the same for other subjects
    rng = np.random.default_rng(0)
    i = rng.integers(0, 64, 500)
    j = (i + rng.integers(1, 64, 500)) % 64
    assert D.ms_ssim(a[i], a[j]).mean() > values[0] + 0.05  # the whole square counts background as 1
    assert D.ms_ssim_diversity(np.repeat(a[:1], 10, 0)) == pytest.approx(1.0)
