"""Brain extraction (data.brain_mask: deepbet model / Otsu threshold / auto) and N4 bias correction
(data.bias_correction) on real IXI heads from ../shared/data and on small synthetic volumes."""

from pathlib import Path

import numpy as np
import pytest

from conftest import make_plain_site
from medgen.config import ConfigError, DataConfig, load_config
from medgen.data import brain_mask
from medgen.data.bias import n4_correct
from medgen.data.dataset import _cache_key, load_site
from medgen.data.nifti import load_mask, load_volume
from medgen.data.preprocess import brain_mask_estimate, resample_image, resample_mask, target_grid
from medgen.data.sites import discover_site

IXI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi-t1"
needs_ixi = pytest.mark.skipif(not (IXI / "scans").is_dir(), reason=f"real IXI scans not found at {IXI}")
needs_deepbet = pytest.mark.skipif(brain_mask._model_problem() is not None,
                                   reason=f"deepbet unusable: {brain_mask._model_problem()}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def ixi_head(subject: str):
    """(image Volume, 2 mm RAS+ data, Grid, reference brain mask bool) of one shared IXI subject."""
    image = load_volume(IXI / "scans" / f"{subject}_T1.nii.gz", None, 512**3)
    reference = load_mask(IXI / "brainmasks" / f"{subject}_brainmask.nii.gz", None, 512**3)
    grid = target_grid(image.data.shape, image.affine, (2.0, 2.0, 2.0))
    return image, resample_image(image, grid), grid, resample_mask(reference, grid)


@needs_ixi
@needs_deepbet
@pytest.mark.parametrize("subject", ["IXI012-HH-1211", "IXI033-HH-1259"])
def test_deepbet_mask_matches_the_reference_on_real_heads(subject):
    if not (IXI / "scans" / f"{subject}_T1.nii.gz").is_file():
        pytest.skip(f"{subject} not in {IXI}")
    image, data, grid, reference = ixi_head(subject)
    model = brain_mask_estimate(data, grid, "model", image)
    threshold = brain_mask_estimate(data, grid, "threshold", image)
    assert dice(model, reference) >= 0.9
    assert dice(threshold, reference) < dice(model, reference)  # the heuristic keeps skull base and neck


def test_auto_picks_the_model_when_deepbet_is_usable_else_the_threshold(monkeypatch):
    assert brain_mask.resolve("threshold") == ("threshold", None)
    if brain_mask._model_problem() is None:
        assert brain_mask.resolve("auto") == ("model", None)
        assert brain_mask.cache_tag("model").startswith("deepbet-1.0.")
    monkeypatch.setattr(brain_mask, "_model_problem", lambda: "deepbet is not installed")
    method, note = brain_mask.resolve("auto")
    assert method == "threshold" and "deepbet is not installed" in note
    with pytest.raises(ConfigError, match="data.brain_mask=model: deepbet is not installed"):
        brain_mask.resolve("model")


def test_missing_weight_file_is_named(monkeypatch):
    from medgen._compat import deepbet

    if deepbet.unavailable_reason() is not None:
        pytest.skip("deepbet not installed")
    monkeypatch.setattr(deepbet, "WEIGHTS", ("data/models/model.pt", "data/models/gone.pt"))
    assert "gone.pt is missing" in deepbet.unavailable_reason()


def test_threshold_setting_and_notes_say_which_mask_was_used(tmp_path, cfg):
    site = make_plain_site(tmp_path / "site", n_healthy=2, n_lesion=0)
    s = load_site(site, cfg.data)  # conftest's cfg: data.brain_mask=threshold
    assert len(s) > 0 and s.brain.any()
    assert any("2 by the threshold (Otsu) estimate (data.brain_mask=threshold)" in n for n in s.notes)


def test_config_validates_the_new_keys():
    cfg = load_config(None, [])
    assert (cfg.data.brain_mask, cfg.data.bias_correction) == ("auto", "none")
    with pytest.raises(ConfigError, match="data.brain_mask"):
        load_config(None, ["data.brain_mask=bet"])
    with pytest.raises(ConfigError, match="data.bias_correction"):
        load_config(None, ["data.bias_correction=yes"])


def test_cache_key_follows_the_brain_mask_method_and_bias_correction(tmp_path, monkeypatch):
    scan = discover_site(make_plain_site(tmp_path / "site", 1, 0), DataConfig()).scans[0]
    monkeypatch.setattr(brain_mask, "_model_problem", lambda: None)
    monkeypatch.setattr(brain_mask, "cache_tag", lambda m: "deepbet-1.0.2" if m == "model" else m)
    key = lambda **kw: _cache_key(scan, DataConfig(**kw))  # noqa: E731
    assert key(brain_mask="threshold") != key(brain_mask="model")
    assert key(brain_mask="auto") == key(brain_mask="model")  # the method auto resolves to, not the word
    assert key(bias_correction="n4") != key(bias_correction="none")
    monkeypatch.setattr(brain_mask, "_model_problem", lambda: "not installed")
    assert key(brain_mask="auto") == key(brain_mask="threshold")


def test_n4_removes_a_multiplicative_bias_inside_the_brain():
    shape, spacing = (40, 48, 40), (2.0, 2.0, 2.0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    brain = r < 1
    rng = np.random.default_rng(0)
    tissue = np.where(brain, 100.0 + rng.normal(0, 2, shape), 0.0)
    bias = np.exp(0.25 * grid[0] + 0.15 * grid[1] - 0.2 * grid[2])  # smooth, ±30 % across the brain
    corrected = n4_correct((tissue * bias).astype(np.float32), brain, spacing)
    cv = lambda a: a[brain].std() / a[brain].mean()  # noqa: E731
    assert cv(tissue * bias) > 0.1
    assert cv(corrected) < 0.5 * cv(tissue * bias)
    assert abs(corrected[brain].mean() / (tissue * bias)[brain].mean() - 1) < 0.1  # the scale is kept
