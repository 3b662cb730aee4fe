"""Conditional DCGAN with a spectrally normalised projection discriminator (family ``"gan"``).

Images (B, 1, S, S) in [0, 1]; labels (B,) int64 (0 healthy, 1 lesion). Networks:

- ``generator`` G(z, y): z (B, latent_dim) ++ label embedding -> linear -> (8w, 4, 4) -> nearest
  upsample + conv blocks (GroupNorm + SiLU), widths halving -> conv -> sigmoid: (B, 1, S, S) in [0, 1].
- ``discriminator`` D(x, y): x mapped to [-1, 1] -> stride-2 4x4 convs (LeakyReLU 0.2, no norm
  layers), widths doubling from ``model.width`` down to 4x4 features h -> ``linear(flatten(h)) +
  <embed(y), sum-pooled h>`` (projection discriminator): (B,) logits. Every conv / linear / embedding
  is wrapped in :class:`SpectralNorm`. It is the only network that sees real images (DP-SGD target).
- ``generator_ema``: an exponential moving average of G (never optimised, ``requires_grad`` off)
  used by ``sample`` and ``anomaly_map``. A separate network rather than buffers inside G: it is
  exchanged and aggregated (FedGAN) like the others with no special case, and G stays a plain
  trainable module. Its decay ramps up as ``min(ema_decay, (1 + n) / (10 + n))`` with ``n`` its
  update count (buffer ``ema_updates``), so a short run is not dominated by the initial weights.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import Config
from medgen.models.base import HEALTHY, GenerativeModel, GeneratorPrior, standard_normal_prior
from medgen.models.layers import Up, group_count, label_embedding, level_channels, level_sizes, smooth_score

COLLAPSE_FRACTION = 0.25  # evaluate: "collapse" when sample diversity < this fraction of the real batch's
DIVERSITY_SAMPLES = 16    # evaluate: EMA samples (fixed seed, healthy label) for the diversity signal


class SpectralNorm(nn.Module):
    """``layer(x) / sigma(W)``: a conv / linear / embedding layer divided by the largest singular
    value of its weight W reshaped to (out, -1), estimated by one power iteration per training
    forward (buffer ``u``; eval mode reuses it).

    Unlike ``torch.nn.utils.spectral_norm`` and its ``parametrizations`` version (both rejected by
    Opacus's ``GradSampleModule``: trainable layer with buffers / weight computed by a parametrization),
    the wrapped layer stays a plain ``nn.Conv2d`` / ``nn.Linear`` with its own parameters, so Opacus's
    per-sample gradient rules apply unchanged, and ``u`` lives on this parameter-free wrapper.
    sigma is treated as a constant in backward (stop-gradient), so per-sample and ordinary
    gradients agree exactly; the bias is divided by sigma too (a reparametrisation)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear | nn.Embedding):
        super().__init__()
        self.layer = layer
        self.register_buffer("u", F.normalize(torch.randn(layer.weight.shape[0]), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # power iteration in float32 under AMP
            w = self.layer.weight.detach().flatten(1)
            u = F.normalize(self.u, dim=0)  # averaged across sites, u may have lost its unit norm
            if self.training:
                u = F.normalize(w @ F.normalize(w.t() @ u, dim=0), dim=0)
                self.u = u
            sigma = torch.dot(u, w @ F.normalize(w.t() @ u, dim=0)).clamp_min(1e-8)
        return self.layer(x) / sigma


class Generator(nn.Module):
    """``forward(z, y)``: (B, latent_dim), (B,) -> images (B, 1, S, S) in [0, 1]."""

    def __init__(self, image_size: int, width: int, latent_dim: int, groups: int):
        super().__init__()
        sizes = level_sizes(image_size)
        chans = level_channels(width, len(sizes) - 1)
        self.bottom = (chans[-1], sizes[-1], sizes[-1])
        label_dim = max(8, latent_dim // 4)
        self.label = label_embedding(label_dim)
        self.from_z = nn.Linear(latent_dim + label_dim, chans[-1] * sizes[-1] ** 2)
        self.from_z_act = nn.Sequential(nn.GroupNorm(group_count(groups, chans[-1]), chans[-1]), nn.SiLU())
        self.up = nn.Sequential(*[Up(a, b, groups) for a, b in zip(chans[:0:-1], chans[-2::-1])])
        self.head = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[0], 1, 3, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.from_z(torch.cat([z, self.label(y)], dim=1)).view(-1, *self.bottom)
        return torch.sigmoid(self.head(self.up(self.from_z_act(h))))


class Discriminator(nn.Module):
    """``forward(x, y)``: (B, 1, S, S) in [0, 1], (B,) -> logits (B,). Opacus-compatible."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        sizes = level_sizes(image_size)
        chans = [1, *level_channels(width, len(sizes) - 1)]
        self.convs = nn.Sequential(*[m for a, b in zip(chans, chans[1:]) for m in
                                     (SpectralNorm(nn.Conv2d(a, b, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))])
        self.linear = SpectralNorm(nn.Linear(chans[-1] * sizes[-1] ** 2, 1))
        self.embed = SpectralNorm(label_embedding(chans[-1]))  # projection: <embed(y), h>

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.convs(2 * x - 1)
        return self.linear(h.flatten(1)).squeeze(1) + (self.embed(y) * h.sum(dim=(2, 3))).sum(1)


def _floats(d_loss, g_loss, real_logits, fake_logits) -> dict[str, float]:
    d_loss, g_loss = float(d_loss.detach()), float(g_loss.detach())
    return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
            "d_real": float(real_logits.detach().mean()), "d_fake": float(fake_logits.detach().mean())}


def _pairwise_rms(x: torch.Tensor) -> float:
    """Mean RMS distance over distinct pairs of images (n, ...) (0 for n < 2)."""
    flat = x.flatten(1)
    if len(flat) < 2:
        return 0.0
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d.sum() / (len(flat) * (len(flat) - 1)))


@contextmanager
def _frozen(net: nn.Module):
    """No parameter gradients for ``net`` (and no Opacus per-sample hooks) inside the block."""
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    hooks = hasattr(net, "disable_hooks") and net.hooks_enabled
    if hooks:
        net.disable_hooks()
    try:
        yield
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
        if hooks:
            net.enable_hooks()


class ConditionalGAN(GenerativeModel):
    """Label-conditional GAN; anomaly maps are errors of a healthy reconstruction found by latent
    inversion of the EMA generator."""

    family = "gan"
    private_networks = ("discriminator",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, size = cfg.model, cfg.data.image_size
        generator = Generator(size, m.width, m.latent_dim, m.norm_groups)
        ema = copy.deepcopy(generator).requires_grad_(False)
        ema.register_buffer("ema_updates", torch.zeros(()))
        self.networks = {"generator": generator, "discriminator": Discriminator(size, m.width),
                         "generator_ema": ema}

    def _net(self, name: str) -> nn.Module:
        """The bare network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks[name]
        return getattr(net, "_module", net)

    @property
    def _device(self) -> torch.device:
        return next(self._net("generator").parameters()).device

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam (lr = ``train.lr``, betas (0.0, 0.99): more diverse samples than (0.5, 0.999) on the
        phantom at lr 1e-3) for G and D; the EMA generator has none."""
        return {name: torch.optim.Adam(self.networks[name].parameters(), lr=self.cfg.train.lr, betas=(0.0, 0.99))
                for name in ("generator", "discriminator")}

    def _losses(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_loss, g_loss) for ``model.gan_loss``: hinge or non-saturating (softplus) logistic."""
        if self.cfg.model.gan_loss == "hinge":
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean(), -fake_logits.mean()
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean(), F.softplus(-fake_logits).mean()

    def train_step(self, images, labels, optimizers, step, extra_loss=None, masks=None) -> dict[str, float]:
        """One D step then one G step on a batch (B, 1, S, S) in [0, 1] with labels (B,); fakes use
        the batch's labels (D sees real and fake in two passes of B, so Opacus pairs real_i with
        fake_i: one per-sample gradient per real image). ``extra_loss()`` is added to both losses.
        Then the EMA generator is updated. Returns floats ``d_loss``, ``g_loss``, ``loss`` = their
        sum (not a convergence measure for a GAN), ``d_real`` / ``d_fake`` = mean D logits."""
        self.train()
        G, D = self.networks["generator"], self.networks["discriminator"]
        fake = G(torch.randn(len(images), self.cfg.model.latent_dim, device=images.device), labels)
        opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]
        opt_d.zero_grad(set_to_none=True)
        real_logits, fake_logits = D(images, labels), D(fake.detach(), labels)
        d_loss, _ = self._losses(real_logits, fake_logits)
        self.precision.backward(d_loss + extra_loss() if extra_loss is not None else d_loss)
        self.precision.step(opt_d)
        opt_g.zero_grad(set_to_none=True)
        with _frozen(D):
            _, g_loss = self._losses(real_logits.detach(), D(fake, labels))
            self.precision.backward(g_loss + extra_loss() if extra_loss is not None else g_loss)
        self.precision.step(opt_g)
        self._update_ema()
        return _floats(d_loss, g_loss, real_logits, fake_logits)

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema, gen = self._net("generator_ema"), self._net("generator")
        n = float(ema.ema_updates)
        decay = min(self.cfg.model.ema_decay, (1 + n) / (10 + n))
        for p_ema, p in zip(ema.parameters(), gen.parameters()):
            p_ema.lerp_(p, 1 - decay)
        ema.ema_updates += 1

    def evaluate(self, images, labels, masks=None) -> dict[str, float]:
        """``train_step``'s keys for G (z from a fixed seed) against D on this batch, plus the
        collapse signal: ``diversity`` = mean pairwise RMS distance of DIVERSITY_SAMPLES EMA
        samples (fixed seed, healthy), ``diversity_ratio`` = that / the real batch's, and
        ``collapse`` = 1.0 when the ratio < COLLAPSE_FRACTION. A one-image batch has no reference:
        ratio 1, collapse 0."""
        latent = self.cfg.model.latent_dim
        with self._eval_mode():
            x, y = images.to(self._device), labels.to(self._device)
            g = torch.Generator().manual_seed(self.cfg.seed)
            fake = self._net("generator")(torch.randn(len(x), latent, generator=g).to(x.device), y)
            real_logits, fake_logits = self._net("discriminator")(x, y), self._net("discriminator")(fake, y)
            d_loss, g_loss = self._losses(real_logits, fake_logits)
            z = torch.randn(DIVERSITY_SAMPLES, latent, generator=g).to(x.device)
            samples = self._net("generator_ema")(z, torch.full((len(z),), HEALTHY, device=x.device))
        diversity, real = _pairwise_rms(samples), _pairwise_rms(x)
        ratio = diversity / max(real, 1e-8) if len(x) > 1 else 1.0
        return {**_floats(d_loss, g_loss, real_logits, fake_logits), "diversity": diversity,
                "diversity_ratio": ratio, "collapse": float(ratio < COLLAPSE_FRACTION)}

    def sample(self, labels, generator=None) -> torch.Tensor:
        """z ~ N(0, I) (drawn on CPU from ``generator``) through the EMA generator with ``labels``
        (n,): (n, 1, S, S) in [0, 1]."""
        z = torch.randn(len(labels), self.cfg.model.latent_dim, generator=generator)
        with self._eval_mode():
            return self._net("generator_ema")(z.to(self._device), labels.to(self._device))

    def generator_prior(self) -> GeneratorPrior:
        """The EMA generator G_ema(z, y) (what ``sample`` draws from), z ~ N(0, I) of size
        ``model.latent_dim``. A GAN has no encoder: the solver starts from z = 0 and prior draws."""
        net = self._net("generator_ema").eval()
        return standard_normal_prior(self.cfg.model.latent_dim, lambda z, y: net(z, y.to(z.device)))

    def invert(self, images: torch.Tensor, steps: int | None = None, starts: int = 8, lr: float = 0.05,
               prior: float = 1e-3) -> torch.Tensor:
        """Healthy reconstruction G_ema(z*, healthy) of ``images`` (B, 1, S, S): z starts at the
        best of z = 0 and ``starts - 1`` seeded N(0, I) draws, then ``steps`` (default
        ``model.inversion_steps``) Adam steps minimise the MSE over the whole slice + prior * mean(z^2).
        The whole slice, not the brain alone: preprocessing zeroes everything outside the brain, and
        fitting that background pins down the brain's outline (measured: README, "Model families").
        Weights, their requires_grad flags and the train/eval modes are left as they were."""
        net, x = self._net("generator_ema"), images.to(self._device)
        healthy = torch.full((len(x),), HEALTHY, device=x.device)
        g = torch.Generator().manual_seed(self.cfg.seed)
        draws = torch.randn(starts - 1, *x.shape[:1], self.cfg.model.latent_dim, generator=g)
        candidates = torch.cat([torch.zeros_like(draws[:1]), draws]).to(x.device)

        def error(z):  # (B,) MSE + latent prior
            return ((net(z, healthy) - x) ** 2).flatten(1).mean(1) + prior * (z ** 2).mean(1)

        with self._eval_mode():
            errors = torch.stack([error(z) for z in candidates])  # (starts, B)
            z = candidates[errors.argmin(0), torch.arange(len(x), device=x.device)]
            with torch.enable_grad():
                z = z.clone().requires_grad_(True)
                opt = torch.optim.Adam([z], lr=lr)
                for _ in range(self.cfg.model.inversion_steps if steps is None else steps):
                    z.grad, = torch.autograd.grad(error(z).sum(), z)  # no parameter .grad is touched
                    opt.step()
            return net(z.detach(), healthy)

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """(x - G_ema(z*, healthy))^2 with z* from :meth:`invert` (``setting`` may set its ``steps``),
        Gaussian-smoothed (sigma 1 px), zeroed outside ``brain``: same shape as ``images``, >= 0.
        Slower than the VAE's single pass: every batch runs an optimisation (``inversion_steps``
        forward + backward passes of G)."""
        x = images.to(self._device)
        score = (x - self.invert(x, **setting)) ** 2
        return smooth_score(score, None if brain is None else brain.to(x.device))
