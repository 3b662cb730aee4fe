"""Multi-scale normalising flow (family ``"flow"``; RealNVP / Glow: Dinh et al. 2017, Kingma &
Dhariwal 2018), class-conditional, with an exact log-likelihood.

Images (B, 1, S, S) in [0, 1] are read as 256-level data: dequantised, y = (255 x + u) / 256 with
u ~ U[0, 1) per pixel (u = 1/2 in eval mode: deterministic), and logit-transformed,
h = logit(a + (1 - 2a) y), a = 0.05, with the log-det of both. ``model.flow_levels`` scales follow,
each: squeeze (2x2 pixels -> 4 channels), ``model.flow_steps`` steps of {channel affine (actnorm's
DP-safe substitute), invertible 1x1 conv, affine coupling}, then split: half of the channels leave
as a latent z_l with a learned class-conditional Gaussian prior given the other half (the last
scale keeps all of them under a learned per-class Gaussian). Coupling nets widen like the other
families' encoders: ``model.width`` channels at the first scale, doubling per scale (cap 8x).
Layers: ``flow_layers.py`` (including why every log-det is computed from probe pixels).

Loss: the negative log-likelihood of the 256-level image in bits per pixel,
bpd = (-log p(y) / D + log 256) / log 2, D = S * S, averaged over the batch (``bpd`` = ``loss``).

Sampling: z_l = mu + T sigma eps from the priors, T = ``model.flow_temperature``, inverted; pixels
clamped to [0, 1].

Anomaly map: a flow's log-likelihood has no exact per-pixel split (the 1x1 convs and couplings mix
pixels). The score used is the latents' part of -log p: 0.5 ((z - mu) / sigma)^2 per latent element
under the healthy label, each element's value spread evenly over the 2^l x 2^l pixel block it was
squeezed from at scale l, summed over channels and scales. ``score="coarse"`` (default) leaves out
the finest scale, whose likelihood is dominated by local pixel correlations (texture, noise) rather
than by what the image shows (Schirrmeister et al. 2020, Kirichenko et al. 2020); ``score="all"``
sums every scale; ``score="ratio"``: the all-scale map under the healthy label minus the one under
the lesion label, clamped at 0 — a per-pixel class likelihood ratio (pixels the lesion model
explains better). Smoothed (sigma 1 px) and zeroed outside the brain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import Config
from medgen.models.base import HEALTHY, LESION, GenerativeModel
from medgen.models.flow_layers import FlowStep, SplitPrior, TopPrior, squeeze, unsqueeze
from medgen.models.layers import smooth_score

ALPHA = 0.05   # logit transform margin (RealNVP)
BINS = 256     # intensity levels the likelihood is counted in
SCORES = ("coarse", "all", "ratio")


def to_logits(images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise and logit-transform: images (B, 1, S, S) in [0, 1] (clamped), noise u like them
    in [0, 1) -> logits h (same shape, real), log|dh/dy| per image (B,)."""
    y = (images.clamp(0, 1) * (BINS - 1) + noise) / BINS
    p = ALPHA + (1 - 2 * ALPHA) * y
    log_p, log_q = torch.log(p), torch.log1p(-p)
    return log_p - log_q, (math.log(1 - 2 * ALPHA) - log_p - log_q).flatten(1).sum(1)


