"""FID as pytorch-fid defines it: Fréchet distance numerics, the FID InceptionV3's layout and
preprocessing, and the weights loading path (with a randomly initialised network saved in the
weights file's format; the real weights are never downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from medgen.evaluation import fid as fidmod
from medgen.evaluation.fid import (
    InceptionFeatures, find_weights, frechet_distance, frechet_distance_features, statistics, unavailable_message,
)
from medgen.evaluation.inception import FIDInceptionV3


def _psd_sqrt(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_symmetric(mu1, s1, mu2, s2):
    """Independent: ||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), all by eigendecomposition."""
    r = _psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r @ s2 @ r)))


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    v1, v2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # 1-d: (m1-m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


def test_frechet_full_covariances_vs_eigendecomposition():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = _random_cov(rng, 12), _random_cov(rng, 12)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(_frechet_symmetric(mu1, s1, mu2, s2), rel=1e-8)
    assert d == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8  # identical statistics
    assert d > 0


def _frechet_sqrtm(x, y):
    """pytorch-fid's computation: scipy's sqrtm of the product of the covariances (real part)."""
    (m1, s1), (m2, s2) = statistics(x), statistics(y)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _features(rng, n, d, shift=0.0):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


def test_low_rank_trace_equals_sqrtm_full_rank():
    # more samples than dimensions (n > D): the QR branch; full-rank covariances, sqrtm is accurate
    rng = np.random.default_rng(2)
    x, y = _features(rng, 200, 16), _features(rng, 300, 16, 0.2)
    expected = _frechet_sqrtm(x, y)
    assert frechet_distance_features(x, y) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(*statistics(x), *statistics(y)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_features(y, x) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n, m, d", [(10, 15, 64), (30, 20, 64), (64, 64, 256)])
def test_low_rank_trace_equals_sqrtm_rank_deficient(n, m, d):
    # fewer samples than dimensions, as FID on 64 images x 2048 features: singular covariances,
    # where sqrtm itself is only accurate to ~1e-7 relative
    rng = np.random.default_rng(n + m)
    x, y = _features(rng, n, d), _features(rng, m, d, 0.2)
    assert np.linalg.matrix_rank(np.cov(x, rowvar=False)) == n - 1 < d
    d_fast = frechet_distance_features(x, y)
    assert d_fast == pytest.approx(_frechet_sqrtm(x, y), rel=1e-6)
    assert frechet_distance(*statistics(x), *statistics(y)) == pytest.approx(d_fast, rel=1e-10)
    m1, s1 = statistics(x)
    # identical sets: 0 up to round-off (sqrtm leaves ~1e-5 relative here)
    assert abs(frechet_distance_features(x, x)) < 1e-10 * np.trace(s1)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-10 * np.trace(s1)


def test_frechet_rejects_what_is_not_a_covariance():
    rng = np.random.default_rng(3)
    mu, s1, s2 = rng.normal(size=5), _random_cov(rng, 5), _random_cov(rng, 5)
    bad = s2 - 2 * np.linalg.eigvalsh(s2).max() * np.outer(np.eye(5)[0], np.eye(5)[0])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, bad, mu, s2)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, s1, mu, bad)
    with pytest.raises(ValueError, match="feature counts"):
        frechet_distance_features(rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance_features(rng.normal(size=(1, 3)), rng.normal(size=(4, 3)))


def test_statistics():
    x = np.random.default_rng(4).normal(size=(20, 3)).astype(np.float32)
    mu, sigma = statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64).T))
    with pytest.raises(ValueError):
        statistics(x[:1])


# ---- network layout and preprocessing -------------------------------------------------------------

def test_state_dict_matches_pytorch_fid_layout():
    net = FIDInceptionV3()
    sd = net.state_dict()
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.bias": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)  # the FID file has no aux classifier
    assert all(k.split(".")[-1] in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
               for k in sd)
    # torchvision inception_v3's documented 27,161,264 parameters, less the aux classifier
    # (3,326,696), plus 8 more classes on fc (1008 vs 1000: 8 x 2049)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert sum(1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)) == 94
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def _bilinear_half_pixel(img: np.ndarray, out: int) -> np.ndarray:
    """Independent numpy bilinear resize with pixel-centre alignment (align_corners=False)."""
    def weights(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        m = np.zeros((out, n_in))
        m[np.arange(out), i0] += 1 - (src - i0)
        m[np.arange(out), i1] += src - i0
        return m
    return weights(img.shape[0]) @ img @ weights(img.shape[1]).T


def test_preprocessing_resizes_bilinear_and_scales_to_minus_one_one():
    x = torch.rand(2, 3, 20, 27, dtype=torch.float64)
    y = FIDInceptionV3.preprocess(x)
    assert y.shape == (2, 3, 299, 299)
    ref = 2 * _bilinear_half_pixel(x[1, 2].numpy(), 299) - 1
    np.testing.assert_allclose(y[1, 2].numpy(), ref, atol=1e-10)
    # float32 bilinear weights sum to 1 only up to rounding (how far depends on the thread count)
    torch.testing.assert_close(FIDInceptionV3.preprocess(torch.zeros(1, 3, 8, 8)), torch.full((1, 3, 299, 299), -1.0))
    torch.testing.assert_close(FIDInceptionV3.preprocess(torch.ones(1, 3, 8, 8)), torch.full((1, 3, 299, 299), 1.0))


# ---- weights: finding and loading ---------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A randomly initialised FID InceptionV3 saved as pytorch-fid's weights file is (a state dict).
    He-initialised convolutions keep the activations' scale through the 94 layers (PyTorch's
    default init shrinks them to ~1e-8, where every image looks alike); BN statistics perturbed so
    they matter."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("hub") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights_file):
    return InceptionFeatures(weights_file)


def test_find_weights_and_unavailable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    assert find_weights(missing) is None
    assert fidmod.fid(np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 8)), weights=None) is None
    assert unavailable_message(missing) == f"FID: unavailable (no InceptionV3 weights found at {missing})"
    # the default: the torch hub cache (follows $TORCH_HOME); a configured path takes precedence
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert fidmod.default_weights() == hub_file
    assert find_weights() is None
    assert str(hub_file) in unavailable_message()
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert find_weights() == hub_file
    assert find_weights(missing) is None


def _distinct_images(n: int, channels: int = 1, size: int = 40) -> torch.Tensor:
    """Images a random network tells apart: different brightness and structure (noise alone
    averages out in the pooled features of a random network)."""
    ramp = torch.linspace(0, 1, size)
    shapes = [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
              (ramp[None, :] * ramp[:, None]), 1 - ramp[None, :].expand(size, size)]
    return torch.stack([(0.3 + 0.7 * (i + 1) / n) * shapes[i % 4] for i in range(n)])[:, None].repeat(
        1, channels, 1, 1).contiguous()


def test_loading_and_features(weights_file, extractor):
    assert find_weights(weights_file) == weights_file
    assert find_weights(str(weights_file)) == weights_file
    assert not extractor.net.training
    assert not any(p.requires_grad for p in extractor.net.parameters())
    grey = _distinct_images(3)
    extractor.batch_size = 2  # two batches
    f = extractor(grey.numpy())
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1])
    # grey images are the same as their three-channel copies
    extractor.batch_size = 50
    f3 = extractor(grey[:2].repeat(1, 3, 1, 1))
    np.testing.assert_allclose(f3, f[:2], rtol=1e-5, atol=1e-6)
    # ... and those are the network's pooled features of the resized, rescaled images
    with torch.no_grad():
        direct = extractor.net(grey[:1].repeat(1, 3, 1, 1)).double().numpy()
    np.testing.assert_allclose(direct, f[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(4 * grey - 2)
    with pytest.raises(ValueError, match="shape"):
        extractor(grey[:, 0])


def test_wrong_weights_file_fails_naming_it(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    state["Mixed_7c.branch_pool.conv.kernel"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    bad = tmp_path / "other_inception.pth"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="other_inception.pth") as err:
        InceptionFeatures(bad)
    assert "Mixed_7c.branch_pool.conv" in str(err.value)
    with pytest.raises(FileNotFoundError):
        InceptionFeatures(tmp_path / "absent.pth")


def test_fid_end_to_end_wiring(weights_file, extractor, monkeypatch):
    # check what fid() hands to the Fréchet distance (the distance itself is tested above)
    seen = {}

    def spy(x, y):
        seen.update(x=x, y=y)
        return 1.5

    monkeypatch.setattr(fidmod, "frechet_distance_features", spy)
    images = _distinct_images(4, size=32).numpy()
    real, fake = images[:2], images[2:]
    assert fidmod.fid(real, fake, weights_file) == 1.5
    assert seen["x"].shape == seen["y"].shape == (2, 2048)
    np.testing.assert_allclose(seen["x"], extractor(real), rtol=1e-5, atol=1e-7)
    assert not np.allclose(seen["x"], seen["y"])
