"""Small conv building blocks shared by the model families.

Everything here is Opacus-compatible: GroupNorm only (no BatchNorm), no in-place ops, no
parameter sharing. Feature maps are (B, C, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_count(groups: int, channels: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class ConvBlock(nn.Sequential):
    """3x3 conv (optionally stride 2) -> GroupNorm -> SiLU: (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(group_count(groups, cout), cout), nn.SiLU())


class Down(ConvBlock):
    """Stride-2 conv block: (B, cin, H, W) -> (B, cout, ceil(H/2), ceil(W/2))."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(cin, cout, groups, stride=2)


class Up(nn.Sequential):
    """Nearest 2x upsampling then a conv block (no checkerboards): (B, cin, H, W) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBlock(cin, cout, groups))


def label_embedding(dim: int, n_labels: int = 2) -> nn.Embedding:
    """Healthy / lesion label (B,) int64 -> (B, dim) learned vector. A plain ``nn.Embedding``:
    Opacus finds its per-sample-gradient rule by exact module type, not for subclasses."""
    return nn.Embedding(n_labels, dim)


def level_sizes(size: int, bottom: int = 4) -> list[int]:
    """Spatial sizes from ``size`` halving down to ``bottom`` (or until odd): 64 -> [64, 32, 16, 8, 4]."""
    sizes = [size]
    while sizes[-1] > bottom and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def level_channels(width: int, levels: int, cap: int = 8) -> list[int]:
    """Channels per resolution level, doubling from ``width`` up to ``cap * width``."""
    return [min(width * 2 ** i, cap * width) for i in range(levels)]


def smooth_score(score: torch.Tensor, brain: torch.Tensor | None = None, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian-smooth a (B, 1, H, W) anomaly score (separable, reflect padding) and zero it
    outside ``brain`` (bool or 0/1; (B, 1, H, W), (B, H, W) or one (H, W) mask for all). Keeps
    the score >= 0."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=score.dtype, device=score.device)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    mode = "reflect" if min(score.shape[-2:]) > radius else "replicate"
    out = F.pad(score, (radius,) * 4, mode=mode)
    out = F.conv2d(F.conv2d(out, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).clamp_min(0)
    if brain is not None:
        brain = brain.reshape(out.shape) if brain.numel() == out.numel() else brain.expand_as(out)
        out = out * brain.to(out.dtype)
    return out
