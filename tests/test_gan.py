"""The conditional GAN (``medgen.models.gan``): shapes, conditioning, EMA, losses, Opacus
compatibility of the spectrally normalised discriminator, inversion-based anomaly maps, collapse
signal, that a short training on synthetic discs actually learns, and the mask-conditioned (SPADE)
variant with its DP rule (the generator never sees a real mask under privacy.enabled)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from medgen.config import load_config
from medgen.models import mask_conditioning as mc
from medgen.models.base import HEALTHY, LESION
from medgen.models.gan import COLLAPSE_FRACTION, SPADE, ConditionalGAN, SpectralNorm

SIZE = 32


def make(*overrides: str, size: int = SIZE, seed: int = 0) -> ConditionalGAN:
    torch.manual_seed(seed)
    return ConditionalGAN(load_config(None, ["model.family=gan", f"data.image_size={size}", "model.width=8",
                                             "model.latent_dim=16", "model.inversion_steps=20", *overrides]))


def grid(size: int = SIZE):
    return torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")


def discs(n: int = 8, size: int = SIZE, seed: int = 0):
    """Bright discs (0.8) on black with jittered centre and radius; labels alternate 0/1;
    returns images (n, 1, S, S), labels (n,), brain masks (n, 1, S, S) bool."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = grid(size)
    centre = 0.15 * (torch.rand(n, 2, generator=g) - 0.5)
    radius = 0.55 + 0.15 * torch.rand(n, generator=g)
    dist = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2).sqrt()
    brain = (dist < radius[:, None, None])[:, None]
    return 0.8 * brain.float(), torch.arange(n) % 2, brain


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and avoids OpenMP spin-waits on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """150 steps on 8 fixed discs (the same batch each step): (model, images, labels, brain, untrained model)."""
    images, labels, brain = discs()
    model = make()
    optimizers = model.make_optimizers()
    for step in range(150):
        model.train_step(images, labels, optimizers, step)
    return model, images, labels, brain, make()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_and_ranges(size):
    model = make(size=size)
    out = model.sample(torch.tensor([HEALTHY, LESION]), seeded(0))
    assert out.shape == (2, 1, size, size) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
    images, labels, brain = discs(2, size)
    assert model.networks["discriminator"](images, labels).shape == (2,)
    amap = model.anomaly_map(images, brain, steps=2)
    assert amap.shape == images.shape and amap.min() >= 0 and torch.isfinite(amap).all()


def test_seeded_sampling_is_deterministic_and_conditioned():
    model = make()
    labels = torch.tensor([HEALTHY, LESION] * 2)
    assert torch.equal(model.sample(labels, seeded(1)), model.sample(labels, seeded(1)))
    assert not torch.allclose(model.sample(labels, seeded(1)), model.sample(labels, seeded(2)))
    healthy = model.sample(torch.full((4,), HEALTHY), seeded(3))
    lesion = model.sample(torch.full((4,), LESION), seeded(3))
    assert (healthy - lesion).abs().max() > 1e-4


