"""Invertible layers of the normalising flow (``flow.py``).

Feature maps are (B, C, H, W). ``forward(x[, y])`` returns ``(out, logdet)``, ``logdet`` (B,) the
log |det| of the layer's Jacobian for each image; ``inverse`` undoes ``forward`` exactly (up to
rounding). ``y`` is the label (B,) int64, 0 healthy / 1 lesion.

Per-sample gradients. The whole flow trains with DP-SGD, and Opacus sees a parameter's gradient
only through the standard layer (Conv2d, GroupNorm, Embedding) it belongs to, from that layer's
per-image inputs and output gradients. A log-determinant taken from a weight directly
(``slogdet(conv.weight)``) gives the weight a gradient that never reaches the per-sample gradients
DP-SGD clips, noises and applies: the term would be silently dropped and the flow would collapse.
So a weight's log-det is read off the layer's own output: :func:`with_probes` appends a few probe
pixels to every image (the identity's columns for the 1x1 conv, whose outputs there are the
weight's columns), the one Conv2d call maps images and probes, and the log-det is computed from the
probes' outputs. Every image's gradient then carries the log-det term, and Opacus' Conv2d grad
sampler computes it exactly. The probes cost C extra pixels per image.

Opacus-compatible like ``layers.py``: GroupNorm only, no buffers, no in-place ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.layers import group_count, label_embedding


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block of pixels becomes 4 channels."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    return x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def with_probes(x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) and probe pixels (C, P) -> (B, C, 1, H*W + P): every image's pixels in a row,
    followed by the same P probe pixels, for one 1x1 convolution of both."""
    b, c, h, w = x.shape
    return torch.cat([x.reshape(b, c, 1, h * w), probes.to(x)[None, :, None, :].expand(b, c, 1, -1)], dim=3)


class ChannelAffine(nn.Module):
    """Actnorm's DP-safe substitute: out = w_c * x + b_c per channel, w and b learned, initialised to
    the identity. Glow's actnorm initialises w, b from the first batch's statistics: under DP that
    reads data outside the private mechanism, and each site would start from its own values. A
    depthwise 1x1 Conv2d; log|det| = H W sum_c log|w_c|, w read off probes 0 and 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, groups=channels)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        probes = torch.stack([torch.zeros(c), torch.ones(c)], dim=1)
        out = self.conv(with_probes(x, probes))
        scale = out[:, :, 0, h * w + 1] - out[:, :, 0, h * w]  # (B, C): w_c for every image
        return out[..., : h * w].reshape(b, c, h, w), h * w * scale.abs().log().sum(1)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.conv.bias.view(1, -1, 1, 1)) / self.conv.weight.view(1, -1, 1, 1)


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution, initialised to a random rotation: a bias-free 1x1 Conv2d;
    log|det| = H W log|det W|, W read off the identity's columns as probes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linalg.qr(torch.randn(channels, channels))[0].view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        out = self.conv(with_probes(x, torch.eye(c)))
        weight = out[:, :, 0, h * w:]  # (B, C, C): W for every image
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # slogdet has no bf16 / fp16
        return out[..., : h * w].reshape(b, c, h, w), h * w * torch.linalg.slogdet(weight)[1]

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.conv.weight[:, :, 0, 0]), x)


class AffineCoupling(nn.Module):
    """Glow's affine coupling, class-conditional: the first half of the channels (x_a) and the label
    give a shift t and scale s = sigmoid(r + 2) in (0, 1) for the second half:
    x_b -> (x_b + t) * s, log|det| = sum log s. The net is conv3x3 (+ label embedding) -> GroupNorm,
    SiLU -> conv1x1 -> GroupNorm, SiLU -> conv3x3, the last zero-initialised (identity at start)."""

    def __init__(self, channels: int, hidden: int, groups: int):
        super().__init__()
        self.split = (channels // 2, channels - channels // 2)
        self.inp = nn.Conv2d(self.split[0], hidden, 3, padding=1)
        self.label = label_embedding(hidden)
        g = group_count(groups, hidden)
        self.net = nn.Sequential(nn.GroupNorm(g, hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 1),
                                 nn.GroupNorm(g, hidden), nn.SiLU())
        self.out = nn.Conv2d(hidden, 2 * self.split[1], 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _shift_scale(self, xa: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift and pre-sigmoid scale (r + 2), each (B, C - C//2, H, W)."""
        shift, raw = self.out(self.net(self.inp(xa) + self.label(y)[:, :, None, None])).chunk(2, dim=1)
        return shift, raw + 2.0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x.split(self.split, dim=1)
        shift, raw = self._shift_scale(xa, y)
        return torch.cat([xa, (xb + shift) * torch.sigmoid(raw)], dim=1), F.logsigmoid(raw).flatten(1).sum(1)

    def inverse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xa, xb = x.split(self.split, dim=1)
        shift, raw = self._shift_scale(xa, y)
        return torch.cat([xa, xb / torch.sigmoid(raw) - shift], dim=1)


class FlowStep(nn.Module):
    """One Glow step: channel affine -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, groups: int):
        super().__init__()
        self.affine = ChannelAffine(channels)
        self.mix = InvertibleConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden, groups)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld_affine = self.affine(x)
        x, ld_mix = self.mix(x)
        x, ld_coupling = self.coupling(x, y)
        return x, ld_affine + ld_mix + ld_coupling

    def inverse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.affine.inverse(self.mix.inverse(self.coupling.inverse(x, y)))


class SplitPrior(nn.Module):
    """Glow's learned prior of the channels split off at a scale, class-conditional:
    p(z | h, y) = N(mu, exp(logs)^2) per element, (mu, logs) = conv3x3(h) + an embedding of y.
    (B, Ch, H, W), (B,) -> mu, logs, each (B, Cz, H, W); zero-initialised (N(0, 1) at start)."""

    def __init__(self, h_channels: int, z_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(h_channels, 2 * z_channels, 3, padding=1)
        self.label = label_embedding(2 * z_channels)
        for p in (self.conv.weight, self.conv.bias, self.label.weight):
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logs = (self.conv(h) + self.label(y)[:, :, None, None]).chunk(2, dim=1)
        return mu, logs


class TopPrior(nn.Module):
    """The class-conditional base distribution of the coarsest latent: a learned mean and log-std
    per class and element (an embedding of y). (B,) -> mu, logs, each (B, C, H, W); initialised
    near N(0, 1) (std 0.01, so that the two classes differ from the start)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.shape = (2 * channels, size, size)
        self.label = label_embedding(2 * channels * size * size)
        nn.init.normal_(self.label.weight, std=0.01)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logs = self.label(y).view(-1, *self.shape).chunk(2, dim=1)
        return mu, logs
