"""The diffusion family: schedules, samplers, guidance, EMA, simplex noise, AnoDDPM maps, Opacus,
latent space.

Small on purpose (32x32, width 8, 100 steps; in pixel space unless a test says otherwise: the
chain's mechanics are the same in both): the generic contract lives in test_models.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from medgen.config import load_config
from medgen.models.base import HEALTHY, LESION
from medgen.models.ddpm import DDPM, alphas_cumprod, simplex_noise
from medgen.models.unet import UNet

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waits made this module ~10x slower (155 s vs 15 s under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(*overrides: str, size: int = SIZE, seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(load_config(None, ["model.family=ddpm", "model.space=pixel", "model.width=8",
                                   f"data.image_size={size}", "model.timesteps=100", "model.ddim_steps=10",
                                   "model.anomaly_t=20", *overrides]))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def disc_batch(n: int = 8):
    """Brain-like discs in [0, 1], a dark blob on odd ('lesion') items; labels 0/1 alternating."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    brain = (xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1
    images = (brain * (0.6 + 0.3 * (xx ** 2 + yy ** 2 < 0.3))).float().expand(n, 1, SIZE, SIZE).clone()
    labels = torch.arange(n) % 2
    blob = ((xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.04).float()
    images[labels == LESION] *= 1 - 0.7 * blob
    return images, labels, brain.expand(n, 1, SIZE, SIZE)


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("timesteps", [10, 100, 1000])
def test_schedules(timesteps):
    cos, lin = alphas_cumprod("cosine", timesteps), alphas_cumprod("linear", timesteps)
    for abar in (cos, lin):
        assert abar.shape == (timesteps,)
        assert torch.all(abar > 0) and torch.all(abar < 1) and torch.all(abar[1:] < abar[:-1])
        assert abar[-1] < 1e-3 and abar[0] > 0.9
    assert (cos - lin).abs().max() > 0.1  # cosine keeps more signal in the middle of the chain
    assert cos[timesteps // 2] > lin[timesteps // 2]
    with pytest.raises(ValueError):
        alphas_cumprod("quadratic", timesteps)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_unet_image_sizes(size):
    net = UNet(size, width=8, groups=4, attention=True)
    x = torch.randn(2, 1, size, size)
    assert net(x, torch.tensor([0.0, 999.0]), torch.tensor([HEALTHY, 2])).shape == x.shape


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_shapes_range_and_determinism(sampler):
    model = make(f"model.sampler={sampler}", "model.timesteps=20")
    labels = torch.tensor([HEALTHY, LESION, HEALTHY])
    a, b, c = (model.sample(labels, seeded(s)) for s in (1, 1, 2))
    assert a.shape == (3, 1, SIZE, SIZE) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_conditioning_and_guidance_change_samples():
    model = make()
    healthy, lesion = (model.sample(torch.full((4,), y), seeded(3)) for y in (HEALTHY, LESION))
    assert (healthy - lesion).abs().max() > 1e-4
    guided = make("model.guidance_scale=3.0")  # same weights (same seed), guided sampling
    assert torch.equal(guided.state_dict()["unet.stem.weight"], model.state_dict()["unet.stem.weight"])
    assert (guided.sample(torch.full((4,), LESION), seeded(3)) - lesion).abs().max() > 1e-4
    unconditional = make("model.guidance_scale=0.0")  # the "no label" prediction only
    a, b = (unconditional.sample(torch.full((2,), y), seeded(3)) for y in (HEALTHY, LESION))
    assert torch.equal(a, b)


class OptimalDenoiser(nn.Module):
    """The exact E[eps | x_t] for a toy data distribution in [-1, 1] (stands in for the U-Net):
    ``"mixture"``: constant images of +-0.5 with equal probability; ``"gaussian"``: iid pixels
    N(0.2, 0.3^2)."""

    def __init__(self, kind: str, abar: torch.Tensor, timesteps: int):
        super().__init__()
        self.kind, self.abar, self.T = kind, abar, timesteps

    def forward(self, x, t, y):
        a = self.abar[int(round(float(t[0]) * self.T / 1000))].item()
        if self.kind == "mixture":
            x0 = 0.5 * torch.tanh(a ** 0.5 * 0.5 * x.sum(dim=(1, 2, 3), keepdim=True) / (1 - a)).expand_as(x)
        else:
            mu, var = 0.2, 0.09
            x0 = mu + a ** 0.5 * var / (a * var + 1 - a) * (x - a ** 0.5 * mu)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5


class Preconditioned(nn.Module):
    """What the U-Net has to output under the DDPM's preconditioning for eps_hat to be ``eps_net``'s
    noise: F(c_in x) = (eps(x) - c_skip x) / c_out."""

    def __init__(self, eps_net: nn.Module, model: DDPM):
        super().__init__()
        self.eps_net, self.scalings, self.T = eps_net, model.scalings.double(), model.T

    def forward(self, x_in, t, y):
        c_in, c_skip, c_out = self.scalings[int(round(float(t[0]) * self.T / 1000)), :3].tolist()
        x = x_in.double() / c_in
        return ((self.eps_net(x, t, y) - c_skip * x) / c_out).float()


@pytest.mark.parametrize("schedule, preconditioning", [("cosine", "edm"), ("linear", "edm"), ("cosine", "none")])
def test_ddim_with_all_steps_matches_ancestral_sampling_on_a_toy(schedule, preconditioning):
    """With the exact denoiser, DDIM (T steps, deterministic) and DDPM ancestral sampling both
    reproduce the data distribution, and agree with each other. (T = 1000: with the fixed
    posterior variance beta~_t, ancestral sampling under-disperses by ~10 % at T = 100.)"""
    n, size = 300, 16
    stats = {}
    for kind in ("mixture", "gaussian"):
        for sampler in ("ddim", "ddpm"):
            model = make(f"model.sampler={sampler}", f"model.schedule={schedule}", "model.timesteps=1000",
                         "model.ddim_steps=1000", "model.ddim_eta=0", f"model.preconditioning={preconditioning}",
                         size=size)
            exact = OptimalDenoiser(kind, model.abar, model.T)
            model.networks["unet_ema"].net = Preconditioned(exact, model) if preconditioning == "edm" else exact
            x = model.sample(torch.zeros(n, dtype=torch.long), seeded(0))  # [0, 1]: data * 0.5 + 0.5
            if kind == "mixture":
                per_image = x.mean(dim=(1, 2, 3))
                assert x.std(dim=(1, 2, 3)).max() < 1e-3  # constant images ...
                assert torch.all(torch.minimum((per_image - 0.25).abs(), (per_image - 0.75).abs()) < 1e-3)
                stats[kind, sampler] = float((per_image > 0.5).float().mean())  # ... half of them bright
                assert abs(stats[kind, sampler] - 0.5) < 0.1
            else:
                stats[kind, sampler] = (float(x.mean()), float(x.std()))
                assert abs(stats[kind, sampler][0] - 0.6) < 0.005 and abs(stats[kind, sampler][1] - 0.15) < 0.005
    assert abs(stats["mixture", "ddim"] - stats["mixture", "ddpm"]) < 0.12
    (m1, s1), (m2, s2) = stats["gaussian", "ddim"], stats["gaussian", "ddpm"]
    assert abs(m1 - m2) < 0.005 and abs(s1 - s2) < 0.005


def test_ddim_with_eta_one_and_all_steps_is_ancestral_sampling():
    """eta = 1 gives each DDIM jump the DDPM posterior's variance: over all T steps it is the
    ancestral sampler itself (same noise draws, same result up to rounding)."""
    samples = {}
    for sampler in ("ddim", "ddpm"):
        model = make(f"model.sampler={sampler}", "model.ddim_eta=1", "model.ddim_steps=100")
        samples[sampler] = model.sample(torch.arange(4) % 2, seeded(3))
    torch.testing.assert_close(samples["ddim"], samples["ddpm"], atol=1e-4, rtol=0)
    strided = make("model.ddim_eta=1").sample(torch.arange(4) % 2, seeded(3))  # 10 of 100 steps
    assert not torch.allclose(strided, samples["ddpm"], atol=1e-3)


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_preconditioning(sigma_data):
    """eps_hat = c_skip x_t + c_out F(c_in x_t); c_in x_t has unit variance for images of std
    sigma_data; the loss is the eps-MSE weighted by 1 / c_out^2 (checked in float64 away from
    abar ~ 0, where the direct form cancels); an untrained F still gives eps_hat ~ x_t at t = T."""
    model = make(f"model.sigma_data={sigma_data}", "model.timesteps=1000")
    c_in, c_skip, c_out, _ = model.scalings.double().T
    abar = model.abar
    x0 = sigma_data * torch.randn(20000, dtype=torch.float64)
    for t in (1, 300, 700, 999):
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn_like(x0)
        assert abs(float((c_in[t] * x_t).std()) - 1) < 0.03
    images, labels, _ = disc_batch(4)
    net = model.networks["unet"]
    for step in (5, 300, 900):
        t = torch.full((4,), step)
        noise = torch.randn(images.shape, generator=seeded(step))
        x_t = abar[step].sqrt() * (2 * images.double() - 1) + (1 - abar[step]).sqrt() * noise.double()
        with torch.no_grad():
            eps_hat = model._predict(net, x_t.float(), t, labels).double()
            assert torch.allclose(eps_hat, c_skip[step] * x_t + c_out[step] * net((c_in[step] * x_t).float(),
                                  t.float(), labels).double(), atol=1e-5)
            weighted = float(((eps_hat - noise.double()) ** 2).mean() / c_out[step] ** 2)
            assert float(model._loss(net, 2 * images - 1, labels, t, noise)) == pytest.approx(weighted, rel=1e-3)
    x = torch.randn(4, 1, SIZE, SIZE)
    plain = make("model.preconditioning=none")
    with torch.no_grad():
        assert float((model._predict(net, x, torch.full((4,), model.T), labels) - x).abs().max()) < 1e-3
        assert torch.equal(plain._predict(plain.networks["unet"], x, torch.full((4,), 50), labels),
                           plain.networks["unet"](x, torch.full((4,), 500.0), labels))


def test_train_step_evaluate_and_ema():
    model = make()
    images, labels, _ = disc_batch()
    init = {k: v.clone() for k, v in model.networks["unet"].state_dict().items()}
    opt = model.make_optimizers()
    assert set(opt) == {"unet"}
    out = model.train_step(images, labels, opt, step=0)
    assert set(out) == {"loss"} and isinstance(out["loss"], float)
    # first update with the warm-up decay min(0.999, 1/10) = 0.1
    ema, unet = model.networks["unet_ema"].net.state_dict(), model.networks["unet"].state_dict()
    assert all(torch.allclose(ema[k], 0.1 * init[k] + 0.9 * unet[k], atol=1e-6) for k in init)
    for step in range(1, 5):
        model.train_step(images, labels, opt, step=step)
    state = model.state_dict()
    assert float(state["unet_ema.updates"]) == 5
    ema, unet = model.networks["unet_ema"].net.state_dict(), model.networks["unet"].state_dict()
    to_ema = sum(float((ema[k] - init[k]).norm()) for k in init)
    gap = sum(float((ema[k] - unet[k]).norm()) for k in init)
    assert to_ema > 0 and gap < sum(float((init[k] - unet[k]).norm()) for k in init)
    # evaluate: deterministic EMA loss, same keys, modes restored, weights untouched
    model.train()
    first, second = model.evaluate(images, labels), model.evaluate(images, labels)
    assert first == second and set(first) == {"loss"}
    assert all(net.training for net in model.networks.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_ema_decay_zero_tracks_the_network():
    model = make("model.ema_decay=0.0")
    images, labels, _ = disc_batch()
    model.train_step(images, labels, model.make_optimizers(), step=0)
    ema, unet = model.networks["unet_ema"].net.state_dict(), model.networks["unet"].state_dict()
    assert all(torch.equal(ema[k], unet[k]) for k in unet)


@pytest.mark.parametrize("cond_drop, dropped", [(0.0, False), (0.9, True)])
def test_label_dropout_trains_the_unconditional_embedding(cond_drop, dropped):
    model = make(f"model.cond_drop={cond_drop}")
    images, labels, _ = disc_batch()
    model.train_step(images, labels, model.make_optimizers(), step=0)
    assert bool(model.networks["unet"].label.weight.grad[2].abs().sum() > 0) == dropped


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_unet_with_attention_gets_per_sample_gradients():
    model = make("model.attention=true")
    unet = model.networks["unet"]
    assert any(type(m).__name__ == "SelfAttention" for m in unet.modules())
    assert ModuleValidator.validate(unet, strict=False) == []
    model.networks["unet"] = GradSampleModule(unet)
    images, labels, _ = disc_batch(6)
    model.train_step(images, labels, model.make_optimizers(), step=0)
    for name, p in model.networks["unet"].named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (6, *p.shape), name
        # mean-reduced loss: the per-sample gradients average to the batch gradient
        assert torch.allclose(p.grad_sample.mean(0), p.grad, atol=1e-6, rtol=1e-3), name
    assert float(model.networks["unet_ema"].updates) == 1  # EMA follows the unwrapped network
    assert model.sample(labels[:2], seeded(0)).shape == (2, 1, SIZE, SIZE)


# ------------------------------------------------------------------------------------ anomaly maps
def test_simplex_noise_is_standardised_and_smooth():
    noise = simplex_noise((4, 1, 64, 64), seeded(0))
    assert noise.shape == (4, 1, 64, 64) and noise.dtype == torch.float32
    assert noise.mean(dim=(2, 3)).abs().max() < 1e-4 and (noise.std(dim=(2, 3)) - 1).abs().max() < 1e-4
    assert torch.equal(noise, simplex_noise((4, 1, 64, 64), seeded(0)))
    assert not torch.allclose(noise, simplex_noise((4, 1, 64, 64), seeded(1)))
    assert not torch.allclose(noise[0], noise[1])  # each image its own field

    def neighbour_corr(x):
        return float(torch.corrcoef(torch.stack([x[..., :, 1:].flatten(), x[..., :, :-1].flatten()]))[0, 1])

    assert neighbour_corr(noise) > 0.6
    assert abs(neighbour_corr(torch.randn(4, 1, 64, 64, generator=seeded(0)))) < 0.1


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_anomaly_map(noise):
    model = make(f"model.anomaly_noise={noise}")
    images, _, brain = disc_batch(4)
    before = model.state_dict()
    model.train()
    amap = model.anomaly_map(images, brain)
    assert amap.shape == images.shape and amap.min() >= 0 and torch.isfinite(amap).all()
    assert torch.all(amap[~brain] == 0) and amap[brain].sum() > 0
    assert torch.equal(amap, model.anomaly_map(images, brain))  # deterministic
    assert not torch.equal(amap, model.anomaly_map(images, brain, t=5))  # the setting is used
    for key in ("model.anomaly_steps=4", "model.anomaly_draws=1"):  # so are the config's
        assert not torch.allclose(amap, make(f"model.anomaly_noise={noise}", key).anomaly_map(images, brain))
    assert all(net.training for net in model.networks.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError):
        model.anomaly_map(images, brain, sigma=2)
    with pytest.raises(ValueError):
        model.anomaly_map(images, brain, t=101)
    with pytest.raises(ValueError, match="model.anomaly_t"):
        make("model.anomaly_t=200")


@pytest.mark.parametrize("timesteps, anomaly_t, expected", [
    (1000, "null", [800, 25, 50, 100, 200, 300]), (100, "null", [80, 2, 5, 10, 20, 30]),
    (100, "20", [20, 2, 5, 10, 30]), (10, "null", [8, 1, 2, 3])])
def test_anomaly_sweep(timesteps, anomaly_t, expected):
    """The configured t first (the headline scores and the overlays), then the seeds' levels."""
    model = make(f"model.timesteps={timesteps}", f"model.anomaly_t={anomaly_t}")
    assert model.anomaly_sweep() == [{"t": t} for t in expected]
    images, _, brain = disc_batch(2)
    assert torch.equal(model.anomaly_map(images, brain), model.anomaly_map(images, brain, **model.anomaly_sweep()[0]))


def test_site_evaluation_reports_the_configured_t_as_the_headline():
    """Every t of the sweep gets its own scores; the configured one's are also the unsuffixed
    ``pixel-auroc`` (what the report's curves and `medgen report --compare` read), with its ROC."""
    from medgen.data.dataset import SiteSlices
    from medgen.evaluation.site import anomaly_metrics

    model = make("model.anomaly_t=30")
    images, labels, brain = disc_batch(8)
    lesion = (images[:, 0] < 0.45) & brain[:, 0] & (labels == LESION)[:, None, None]
    data = SiteSlices("S", images[:, 0].numpy(), brain[:, 0].numpy(), lesion.numpy(), labels.numpy(),
                      np.array([f"s{i // 2}" if i % 2 else f"h{i // 2}" for i in range(8)]), np.arange(8))
    metrics, curves, _ = anomaly_metrics(model, data, model.cfg)
    assert {f"pixel-auroc@t={t}" for t in (30, 2, 5, 10, 20)} <= metrics.keys()
    assert metrics["pixel-auroc"] == metrics["pixel-auroc@t=30"] != metrics["pixel-auroc@t=2"]
    assert np.array_equal(curves["roc-tpr"], curves["roc-tpr@t=30"])


# ------------------------------------------------------------------------------------ latent space
def test_latent_space_trains_the_autoencoder_with_the_diffusion():
    """``model.space=latent``: one network (autoencoder + U-Net) that DP-SGD wraps as one, standardised
    4-channel latents at S/4, the reconstruction in the loss, samples and maps decoded to images."""
    model = make("model.space=latent")
    assert set(model.networks) == {"ldm", "ldm_ema"} and model.private_networks == ("ldm",)
    images, labels, brain = disc_batch()
    z, recon = model._to_x0(model.networks["ldm"], images)
    assert z.shape == (8, 4, SIZE // 4, SIZE // 4) and not z.requires_grad and recon.requires_grad
    torch.testing.assert_close(z.mean((1, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((1, 2, 3), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    opt = model.make_optimizers()
    first = model.train_step(images, labels, opt, step=0)
    assert set(first) == {"loss", "diffusion", "recon"}
    assert first["loss"] == pytest.approx(first["diffusion"] + 10 * first["recon"], rel=1e-5)
    before = model.evaluate(images, labels)
    assert set(before) == set(first) and before == model.evaluate(images, labels)
    for step in range(1, 60):
        model.train_step(images, labels, opt, step=step)
    after = model.evaluate(images, labels)
    assert after["recon"] < 0.5 * before["recon"] and after["diffusion"] < before["diffusion"]
    out = model.sample(labels, seeded(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    amap = model.anomaly_map(images, brain)
    assert amap.shape == images.shape and torch.all(amap[~brain] == 0) and amap[brain].sum() > 0
    assert not torch.equal(amap, model.anomaly_map(images, brain, t=5))
    simplex = make("model.space=latent", "model.anomaly_noise=simplex")
    simplex.load_state_dict(model.state_dict())
    other = simplex.anomaly_map(images, brain)  # smooth noise on the 4-channel latents
    assert other.shape == images.shape and torch.isfinite(other).all() and not torch.equal(other, amap)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_latent_space_per_sample_gradients_cover_the_autoencoder():
    """The autoencoder is called outside the wrapped module's forward: Opacus' hooks on its layers
    must still give every parameter exact per-sample gradients (the reconstruction's and the
    diffusion's together)."""
    model = make("model.space=latent")
    images, labels, _ = disc_batch(4)
    model.networks["ldm"] = GradSampleModule(model.networks["ldm"])
    model.train_step(images, labels, model.make_optimizers(), step=0)
    ae = model.networks["ldm"]._module.autoencoder
    for p in model.networks["ldm"].parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-3, atol=1e-6)
    assert all(p.grad.abs().sum() > 0 for p in ae.parameters())
