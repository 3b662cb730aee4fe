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

``model.mask_conditioning`` (issue #22) conditions the GAN on the slice's lesion mask, given as the
two-channel condition of ``mask_conditioning.py`` (the mask and a "mask known" flag, (B, 2, S, S) in
[0, 1]; healthy slices: a known empty mask; masks dropped to unknown with probability ``cond_drop``
so that ``sample`` from the label alone still works):

- the generator is a :class:`SpadeGenerator`: every GroupNorm becomes SPADE (Park et al. 2019):
  normalise, then scale and shift by gamma(m), beta(m) predicted by a small conv net from the
  condition area-averaged to that layer's resolution (4 x 4 ... S x S); the label as before;
- the discriminator gets the condition as two extra input channels: it judges the (image, mask)
  pair, so a lesion drawn away from its mask (or a mask with no lesion under it) is punished;
- ``sample_masked`` draws lesions where given masks say (``medgen synthesize``).

Privacy. Under ``privacy.enabled`` only the discriminator is DP-trained; the generator learns from
D's output alone, which makes its weights post-processing of a DP release. A SPADE generator fed the
batch's *real* masks would break that: its update would depend on real data directly. So under DP
(``model.gan_fake_masks=auto``, or ``synthetic`` explicitly; ``real`` is refused) the generator is
conditioned only on data-independent masks (:meth:`ConditionalGAN.synthetic_masks`): for every
lesion-labelled fake one random blob (size, shape and place from fixed priors,
``mask_conditioning.synthetic_masks``) placed inside the brain the *EMA generator* draws for the
same z with the healthy label — a function of noise and of weights that are themselves DP
outputs, never of a site's mask or brain. The discriminator (private: per-sample clipped and
noised) sees the real (image, real mask) pairs and the (fake, synthetic mask) pairs. The cost: the
fakes' masks are not distributed like the real ones, so D can partly tell fakes by their masks'
shapes; without DP ``auto`` uses the batch's own masks for the fakes (the standard conditional GAN).
We chose this over refusing mask conditioning under DP because it keeps the guarantee exactly
where it was (D private, G post-processing) and lets DP sites still train a mask-conditioned model
(tests/test_gan.py checks that the generator's inputs do not change when the real masks do). Under DP
the generator's own step also takes fresh fakes, ``train.batch_size`` of them with uniformly drawn
labels: the D step's fakes carry the batch's labels and (Poisson) size, which D's per-sample
clipping covers but G's unclipped update would not.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import Config
from medgen.models import mask_conditioning as mc
from medgen.models.base import HEALTHY, LESION, GenerativeModel, GeneratorPrior, standard_normal_prior
from medgen.models.layers import Up, group_count, label_embedding, level_channels, level_sizes, smooth_score

COLLAPSE_FRACTION = 0.25  # evaluate: "collapse" when sample diversity < this fraction of the real batch's
DIVERSITY_SAMPLES = 16    # evaluate: EMA samples (fixed seed, healthy label) for the diversity signal
BRAIN_LEVEL = 0.05        # synthetic fake masks: the EMA generator's healthy slice is brain above this
SPADE_HIDDEN = 32         # channels of a SPADE block's shared mask convolution (Park et al. use 128 at 256 px)


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


def _latent_stem(gen: nn.Module, image_size: int, width: int, latent_dim: int) -> list[int]:
    """Both generators' start: sets ``gen.label`` (label embedding), ``gen.from_z`` (z ++ label ->
    the 4 x 4 bottom) and ``gen.bottom`` (its (C, 4, 4) shape); returns the channels per level."""
    sizes = level_sizes(image_size)
    chans = level_channels(width, len(sizes) - 1)
    gen.bottom = (chans[-1], sizes[-1], sizes[-1])
    label_dim = max(8, latent_dim // 4)
    gen.label = label_embedding(label_dim)
    gen.from_z = nn.Linear(latent_dim + label_dim, chans[-1] * sizes[-1] ** 2)
    return chans


class Generator(nn.Module):
    """``forward(z, y)``: (B, latent_dim), (B,) -> images (B, 1, S, S) in [0, 1]."""

    def __init__(self, image_size: int, width: int, latent_dim: int, groups: int):
        super().__init__()
        chans = _latent_stem(self, image_size, width, latent_dim)
        self.from_z_act = nn.Sequential(nn.GroupNorm(group_count(groups, chans[-1]), chans[-1]), nn.SiLU())
        self.up = nn.Sequential(*[Up(a, b, groups) for a, b in zip(chans[:0:-1], chans[-2::-1])])
        self.head = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[0], 1, 3, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.from_z(torch.cat([z, self.label(y)], dim=1)).view(-1, *self.bottom)
        return torch.sigmoid(self.head(self.up(self.from_z_act(h))))


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (Park et al. 2019): ``forward(x, cond)`` with features x
    (B, C, H, W) and the mask condition ``cond`` (B, 2, S, S) in [0, 1] (``mask_conditioning.py``:
    the lesion mask and its "known" flag) -> GroupNorm(x) * (1 + gamma(m)) + beta(m), (B, C, H, W),
    where m is ``cond`` area-averaged to H x W and gamma, beta are 3x3 convs of a shared 3x3 conv +
    ReLU of m (PyTorch's default initialisation, as Park et al.). The GroupNorm keeps its affine
    parameters (FedBN's local keys, as in the unconditioned generator)."""

    def __init__(self, channels: int, groups: int, cond_channels: int = mc.MASK_CHANNELS, hidden: int = SPADE_HIDDEN):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(groups, channels), channels)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma, self.beta = nn.Conv2d(hidden, channels, 3, padding=1), nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.shared(mc.downsample(cond, x.shape[-1]))
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SpadeBlock(nn.Module):
    """Nearest 2x upsampling, 3x3 conv, SPADE, SiLU: (B, cin, H, W), cond (B, 2, S, S) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.spade = SPADE(cout, groups)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return F.silu(self.spade(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), cond))


class SpadeGenerator(nn.Module):
    """The mask-conditioned generator: ``forward(z, y, cond)`` with z (B, latent_dim), labels y (B,)
    and the mask condition ``cond`` (B, 2, S, S) float in [0, 1] (mask, known flag) -> images
    (B, 1, S, S) in [0, 1]. :class:`Generator`'s layout (z ++ label embedding -> linear -> (8w, 4, 4),
    widths halving while upsampling) with every GroupNorm replaced by :class:`SPADE` (the mask
    resized to that layer's resolution, 4 x 4 up to S x S), and one more SPADE conv block at full
    resolution before the output conv, so the mask shapes the image down to single pixels."""

    def __init__(self, image_size: int, width: int, latent_dim: int, groups: int):
        super().__init__()
        chans = _latent_stem(self, image_size, width, latent_dim)
        self.from_z_norm = SPADE(chans[-1], groups)
        self.up = nn.ModuleList([SpadeBlock(a, b, groups) for a, b in zip(chans[:0:-1], chans[-2::-1])])
        self.last = SpadeBlock(chans[0], chans[0], groups)
        self.head = nn.Conv2d(chans[0], 1, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.from_z(torch.cat([z, self.label(y)], dim=1)).view(-1, *self.bottom)
        h = F.silu(self.from_z_norm(h, cond))
        for block in self.up:
            h = block(h, cond)
        return torch.sigmoid(self.head(self.last(h, cond)))


class Discriminator(nn.Module):
    """``forward(x, y[, cond])``: (B, 1, S, S) in [0, 1], (B,)[, (B, cond_channels, S, S) in [0, 1]]
    -> logits (B,). With ``cond_channels`` (the mask-conditioned GAN: the lesion mask and its known
    flag) the condition is concatenated to the image as extra input channels, so D judges the
    (image, mask) pair and can punish a lesion that is not where the mask is. Opacus-compatible."""

    def __init__(self, image_size: int, width: int, cond_channels: int = 0):
        super().__init__()
        sizes = level_sizes(image_size)
        chans = [1 + cond_channels, *level_channels(width, len(sizes) - 1)]
        self.convs = nn.Sequential(*[m for a, b in zip(chans, chans[1:]) for m in
                                     (SpectralNorm(nn.Conv2d(a, b, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))])
        self.linear = SpectralNorm(nn.Linear(chans[-1] * sizes[-1] ** 2, 1))
        self.embed = SpectralNorm(label_embedding(chans[-1]))  # projection: <embed(y), h>

    def forward(self, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.convs(2 * x - 1 if cond is None else torch.cat([2 * x - 1, 2 * cond - 1], dim=1))
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
    """Label-conditional GAN (mask-conditioned with ``model.mask_conditioning``: the module
    docstring's last part); anomaly maps are errors of a healthy reconstruction found by latent
    inversion of the EMA generator."""

    family = "gan"
    private_networks = ("discriminator",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, size = cfg.model, cfg.data.image_size
        self.mask_conditioned = m.mask_conditioning
        if self.mask_conditioned and cfg.privacy.enabled and m.gan_fake_masks == "real":
            raise ValueError("model.gan_fake_masks=real with privacy.enabled: the GAN's generator is not DP-trained "
                             "and must not see real masks; use model.gan_fake_masks=auto or synthetic")
        self.synthetic_fakes = self.mask_conditioned and (
            m.gan_fake_masks == "synthetic" or (m.gan_fake_masks == "auto" and cfg.privacy.enabled))
        if self.mask_conditioned:
            generator = SpadeGenerator(size, m.width, m.latent_dim, m.norm_groups)
            discriminator = Discriminator(size, m.width, cond_channels=mc.MASK_CHANNELS)
        else:
            generator = Generator(size, m.width, m.latent_dim, m.norm_groups)
            discriminator = Discriminator(size, m.width)
        ema = copy.deepcopy(generator).requires_grad_(False)
        ema.register_buffer("ema_updates", torch.zeros(()))
        self.networks = {"generator": generator, "discriminator": discriminator, "generator_ema": ema}

    def _net(self, name: str) -> nn.Module:
        """The bare network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks[name]
        return getattr(net, "_module", net)

    @property
    def _device(self) -> torch.device:
        return next(self._net("generator").parameters()).device

    # ---------------------------------------------------------------- mask condition
    def _condition(self, labels: torch.Tensor, masks: torch.Tensor | None, dropout: bool = False
                   ) -> torch.Tensor | None:
        """The mask condition (B, 2, S, S) (mask, known flag; ``mask_conditioning.py``) of labels (B,)
        and masks (B, 1, S, S) bool (None: unknown); ``dropout``: training's, each mask unknown with
        probability ``model.cond_drop`` (global RNG). None for a model without mask conditioning."""
        if not self.mask_conditioned:
            return None
        masks, known = mc.known_masks(labels, masks, len(labels), labels.device)
        if dropout:
            known = mc.dropped(known, torch.zeros_like(known), self.cfg.model.cond_drop)
        return mc.condition(masks, known, self.cfg.data.image_size).to(labels.device)

    def _no_lesion(self, n: int, device) -> torch.Tensor | None:
        """The condition "healthy, known empty mask" for n slices (anomaly maps, brains, diversity)."""
        healthy = torch.full((n,), HEALTHY, dtype=torch.long, device=device)
        size = self.cfg.data.image_size
        return self._condition(healthy, torch.zeros(n, 1, size, size, dtype=torch.bool, device=device))

    def _g(self, name: str, z: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Generator ``name`` (or its EMA) on z (B, latent_dim), labels (B,) and, when mask-conditioned,
        the condition (B, 2, S, S): images (B, 1, S, S) in [0, 1]."""
        net = self.networks[name]
        return net(z, y) if cond is None else net(z, y, cond)

    def _d(self, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        net = self.networks["discriminator"]
        return net(x, y) if cond is None else net(x, y, cond)

    @torch.no_grad()
    def synthetic_masks(self, z: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
        """Data-independent lesion masks (B, 1, S, S) bool for the fakes of z (B, latent_dim) and labels
        (B,): for each lesion label one blob (:func:`mask_conditioning.synthetic_masks`, random numbers
        from ``generator``) inside the brain of the EMA generator's healthy slice of the same z
        (pixels > BRAIN_LEVEL); empty for healthy labels. Depends on z, the labels and the weights only."""
        brain = self._g("generator_ema", z, torch.full_like(labels, HEALTHY), self._no_lesion(len(z), z.device))
        blobs = mc.synthetic_masks(brain > BRAIN_LEVEL, generator)
        return blobs & (labels == LESION).view(-1, 1, 1, 1)

    def _fake_condition(self, z, labels, masks, real_cond, generator=None) -> torch.Tensor | None:
        """The condition the generator's fakes get: the real pairs' own (``real_cond``, the batch's
        masks) or, with synthetic fake masks (``model.gan_fake_masks``; always under DP), one built
        from :meth:`synthetic_masks` alone, never from ``masks``."""
        if not self.synthetic_fakes:
            return real_cond
        fake_masks = self.synthetic_masks(z, labels, generator)
        known = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        if generator is None:  # training: the same dropout as the real pairs'
            known = mc.dropped(known, torch.zeros_like(known), self.cfg.model.cond_drop)
        return mc.condition(fake_masks, known, self.cfg.data.image_size).to(labels.device)

    # ---------------------------------------------------------------- training
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
        sum (not a convergence measure for a GAN), ``d_real`` / ``d_fake`` = mean D logits.

        Mask-conditioned: D sees the real (image, mask) pairs with ``masks`` (B, 1, S, S) bool (None:
        unknown; each dropped to unknown with probability ``cond_drop``); the fakes are conditioned on
        the same masks, or with synthetic fake masks (under DP) on :meth:`synthetic_masks` only."""
        self.train()
        D = self.networks["discriminator"]
        z = torch.randn(len(images), self.cfg.model.latent_dim, device=images.device)
        real_cond = self._condition(labels, masks, dropout=True)
        fake_cond = self._fake_condition(z, labels, masks, real_cond)
        fake = self._g("generator", z, labels, fake_cond)
        opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]
        opt_d.zero_grad(set_to_none=True)
        real_logits, fake_logits = self._d(images, labels, real_cond), self._d(fake.detach(), labels, fake_cond)
        d_loss, _ = self._losses(real_logits, fake_logits)
        self.precision.backward(d_loss + extra_loss() if extra_loss is not None else d_loss)
        self.precision.step(opt_d)
        if self.cfg.privacy.enabled:
            # G's update is neither clipped nor noised: under DP it must not depend on the batch (its
            # labels, its Poisson size), only on D (a DP release) and noise. Fresh fakes then, a fixed
            # train.batch_size of them with labels drawn uniformly, on data-independent masks.
            n = self.cfg.train.batch_size
            z = torch.randn(n, self.cfg.model.latent_dim, device=images.device)
            labels = torch.randint(HEALTHY, LESION + 1, (n,), device=images.device)
            fake_cond = self._fake_condition(z, labels, None, None)
            fake = self._g("generator", z, labels, fake_cond)
        opt_g.zero_grad(set_to_none=True)
        with _frozen(D):
            _, g_loss = self._losses(real_logits.detach(), self._d(fake, labels, fake_cond))
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
        ratio 1, collapse 0. Mask-conditioned: conditions as in ``train_step`` without dropout (the
        synthetic fake masks drawn from the fixed seed too); the diversity samples get "healthy, no lesion"."""
        latent = self.cfg.model.latent_dim
        with self._eval_mode():
            x, y = images.to(self._device), labels.to(self._device)
            g = torch.Generator().manual_seed(self.cfg.seed)
            z = torch.randn(len(x), latent, generator=g).to(x.device)
            real_cond = self._condition(y, None if masks is None else masks.to(x.device))
            fake_cond = self._fake_condition(z, y, masks, real_cond, generator=g)
            fake = self._g("generator", z, y, fake_cond)
            real_logits, fake_logits = self._d(x, y, real_cond), self._d(fake, y, fake_cond)
            d_loss, g_loss = self._losses(real_logits, fake_logits)
            z = torch.randn(DIVERSITY_SAMPLES, latent, generator=g).to(x.device)
            samples = self._g("generator_ema", z, torch.full((len(z),), HEALTHY, device=x.device),
                              self._no_lesion(len(z), x.device))
        diversity, real = _pairwise_rms(samples), _pairwise_rms(x)
        ratio = diversity / max(real, 1e-8) if len(x) > 1 else 1.0
        return {**_floats(d_loss, g_loss, real_logits, fake_logits), "diversity": diversity,
                "diversity_ratio": ratio, "collapse": float(ratio < COLLAPSE_FRACTION)}

    # ---------------------------------------------------------------- generation
    def sample(self, labels, generator=None) -> torch.Tensor:
        """z ~ N(0, I) (drawn on CPU from ``generator``) through the EMA generator with ``labels``
        (n,): (n, 1, S, S) in [0, 1]. A mask-conditioned model samples from the label alone (mask unknown)."""
        z = torch.randn(len(labels), self.cfg.model.latent_dim, generator=generator)
        with self._eval_mode():
            y = labels.to(self._device)
            return self._g("generator_ema", z.to(self._device), y, self._condition(y, None))

    def sample_masked(self, labels, masks, generator=None) -> torch.Tensor:
        """Like ``sample`` (the same z for one generator state), given each slice's lesion mask
        (n, 1, S, S) bool too (healthy labels: cleared, an empty mask is meant): (n, 1, S, S) in [0, 1].
        MaskConditioningError for a model trained without mask conditioning."""
        if not self.mask_conditioned:
            return super().sample_masked(labels, masks, generator)
        size = self.cfg.data.image_size
        if tuple(masks.shape) != (len(labels), 1, size, size):
            raise ValueError(f"masks {tuple(masks.shape)}: expected ({len(labels)}, 1, {size}, {size}) "
                             f"(data.image_size of the model)")
        z = torch.randn(len(labels), self.cfg.model.latent_dim, generator=generator)
        with self._eval_mode():
            y = labels.to(self._device)
            return self._g("generator_ema", z.to(self._device), y, self._condition(y, masks.to(self._device)))

    def generator_prior(self) -> GeneratorPrior:
        """The EMA generator G_ema(z, y) (what ``sample`` draws from), z ~ N(0, I) of size
        ``model.latent_dim``. A GAN has no encoder: the solver starts from z = 0 and prior draws.
        Mask-conditioned: healthy labels with a known empty mask, lesion labels with the mask unknown."""
        net = self._net("generator_ema").eval()
        size = self.cfg.data.image_size

        def decode(z, y):
            y = y.to(z.device)
            if not self.mask_conditioned:
                return net(z, y)
            return net(z, y, self._condition(y, torch.zeros(len(y), 1, size, size, dtype=torch.bool, device=z.device)))

        return standard_normal_prior(self.cfg.model.latent_dim, decode)

    def invert(self, images: torch.Tensor, steps: int | None = None, starts: int = 8, lr: float = 0.05,
               prior: float = 1e-3) -> torch.Tensor:
        """Healthy reconstruction G_ema(z*, healthy) of ``images`` (B, 1, S, S): z starts at the
        best of z = 0 and ``starts - 1`` seeded N(0, I) draws, then ``steps`` (default
        ``model.inversion_steps``) Adam steps minimise the MSE over the whole slice + prior * mean(z^2).
        The whole slice, not the brain alone: preprocessing zeroes everything outside the brain, and
        fitting that background pins down the brain's outline (measured: README, "Model families").
        Mask-conditioned: "healthy, known empty mask". Weights, their requires_grad flags and the
        train/eval modes are left as they were."""
        x = images.to(self._device)
        healthy = torch.full((len(x),), HEALTHY, device=x.device)
        cond = self._no_lesion(len(x), x.device)
        g = torch.Generator().manual_seed(self.cfg.seed)
        draws = torch.randn(starts - 1, *x.shape[:1], self.cfg.model.latent_dim, generator=g)
        candidates = torch.cat([torch.zeros_like(draws[:1]), draws]).to(x.device)

        def error(z):  # (B,) MSE + latent prior
            return ((self._g("generator_ema", z, healthy, cond) - x) ** 2).flatten(1).mean(1) + prior * (z ** 2).mean(1)

        with self._eval_mode():
            errors = torch.stack([error(z) for z in candidates])  # (starts, B)
            z = candidates[errors.argmin(0), torch.arange(len(x), device=x.device)]
            with torch.enable_grad():
                z = z.clone().requires_grad_(True)
                opt = torch.optim.Adam([z], lr=lr)
                for _ in range(self.cfg.model.inversion_steps if steps is None else steps):
                    z.grad, = torch.autograd.grad(error(z).sum(), z)  # no parameter .grad is touched
                    opt.step()
            return self._g("generator_ema", z.detach(), healthy, cond)

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """(x - G_ema(z*, healthy))^2 with z* from :meth:`invert` (``setting`` may set its ``steps``),
        Gaussian-smoothed (sigma 1 px), zeroed outside ``brain``: same shape as ``images``, >= 0.
        Slower than the VAE's single pass: every batch runs an optimisation (``inversion_steps``
        forward + backward passes of G)."""
        x = images.to(self._device)
        score = (x - self.invert(x, **setting)) ** 2
        return smooth_score(score, None if brain is None else brain.to(x.device))
