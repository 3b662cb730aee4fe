"""Mask-conditioned synthesis (model.mask_conditioning, `medgen synthesize`): the condition, the
masks read and drawn, the command's files and errors, and that a trained model puts its lesion
where the mask is. Tiny images and short chains throughout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.cli.main import main
from medgen.config import ConfigError, DataConfig, dump_config, load_config
from medgen.data.lesion_masks import (deform, place_inside, read_mask_files, targeted_masks, to_display,
                                      write_slice)
from medgen.evaluation.synthesis import contrast, mask_test, ring, synthesize
from medgen.models import HEALTHY, LESION, build_model
from medgen.models import mask_conditioning as mc
from medgen.strictjson import loads

SIZE = 32


def make_cfg(space: str = "latent", *overrides: str, mask: bool = True, size: int = SIZE):
    """A tiny mask-conditioned DDPM in ``space`` (latent / pixel); space ``gan``: the SPADE GAN."""
    if space == "gan":
        return load_config(None, ["model.family=gan", f"model.mask_conditioning={mask}", "model.width=8",
                                  "model.latent_dim=16", f"data.image_size={size}", *overrides])
    return load_config(None, ["model.family=ddpm", f"model.space={space}", f"model.mask_conditioning={mask}",
                              "model.width=8", f"data.image_size={size}", "model.timesteps=100",
                              "model.ddim_steps=5", "model.anomaly_t=20", *overrides])


def disc(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2


def phantom_batch(n: int, g: torch.Generator, size: int = SIZE):
    """Brain-like discs in [0, 1]; odd items hold a dark blob (a lesion, as in the phantom) of random
    place and size inside the brain, and its mask. (images (n, 1, S, S), labels (n,), masks (n, 1, S, S) bool)."""
    brain = disc(size, 0, 0, 0.85)
    images = (brain * (0.6 + 0.3 * disc(size, 0, 0, 0.5))).float().expand(n, 1, size, size).clone()
    labels = torch.arange(n) % 2
    centres, radii = (torch.rand(n, 2, generator=g) - 0.5) * 0.9, 0.12 + 0.1 * torch.rand(n, generator=g)
    masks = torch.stack([disc(size, float(c[0]), float(c[1]), float(r)) for c, r in zip(centres, radii)])
    masks = masks & brain & (labels == LESION).view(-1, 1, 1)
    images = images * (1 - 0.7 * masks[:, None].float())
    images = (images + 0.03 * torch.randn(images.shape, generator=g) * brain).clamp(0, 1)
    return images, labels, masks[:, None]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ the condition
def test_masks_are_area_downsampled_to_the_latent_grid():
    masks = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    masks[0, 0, 8:12, 8:12] = True  # exactly latent cell (2, 2)
    masks[1, 0, 0:2, 0:4] = True  # half of cell (0, 0)
    small = mc.downsample(masks, SIZE // 4)
    assert small.shape == (2, 1, 8, 8) and small.dtype == torch.float32
    assert small[0, 0, 2, 2] == 1 and small[0].sum() == 1
    assert small[1, 0, 0, 0] == 0.5 and small[1].sum() == 0.5
    with pytest.raises(ValueError):
        mc.downsample(masks, 5)


def test_healthy_masks_are_empty_and_lesions_without_pixels_unknown():
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 2, 2] = masks[1, 0, 3:5, 3:5] = True  # a stray pixel on a healthy slice; a lesion
    labels = torch.tensor([HEALTHY, LESION, LESION])  # the third: labelled lesion, no mask pixels
    cleared, known = mc.known_masks(labels, masks, 3, "cpu")
    assert cleared[0].sum() == 0 and cleared[1].sum() == 4 and known.tolist() == [True, True, False]
    cond = mc.condition(cleared, known, 4)
    assert cond.shape == (3, 2, 4, 4) and cond[:, 1].amax((1, 2)).tolist() == [1, 1, 0]
    assert cond[2].abs().sum() == 0
    none, unknown = mc.known_masks(labels, None, 3, "cpu")
    assert none is None and not unknown.any()


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_the_unet_sees_the_mask_on_its_own_grid(space):
    model = build_model(make_cfg(space), seed=0)
    unet = model.networks["ldm"].unet if space == "latent" else model.networks["unet"]
    seen = []
    unet.full_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    images, labels, masks = phantom_batch(4, seeded(0))
    model.train_step(images, labels, model.make_optimizers(), 0, masks=masks)
    side, channels = (SIZE // 4, 4) if space == "latent" else (SIZE, 1)
    assert seen[0] == (4, channels + mc.MASK_CHANNELS, side, side)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("space", ["latent", "pixel", "gan"])
def test_masked_samples_shapes_determinism_and_mask_dependence(space):
    model = build_model(make_cfg(space), seed=0)
    labels = torch.tensor([LESION, LESION, HEALTHY])
    masks = torch.stack([disc(SIZE, 0.2, -0.2, 0.3), disc(SIZE, -0.3, 0.3, 0.2), disc(SIZE, 0, 0, 0.2)])[:, None]
    a = model.sample_masked(labels, masks, seeded(1))
    assert a.shape == (3, 1, SIZE, SIZE) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, model.sample_masked(labels, masks, seeded(1)))
    assert not torch.allclose(a, model.sample_masked(labels, masks, seeded(2)))
    moved = model.sample_masked(labels, masks.roll(5, dims=-1), seeded(1))
    assert (moved[:2] - a[:2]).abs().max() > 1e-5  # the lesion slices follow their masks
    assert torch.equal(moved[2], a[2])  # a healthy slice's mask is empty whatever is given
    with pytest.raises(ValueError, match="data.image_size"):
        model.sample_masked(labels, masks[:, :, :16, :16], seeded(1))


def test_models_without_mask_conditioning_refuse_masks():
    for cfg in (make_cfg(mask=False), make_cfg("gan", mask=False),
                load_config(None, ["model.family=vae", f"data.image_size={SIZE}"])):
        with pytest.raises(mc.MaskConditioningError, match="retrain with model.mask_conditioning=true"):
            build_model(cfg, seed=0).sample_masked(torch.tensor([LESION]), torch.zeros(1, 1, SIZE, SIZE, dtype=bool))


def test_mask_conditioning_is_refused_for_other_families():
    with pytest.raises(ConfigError, match="model.mask_conditioning=true is implemented for model.family=ddpm / gan"):
        load_config(None, ["model.family=vae", "model.mask_conditioning=true"])
    assert load_config(None, []).model.mask_conditioning is False


def test_site_training_hands_the_lesion_masks_to_the_model(monkeypatch):
    from medgen.client.task import train_local
    from medgen.data.dataset import SiteSlices

    images, labels, masks = phantom_batch(6, seeded(0))
    data = SiteSlices("A", images[:, 0].numpy(), np.ones((6, SIZE, SIZE), bool), masks[:, 0].numpy(),
                      labels.numpy(), np.array(["s"] * 6), np.arange(6))
    cfg = make_cfg("pixel", "train.local_steps=2", "train.batch_size=6")
    model = build_model(cfg, seed=0)
    seen = []
    step = model.train_step
    monkeypatch.setattr(model, "train_step", lambda x, y, *a, masks=None: seen.append((y, masks)) or step(
        x, y, *a, masks=masks))
    train_local(model, data, cfg, seed=0)
    assert len(seen) == 2
    for y, m in seen:
        assert m.shape == (6, 1, SIZE, SIZE) and m.dtype == torch.bool
        assert all(bool(mi.any()) == (yi == LESION) for yi, mi in zip(y, m))


# ------------------------------------------------------------------------------ masks in and out
def test_written_mask_slices_read_back_unchanged(tmp_path):
    cfg = DataConfig(image_size=SIZE)
    masks = [disc(SIZE, 0.3, -0.4, 0.25).numpy(), disc(SIZE, -0.2, 0.1, 0.15).numpy()]
    for i, m in enumerate(masks):
        write_slice(tmp_path / f"m{i}.nii.gz", m, "test")
    got = read_mask_files(tmp_path, cfg)
    assert got.masks.shape == (2, SIZE, SIZE) and all(np.array_equal(a, b) for a, b in zip(got.masks, masks))
    img = nib.load(tmp_path / "m0.nii.gz")
    assert img.shape == (SIZE, SIZE, 1) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.array_equal(to_display(np.asarray(img.dataobj)[:, :, 0] > 0), masks[0])


def test_a_mask_volume_gives_its_lesion_slices(tmp_path):
    vol = np.zeros((40, 40, 20), np.uint8)
    vol[10:20, 20:30, 5:9] = 1  # a box lesion on 4 axial slices, 1 mm voxels
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "lesion.nii.gz")
    got = read_mask_files(tmp_path, DataConfig(image_size=SIZE, spacing_mm=(1.0, 1.0, 1.0)))
    assert len(got.masks) == 4 and all(m.sum() >= 4 for m in got.masks)
    assert got.sources[0].startswith("lesion.nii.gz[z=")
    # RAS x (patient left -> right) is the display's columns, y (posterior -> anterior) its rows upwards
    rows, cols = np.nonzero(got.masks[0])
    assert cols.mean() < SIZE / 2 and rows.mean() < SIZE / 2  # x 10..20 of 40: left half; y 20..30: anterior


def test_deformed_lesions_are_new_and_placed_inside_the_brain():
    rng = np.random.default_rng(0)
    brain = disc(SIZE, 0, 0, 0.8).numpy()
    lesion = disc(SIZE, 0.5, 0.5, 0.25).numpy() & brain
    shapes = [deform(lesion, rng) for _ in range(5)]
    assert all(s.any() for s in shapes) and any(not np.array_equal(s, lesion) for s in shapes)
    assert all(0.3 < s.sum() / lesion.sum() < 3 for s in shapes)
    placed = place_inside(shapes[0], brain, rng)
    assert placed is not None and placed.sum() == shapes[0].sum() and not (placed & ~brain).any()
    stack = np.stack([lesion, np.zeros_like(lesion)])
    a = targeted_masks(stack, np.stack([brain, brain]), 6, seed=3, min_pixels=4)
    b = targeted_masks(stack, np.stack([brain, brain]), 6, seed=3, min_pixels=4)
    assert a.masks.shape == (6, SIZE, SIZE) and np.array_equal(a.masks, b.masks)
    assert not (a.masks & ~brain).any() and len({m.tobytes() for m in a.masks}) > 1
    with pytest.raises(ConfigError, match="--from-site"):
        targeted_masks(stack[1:], stack[:1], 2, seed=0, min_pixels=4)


# ------------------------------------------------------------------------------ the intensity test
def test_class_distances_read_against_real_vs_real():
    """Samples drawn from the real slices score about what two real draws do; flat squares score far
    more; a class with fewer than 2 n real slices gets no row."""
    from medgen.evaluation.synthesis import class_distances

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
    real = np.stack([(np.hypot(xx, yy) < 0.6 + 0.2 * rng.random()) * (0.5 + 0.3 * rng.random((32, 32)))
                     for _ in range(120)]).astype(np.float32)
    labels = np.where(np.arange(120) < 100, HEALTHY, LESION)
    flat = np.full((8, 32, 32), 0.5, np.float32)
    samples = {"healthy": real[:8], "lesion": flat, "label-only": flat}
    out = class_distances(samples, real, labels)
    h, les = out["healthy"], out["lesion"]
    assert (h["n-generated"], h["n-real"], les["n-real"]) == (8, 100, 20)
    assert les["kid"] > 10 * max(les["kid-real-vs-real"], h["kid"], 1e-3)
    assert les["radfd-20"] > 10 * h["radfd-20-real-vs-real"]
    few = class_distances({k: np.concatenate([v, v]) for k, v in samples.items()}, real, labels)
    assert "lesion" not in few and "healthy" in few  # 16 samples need 32 real lesion slices, there are 20


def test_contrast_is_ring_minus_inside():
    mask = np.zeros((16, 16), bool)
    mask[6:10, 6:10] = True
    image = np.full((16, 16), 0.8, np.float32)
    image[mask] = 0.2
    assert contrast(image, mask, np.ones_like(mask)) == pytest.approx(0.6)
    assert ring(mask).sum() == 10 * 10 - 16 and not (ring(mask) & mask).any()
    assert np.isnan(contrast(image, np.zeros_like(mask), np.ones_like(mask)))
    samples = {"lesion": image[None], "healthy": np.full((1, 16, 16), 0.8, np.float32), "label-only": image[None]}
    res = mask_test(samples, mask[None])
    assert res["n"] == 1 and res["contrast-gain"]["mean"] == pytest.approx(0.6)
    assert res["change-ring"]["mean"] == 0 and res["change-ratio"] is None  # nothing changed outside: no ratio
    json.loads(json.dumps(res, allow_nan=False))


def _trained_mask_test(model, steps: int) -> dict:
    """``model`` trained ``steps`` steps (batch 16) on the discs with dark blobs, then the mask test
    (``mask_test``) on 8 held-out blob masks."""
    optimizers, g = model.make_optimizers(), seeded(0)
    for step in range(steps):
        images, labels, masks = phantom_batch(16, g)
        model.train_step(images, labels, optimizers, step, masks=masks)
    _, _, masks = phantom_batch(16, seeded(99))
    test = masks[1::2, 0].numpy()
    return mask_test(synthesize(model, test, seed=0), test)


def test_trained_lesions_appear_where_the_mask_is():
    """150 steps (batch 16) on discs with dark blobs of random place and size (pixel space, 32 px,
    no attention, T = 100): lesion samples given a mask are darker inside it than on the ring around
    it, by far more than the healthy samples from the same noise and the lesion label without the
    mask. Measured (n = 8): contrast lesion +0.36, healthy -0.07, label only -0.07; gain > 0 for 8 of
    8; |lesion - healthy| 7.7x larger inside the mask than on the ring. (The latent space learns it
    slower: after 600 steps contrast -0.005 vs healthy -0.055, ratio 4.2; after 150 none.)"""
    res = _trained_mask_test(build_model(make_cfg("pixel", "model.attention=false", "model.ddim_steps=10"), seed=0), 150)
    c = res["contrast"]
    assert res["n"] == 8
    assert c["lesion"]["mean"] > 0.2 and c["lesion"]["mean"] > max(c["healthy"]["mean"], c["label-only"]["mean"]) + 0.2
    assert res["gain-positive-share"] >= 0.75 and res["change-ratio"] > 3


@pytest.mark.parametrize("fakes", ["real", "synthetic"])
def test_trained_gan_lesions_appear_where_the_mask_is(fakes):
    """The SPADE GAN, 300 steps (batch 16) on the same discs: lesion samples given a mask are darker
    inside it than on its ring, far more than the healthy samples from the same z and the label
    alone. Also with synthetic fake masks (model.gan_fake_masks=synthetic, what DP uses: the
    generator never sees a real mask, only D does). Measured (n = 8): real fake masks: contrast
    lesion +0.26, healthy -0.07, label only -0.06, change ratio 6.6; synthetic: +0.23, -0.05, -0.04,
    4.0; gain > 0 for 8 of 8 in both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: as fast, and no OpenMP spin-waits on a busy machine
    try:
        res = _trained_mask_test(build_model(make_cfg("gan", f"model.gan_fake_masks={fakes}"), seed=0), 300)
    finally:
        torch.set_num_threads(threads)
    c = res["contrast"]
    assert res["n"] == 8
    assert c["lesion"]["mean"] > 0.15 and c["lesion"]["mean"] > max(c["healthy"]["mean"], c["label-only"]["mean"]) + 0.15
    assert res["gain-positive-share"] >= 0.75 and res["change-ratio"] > 2.5


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untrained checkpoints (the command's plumbing, not its quality): with and without mask conditioning."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, space, mask in (("mask", "latent", True), ("plain", "latent", False), ("gan", "gan", True)):
        cfg = make_cfg(space, mask=mask)
        path = folder / f"{name}.pt"
        torch.save({"round": 1, "model": build_model(cfg, seed=0).state_dict(), "config": dump_config(cfg)}, path)
        out[name] = path
    return out


def test_synthesize_runs_a_spade_gan_checkpoint(tmp_path, checkpoints):
    from medgen.synthesize import run_synthesis

    masks = tmp_path / "masks"
    masks.mkdir()
    write_slice(masks / "m.nii.gz", disc(SIZE, 0.2, 0.1, 0.3).numpy(), "test")
    result = run_synthesis(checkpoints["gan"], tmp_path / "out", masks_dir=masks)
    assert result.n == 1 and result.result["family"] == "gan" and result.result["test"]["n"] == 1
    assert (tmp_path / "out" / "sample-0000.nii.gz").is_file() and (tmp_path / "out" / "samples.png").is_file()


def test_synthesize_writes_slices_masks_grid_and_strict_json(tmp_path, checkpoints, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        write_slice(masks / f"m{i}.nii.gz", disc(SIZE, 0.2 * i - 0.2, 0.1, 0.2).numpy(), "test")
    out = tmp_path / "out"
    args = ["synthesize", "--checkpoint", str(checkpoints["mask"]), "--masks", str(masks), "--out", str(out)]
    assert main([*args, "--n", "2"]) == 0
    assert "2 slices" in capsys.readouterr().out
    for i in range(2):
        image, mask = nib.load(out / f"sample-{i:04d}.nii.gz"), nib.load(out / f"sample-{i:04d}_mask.nii.gz")
        assert image.shape == mask.shape == (SIZE, SIZE, 1) and image.get_data_dtype() == np.float32
        data = np.asarray(image.dataobj)
        assert 0 <= data.min() and data.max() <= 1
        written = to_display(np.asarray(mask.dataobj)[:, :, 0] > 0)
        assert np.array_equal(written, disc(SIZE, 0.2 * i - 0.2, 0.1, 0.2).numpy())
    assert not (out / "sample-0002.nii.gz").exists() and (out / "samples.png").stat().st_size > 0
    result = loads((out / "synthesis.json").read_text())
    assert result["test"]["n"] == 2 and result["test"]["contrast"]["lesion"]["n"] == 2 and len(result["sources"]) == 2
    first = np.asarray(nib.load(out / "sample-0000.nii.gz").dataobj)
    assert main([*args, "--n", "1"]) == 0  # seeded: the same slice again, whatever --n
    assert np.array_equal(np.asarray(nib.load(out / "sample-0000.nii.gz").dataobj), first)


@pytest.mark.parametrize("case, message", [
    ("missing", "--masks {dir}: no such folder"),
    ("empty", "--masks {dir}: no NIfTI lesion mask"),
    ("blank", "--masks {dir}: none of its 1 NIfTI files has an axial slice"),
    ("plain", "trained without mask conditioning"),
    ("no-checkpoint", "checkpoint file not found"),
])
def test_synthesize_errors_name_the_argument(tmp_path, checkpoints, capsys, case, message):
    masks = tmp_path / "masks"
    if case != "missing":
        masks.mkdir()
    if case in ("blank",):
        write_slice(masks / "empty.nii.gz", np.zeros((SIZE, SIZE), bool), "test")
    if case in ("plain", "no-checkpoint"):
        write_slice(masks / "m.nii.gz", disc(SIZE, 0, 0, 0.3).numpy(), "test")
    checkpoint = {"plain": checkpoints["plain"], "no-checkpoint": tmp_path / "none.pt"}.get(case, checkpoints["mask"])
    code = main(["synthesize", "--checkpoint", str(checkpoint), "--masks", str(masks), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and message.format(dir=masks) in err
    if case == "plain":
        assert f"--checkpoint {checkpoint}" in err and "retrain with model.mask_conditioning=true" in err
    assert not (tmp_path / "o" / "synthesis.json").exists()


def test_synthesize_from_a_site_draws_deformed_lesions_inside_its_brains(tmp_path, checkpoints):
    """A site folder of two plain-file scans (an ellipsoid head at 2 mm, one with a lesion mask):
    --from-site preprocesses it like training data and places every drawn lesion inside a brain."""
    from medgen.synthesize import run_synthesis

    site = tmp_path / "site"
    site.mkdir()
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (48, 56, 40)), indexing="ij")
    head = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 < 1
    rng = np.random.default_rng(0)
    lesion = ((x - 0.3) ** 2 + (y + 0.2) ** 2 + z ** 2 < 0.2 ** 2) & head
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, has_lesion in (("a", True), ("b", False)):
        image = (head * (0.6 + 0.1 * rng.standard_normal(head.shape))).astype(np.float32)
        if has_lesion:
            image[lesion] *= 0.3
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), site / f"{name}_mask.nii.gz")
        nib.save(nib.Nifti1Image(image, affine), site / f"{name}.nii.gz")
    out = tmp_path / "out"
    result = run_synthesis(checkpoints["mask"], out, from_site=site, n=3, seed=1,
                           overrides=["data.brain_mask=threshold", f"data.cache_dir={tmp_path / 'cache'}",
                                      "data.spacing_mm=[2,2,2]"])
    assert result.n == 3 and len(list(out.glob("sample-*_mask.nii.gz"))) == 3
    assert all("deformed, placed in the brain" in s for s in result.result["sources"])
    assert result.result["masks"] == "from-site" and result.result["test"]["n"] == 3
    real = result.result["real-lesion-contrast"]  # the site's own dark lesion on its own mask
    assert real["n"] >= 1 and real["mean"] > 0.1
    healthy = result.result["distances"]["healthy"]  # each arm against the site's real slices of its class
    assert healthy["n-generated"] == 3 and healthy["n-real"] >= 6 and np.isfinite(healthy["kid-real-vs-real"])
    with pytest.raises(ConfigError, match="--from-site"):
        run_synthesis(checkpoints["mask"], out, from_site=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.image_size"):
        run_synthesis(checkpoints["mask"], out, from_site=site, overrides=["data.image_size=64"])