def test_discriminator_is_spectrally_normalised():
    disc = make().networks["discriminator"]
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    wrapped = [m.layer for m in disc.modules() if isinstance(m, SpectralNorm)]
    assert layers and all(any(layer is w for w in wrapped) for layer in layers)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in disc.modules())
    images, labels, _ = discs()
    for _ in range(30):  # power iterations (one per training forward) converge to the largest singular value
        disc(images, labels)
    for sn in (m for m in disc.modules() if isinstance(m, SpectralNorm)):
        w = sn.layer.weight.detach().flatten(1)
        sigma = torch.dot(sn.u, w @ nn.functional.normalize(w.t() @ sn.u, dim=0))
        assert sigma == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-3)
    first = disc.convs[0].eval()  # the layer's output is divided by its weight's spectral norm
    sigma = torch.linalg.matrix_norm(first.layer.weight.detach().flatten(1), 2)
    assert torch.allclose(first(images), first.layer(images) / sigma, rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_discriminator_trains_under_opacus_with_exact_per_sample_gradients():
    """Each real image is paired with one fake: the per-sample gradient of D is that of
    loss(real_i) + loss(fake_i), and Opacus computes it exactly through the spectral norm."""
    model = make()
    disc = model.networks["discriminator"]
    assert ModuleValidator.validate(disc, strict=False) == [] and GradSampleModule.validate(disc) == []
    images, labels, _ = discs(4)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    torch.manual_seed(1)
    model.networks["discriminator"] = GradSampleModule(disc)
    model.train_step(images, labels, model.make_optimizers(), step=0)
    gsm = model.networks["discriminator"]
    grads = {n: p.grad_sample.clone() for n, p in gsm.named_parameters()}
    assert all(g.shape[0] == len(images) for g in grads.values()) and len(grads) == len(list(disc.parameters()))
    # replay the D step per sample on the pre-step weights with the same fakes
    fresh = make()
    fresh.networks["discriminator"].load_state_dict(before)
    torch.manual_seed(1)
    fakes = fresh.networks["generator"](torch.randn(len(images), 16), labels).detach()
    disc0 = fresh.networks["discriminator"]
    for i in range(len(images)):
        disc0.load_state_dict(before)
        real_logit = disc0(images[i:i + 1], labels[i:i + 1])
        fake_logit = disc0(fakes[i:i + 1], labels[i:i + 1])
        d_loss, _ = fresh._losses(real_logit, fake_logit)
        exact = torch.autograd.grad(d_loss, list(disc0.parameters()))
        for (name, _), g in zip(disc0.named_parameters(), exact):
            assert torch.allclose(grads[f"_module.{name}"][i], g, atol=1e-5, rtol=1e-4), name
    assert model.sample(labels[:2], seeded(0)).shape == (2, 1, SIZE, SIZE)


def test_ema_moves_towards_the_generator():
    model = make()
    gen, ema = model.networks["generator"], model.networks["generator_ema"]
    assert not any(p.requires_grad for p in ema.parameters())
    assert "generator_ema.ema_updates" in model.state_dict()
    assert set(model.make_optimizers()) == {"generator", "discriminator"}
    ema0 = params(ema)
    assert torch.equal(ema0, params(gen))
    images, labels, _ = discs()
    model.train_step(images, labels, model.make_optimizers(), step=0)
    g1, ema1 = params(gen), params(ema)
    assert not torch.equal(ema1, g1) and not torch.equal(ema1, ema0)
    assert (ema1 - g1).norm() < (ema0 - g1).norm()  # closer to the new G than the old EMA was
    # the warm-up: the first update has decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema1, 0.1 * ema0 + 0.9 * g1, atol=1e-6)
    assert float(ema.ema_updates) == 1


def test_hinge_and_nonsaturating_losses_differ():
    images, labels, _ = discs()
    logs = {}
    for loss in ("hinge", "nonsaturating"):
        model = make(f"model.gan_loss={loss}")
        torch.manual_seed(0)
        logs[loss] = model.train_step(images, labels, model.make_optimizers(), step=0)
        ev = model.evaluate(images, labels)
        assert all(isinstance(v, float) for v in logs[loss].values()) and set(logs[loss]) <= set(ev)
        assert logs[loss]["loss"] == pytest.approx(logs[loss]["d_loss"] + logs[loss]["g_loss"])
    assert logs["hinge"]["g_loss"] != pytest.approx(logs["nonsaturating"]["g_loss"])
    assert logs["nonsaturating"]["g_loss"] > 0 and logs["nonsaturating"]["d_loss"] > 0


def test_anomaly_map_leaves_weights_flags_and_modes():
    model = make()
    images, _, brain = discs(4)
    model.networks["generator_ema"].requires_grad_(True)  # flags are left as found, whatever they are
    before = model.state_dict()
    flags = {n: p.requires_grad for n, p in model.networks["generator_ema"].named_parameters()}
    model.train()
    amap = model.anomaly_map(images, brain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.networks["generator_ema"].named_parameters()} == flags
    assert all(net.training for net in model.networks.values())
    assert amap.min() >= 0 and torch.all(amap[~brain] == 0) and amap[brain].sum() > 0
    with torch.no_grad():  # evaluation code may call it without autograd
        assert torch.equal(model.anomaly_map(images, brain), amap)


def test_training_on_discs_learns_the_images(trained):
    model, images, labels, _, untrained = trained
    yy, xx = grid()
    inside, outside = (xx ** 2 + yy ** 2).sqrt() < 0.4, (xx ** 2 + yy ** 2).sqrt() > 0.9  # all discs / none
    labels16 = torch.arange(16) % 2

    def stats(m):
        s = m.sample(labels16, seeded(1))[:, 0]
        return float(s[:, inside].mean()), float(s[:, outside].mean()), float((s - images[:, 0].mean(0)).abs().mean())

    (in0, out0, err0), (in1, out1, err1) = stats(untrained), stats(model)
    assert in1 > 0.65 and out1 < 0.2  # real: 0.8 inside, 0 outside
    assert abs(in1 - 0.8) < abs(in0 - 0.8) and out1 < out0 and err1 < 0.5 * err0


def test_inversion_reconstructs_training_images(trained):
    model, images, _, brain, _ = trained
    start = model.invert(images, steps=0)  # best of the seeded starting points
    recon = model.invert(images)
    random = model.sample(torch.full((len(images),), HEALTHY), seeded(5))
    mse = {k: float(((v - images) ** 2).mean()) for k, v in  # the whole slice: what inversion fits
           {"start": start, "recon": recon, "random": random}.items()}
    # measured: start 0.91x, recon 0.70x the random sample's error
    assert mse["recon"] < mse["start"] <= mse["random"] + 1e-6 and mse["recon"] < 0.8 * mse["random"]
    amap = model.anomaly_map(images, brain)
    assert torch.all(amap[~brain] == 0) and torch.isfinite(amap).all()


def test_collapse_flag(trained):
    model, images, labels, _, _ = trained
    real_like = ConditionalGAN(model.cfg)
    real_like.load_state_dict(model.state_dict())
    # a generator whose output ignores z: every sample is the same image
    collapsed = ConditionalGAN(model.cfg)
    collapsed.load_state_dict(model.state_dict())
    with torch.no_grad():
        collapsed.networks["generator_ema"].from_z.weight[:, :16] = 0
    ev = collapsed.evaluate(images, labels)
    assert ev["diversity"] < 1e-5 and ev["collapse"] == 1.0 and ev["diversity_ratio"] < COLLAPSE_FRACTION
    # a generator with strongly z-dependent output, against the real discs
    with torch.no_grad():
        real_like.networks["generator_ema"].from_z.weight[:, :16] *= 20
    ev = real_like.evaluate(images, labels)
    assert ev["diversity_ratio"] > COLLAPSE_FRACTION and ev["collapse"] == 0.0
    assert all(isinstance(v, float) for v in ev.values())


# ------------------------------------------------------------------------------ mask conditioning (SPADE)
def spade(*overrides: str, size: int = SIZE) -> ConditionalGAN:
    return make("model.mask_conditioning=true", *overrides, size=size)


def lesion_batch(n: int = 6, seed: int = 0, shift: int = 0):
    """``discs`` with a square lesion mask on the lesion items (moved ``shift`` px right)."""
    images, labels, brain = discs(n, seed=seed)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    masks[labels == LESION, :, 10:16, 8 + shift:14 + shift] = True
    return images, labels, masks


def test_spade_generator_sees_the_mask_at_every_resolution():
    model = spade()
    gen = model.networks["generator"]
    blocks = [m for m in gen.modules() if isinstance(m, SPADE)]
    seen = []
    for block in blocks:
        block.shared.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    images, labels, masks = lesion_batch()
    model.train_step(images, labels, model.make_optimizers(), 0, masks=masks)
    sides = sorted({s[-1] for s in seen})
    assert sides == [4, 8, 16, 32] and all(s[:2] == (6, mc.MASK_CHANNELS) for s in seen)
    assert not any(isinstance(m, SpectralNorm) for m in gen.modules())  # D's only
    # the discriminator takes the (image, mask) pair: 1 + 2 input channels
    assert model.networks["discriminator"].convs[0].layer.in_channels == 1 + mc.MASK_CHANNELS


def test_spade_samples_follow_the_mask_and_the_label():
    model = spade()
    labels = torch.tensor([LESION, LESION, HEALTHY])
    _, _, masks = lesion_batch(3)
    masks[:] = masks[1]  # the same square for all three
    a = model.sample_masked(labels, masks, seeded(1))
    assert a.shape == (3, 1, SIZE, SIZE) and 0 <= a.min() <= a.max() <= 1
    assert torch.equal(a, model.sample_masked(labels, masks, seeded(1)))
    moved = model.sample_masked(labels, masks.roll(6, dims=-1), seeded(1))
    assert (moved[:2] - a[:2]).abs().max() > 1e-4  # lesion slices follow their masks
    assert torch.equal(moved[2], a[2])  # a healthy slice's mask is cleared, whatever is given
    # sample() is the label alone (mask unknown): the same z, another condition
    assert not torch.allclose(model.sample(labels, seeded(1)), a)
    with pytest.raises(ValueError, match="data.image_size"):
        model.sample_masked(labels, masks[..., :16, :16], seeded(1))
    with pytest.raises(mc.MaskConditioningError):
        make().sample_masked(labels, masks, seeded(1))


def test_synthetic_masks_are_blobs_inside_the_brain_and_seeded():
    _, _, brain = discs(16, seed=3)
    a = mc.synthetic_masks(brain, seeded(0))
    assert a.shape == brain.shape and a.dtype == torch.bool
    assert torch.equal(a, mc.synthetic_masks(brain, seeded(0))) and not torch.equal(a, mc.synthetic_masks(brain, seeded(1)))
    pixels = a.flatten(1).sum(1)
    assert pixels.min() >= 1 and not (a & ~brain).any()
    lo, hi = mc.BLOB_RADIUS  # equivalent radius (S * lo ... S * hi) cut to the brain
    assert pixels.max() <= 3.3 * (hi * SIZE) ** 2 and len(set(pixels.tolist())) > 5
    empty = mc.synthetic_masks(torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool), seeded(0))
    assert empty.flatten(1).any(1).all()  # no brain: a blob anywhere, never empty
    # the model's: one blob per lesion label inside the EMA generator's own healthy brain, none for healthy
    model = spade("model.gan_fake_masks=synthetic")
    z, labels = torch.randn(6, 16, generator=seeded(0)), torch.arange(6) % 2
    fake = model.synthetic_masks(z, labels, seeded(2))
    assert not fake[labels == HEALTHY].any() and fake[labels == LESION].flatten(1).any(1).all()