def from_logits(h: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_logits` with u = 1/2: logits -> images (not clamped)."""
    y = (torch.sigmoid(h) - ALPHA) / (1 - 2 * ALPHA)
    return (y * BINS - 0.5) / (BINS - 1)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logs)^2) per element, same shape."""
    return -0.5 * (((z - mu) * torch.exp(-logs)) ** 2 + 2 * logs + math.log(2 * math.pi))


class FlowNet(nn.Module):
    """The flow. ``forward(images, labels, noise)`` -> log-density of the dequantised images (B,)
    in nats; :meth:`encode` / :meth:`decode` map logits to the latents and back."""

    def __init__(self, image_size: int, levels: int, steps: int, width: int, groups: int):
        super().__init__()
        if image_size % 2 ** levels:
            raise ValueError(f"model.flow_levels={levels}: data.image_size={image_size} must be divisible by "
                             f"2**flow_levels (each scale halves the side)")
        self.levels, self.priors = nn.ModuleList(), nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        channels, size = 1, image_size
        for level in range(levels):
            channels, size = 4 * channels, size // 2
            hidden = min(width * 2 ** level, 8 * width)
            self.levels.append(nn.ModuleList([FlowStep(channels, hidden, groups) for _ in range(steps)]))
            if level < levels - 1:
                kept = channels - channels // 2
                self.priors.append(SplitPrior(kept, channels // 2))
                self.latent_shapes.append((channels // 2, size, size))
                channels = kept
            else:
                self.priors.append(TopPrior(channels, size))
                self.latent_shapes.append((channels, size, size))

    def encode(self, h: torch.Tensor, y: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
        """Logits (B, 1, S, S), labels (B,) -> [(z, mu, logs) per scale, finest first, each
        (B, *latent_shapes[l])], log|det| of logits -> latents per image (B,)."""
        latents, logdet = [], torch.zeros(len(h), device=h.device, dtype=h.dtype)
        for steps, prior in zip(self.levels, self.priors):
            h = squeeze(h)
            for step in steps:
                h, ld = step(h, y)
                logdet = logdet + ld
            if isinstance(prior, SplitPrior):
                h, z = h.split([h.shape[1] - h.shape[1] // 2, h.shape[1] // 2], dim=1)
                latents.append((z, *prior(h, y)))
            else:
                latents.append((h, *prior(y)))
        return latents, logdet

    def decode(self, y: torch.Tensor, pick) -> torch.Tensor:
        """Latents -> logits (B, 1, S, S), coarsest scale first: ``pick(level, mu, logs)`` returns the
        latent of a scale given its prior's parameters (a stored z, or a draw)."""
        h = None
        for level in reversed(range(len(self.levels))):
            prior = self.priors[level]
            if h is None:
                h = pick(level, *prior(y))
            else:
                h = torch.cat([h, pick(level, *prior(h, y))], dim=1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h, y)
            h = unsqueeze(h)
        return h

    def forward(self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h, logdet = to_logits(images, noise)
        latents, flow_logdet = self.encode(h, labels)
        log_pz = sum(gaussian_log_density(*lat).flatten(1).sum(1) for lat in latents)
        return log_pz + logdet + flow_logdet


class NormalisingFlow(GenerativeModel):
    """Class-conditional Glow-style flow; anomaly maps from the latents' deviation under the healthy prior."""

    family = "flow"
    private_networks = ("flow",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.networks = {"flow": FlowNet(cfg.data.image_size, m.flow_levels, m.flow_steps, m.width, m.norm_groups)}

    @property
    def _net(self) -> FlowNet:
        """The bare network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks["flow"]
        return getattr(net, "_module", net)

    @property
    def _device(self) -> torch.device:
        return next(self._net.parameters()).device

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"flow": torch.optim.Adam(self.networks["flow"].parameters(), lr=self.cfg.train.lr)}

    def _bpd(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bits per pixel of each image (B,); dequantisation noise from torch's global generator in
        train mode, u = 1/2 in eval mode."""
        net = self.networks["flow"]
        noise = torch.rand_like(images) if net.training else torch.full_like(images, 0.5)
        log_p = net(images, labels, noise)
        pixels = images[0].numel()
        return (-log_p / pixels + math.log(BINS)) / math.log(2)

    def train_step(self, images, labels, optimizers, step, extra_loss=None, masks=None) -> dict[str, float]:
        """One Adam step on a batch (B, 1, S, S) in [0, 1] with labels (B,): ``bpd`` (mean bits per
        pixel) and ``loss`` = bpd (+ extra_loss)."""
        self.train()
        opt = optimizers["flow"]
        opt.zero_grad(set_to_none=True)
        bpd = self._bpd(images, labels).mean()
        loss = bpd + extra_loss() if extra_loss is not None else bpd
        self.precision.backward(loss)
        self.precision.step(opt)
        return {"loss": float(loss.detach()), "bpd": float(bpd.detach())}

    def evaluate(self, images, labels, masks=None) -> dict[str, float]:
        """``loss`` = ``bpd`` with u = 1/2 (deterministic)."""
        with self._eval_mode():
            bpd = float(self._bpd(images.to(self._device), labels.to(self._device)).mean())
        return {"loss": bpd, "bpd": bpd}

    def sample(self, labels, generator=None) -> torch.Tensor:
        """Latents drawn at temperature ``model.flow_temperature`` (noise on CPU from ``generator``,
        finest scale first) for ``labels`` (n,): (n, 1, S, S) in [0, 1]."""
        n, t = len(labels), self.cfg.model.flow_temperature
        eps = [torch.randn(n, *shape, generator=generator) for shape in self._net.latent_shapes]
        with self._eval_mode():
            eps = [e.to(self._device) for e in eps]
            logits = self._net.decode(labels.to(self._device),
                                      lambda level, mu, logs: mu + t * torch.exp(logs) * eps[level])
            return from_logits(logits).clamp(0, 1)

    def _deviation_map(self, x: torch.Tensor, label: int, coarse: bool) -> torch.Tensor:
        """0.5 ((z - mu) / sigma)^2 of every latent element under ``label``, spread over its pixel
        block and summed over the scales (``coarse``: all but the finest, when there are several):
        (B, 1, S, S), >= 0."""
        h, _ = to_logits(x, torch.full_like(x, 0.5))
        labels = torch.full((len(x),), label, dtype=torch.long, device=x.device)
        latents, _ = self._net.encode(h, labels)
        out = torch.zeros_like(x)
        for z, mu, logs in latents[1:] if coarse and len(latents) > 1 else latents:
            block = x.shape[-1] // z.shape[-1]
            dev = (0.5 * ((z - mu) * torch.exp(-logs)) ** 2).sum(1, keepdim=True)
            out = out + F.interpolate(dev, scale_factor=block, mode="nearest") / block ** 2
        return out

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """``score="coarse"`` (default): the latents' deviation under the healthy label per pixel,
        the finest scale left out; ``"all"``: every scale; ``"ratio"``: the all-scale deviation
        under the healthy label minus the one under the lesion label, clamped at 0 (see the module
        doc). Smoothed (sigma 1 px), zeroed outside ``brain``. Same shape as ``images``
        (B, 1, S, S), >= 0, deterministic."""
        unknown = set(setting) - {"score"}
        score = setting.get("score", SCORES[0])
        if unknown or score not in SCORES:
            raise TypeError(f"flow anomaly_map: settings {setting} (known: score in {SCORES})")
        with self._eval_mode():
            x = images.to(self._device)
            amap = self._deviation_map(x, HEALTHY, coarse=score == "coarse")
            if score == "ratio":
                amap = (amap - self._deviation_map(x, LESION, coarse=False)).clamp_min(0)
            return smooth_score(amap, None if brain is None else brain.to(x.device))

    def anomaly_sweep(self) -> list[dict]:
        """The coarse scales' deviation first, then every scale's, then the class likelihood ratio."""
        return [{"score": s} for s in SCORES]