def test_under_dp_the_generator_never_sees_a_real_mask():
    """privacy.enabled (gan_fake_masks=auto): with the same seeds, two batches that differ only in
    their real masks give the generator identical inputs (z, labels, condition), while the
    discriminator's real pass sees the masks; the generator's condition carries synthetic blobs."""
    assert spade("privacy.enabled=true").synthetic_fakes and not spade().synthetic_fakes

    def inputs(shift):
        model = spade("privacy.enabled=true", "model.cond_drop=0")
        seen = {"generator": [], "discriminator": []}
        for name in seen:
            model.networks[name].register_forward_pre_hook(
                lambda mod, args, name=name: seen[name].append([a.detach().clone() for a in args]))
        images, labels, masks = lesion_batch(shift=shift)
        torch.manual_seed(7)
        model.train_step(images, labels, model.make_optimizers(), 0, masks=masks)
        model.evaluate(images, labels, masks)
        return seen, masks

    a, masks_a = inputs(0)
    b, masks_b = inputs(8)
    assert len(a["generator"]) == 3  # train_step's D step and its own G step (fresh fakes), evaluate
    for x, y in zip(a["generator"], b["generator"]):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    cond = a["generator"][0][2]
    assert not torch.equal(cond[:, :1] > 0, masks_a) and cond[1, 0].sum() > 0  # not the real mask, a blob
    real_pass = a["discriminator"][0][2], b["discriminator"][0][2]
    assert torch.equal(real_pass[0][:, :1] > 0, masks_a) and torch.equal(real_pass[1][:, :1] > 0, masks_b)
    # without DP the fakes are conditioned on the batch's own masks
    model = spade("model.cond_drop=0")
    seen = []
    model.networks["generator"].register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    images, labels, masks = lesion_batch()
    model.train_step(images, labels, model.make_optimizers(), 0, masks=masks)
    assert torch.equal(seen[0][:, :1] > 0, masks)


def test_under_dp_the_generator_step_does_not_take_the_batch_labels_or_size():
    """G's update is not clipped: under DP its fakes are train.batch_size fresh ones with drawn labels,
    whatever the (Poisson-sized) batch holds; without DP they are the D step's, one per real image."""
    for extra in ([], ["model.mask_conditioning=true"]):
        for dp in (True, False):
            model = make("train.batch_size=32", f"privacy.enabled={str(dp).lower()}", *extra)
            calls = []
            model.networks["generator"].register_forward_pre_hook(lambda mod, args: calls.append(args[1].clone()))
            images, _, _ = discs(5, seed=1)
            lesion = torch.full((5,), LESION)
            model.train_step(images, lesion, model.make_optimizers(), 0)
            assert len(calls) == (2 if dp else 1)
            assert torch.equal(calls[0], lesion)  # the D step's fakes: inside D's per-sample clipping
            if dp:
                assert len(calls[1]) == 32 and set(calls[1].tolist()) == {HEALTHY, LESION}


def test_real_fake_masks_under_dp_are_refused_naming_both_keys():
    from medgen.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.gan_fake_masks=real with privacy.enabled"):
        load_config(None, ["model.family=gan", "model.mask_conditioning=true", "model.gan_fake_masks=real",
                           "privacy.enabled=true"])
    load_config(None, ["model.family=gan", "model.mask_conditioning=true", "model.gan_fake_masks=real"])
