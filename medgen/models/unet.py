"""A small conditional U-Net, the denoiser of the diffusion model (used by ``ddpm.py``).

``UNet(x, t, y)``: noisy images x (B, C, S, S) (about unit variance; C = 1, or the latent
diffusion's 4 channels), time t (B,) float in [0, 1000] (the DDPM rescales its steps to that
range, so the embedding does not depend on the number of steps), labels y (B,) int64 (0 healthy,
1 lesion, 2 "no label" for classifier-free guidance) -> (B, C, S, S): the noise, or the scaled
part of it that the DDPM's preconditioning leaves to the network. With ``cond_channels`` > 0 a
condition (B, cond_channels, S, S) is concatenated to x as extra input channels (the
mask-conditioned DDPM's lesion mask, ``mask_conditioning.py``). In latent space the U-Net runs
with ``patch`` 1 (no pixel-unshuffle: the latents are already small).

Layout: one convolution at full resolution (``width`` / 2 channels), then a 2x2 pixel-unshuffle
(space-to-depth: the U-Net works from S/2 down; with its first level at full resolution it trained
2.5x slower on CPU), and at the end a pixel-shuffle back to S x S, a residual connection to the
full-resolution features and a last convolution there (without it, each pixel's 2x2 phase had its
own output channel: briefly trained models showed a 2-px grid and speckled backgrounds),
resolution levels S/2, S/4, ... down to 8x8 (or the first odd size), channels doubling from
``width`` up to ``cap`` x width; one pre-activation residual block per level on the way down and
one (reading the skip connection) on the way up, a middle block of two residual blocks, and
optional self-attention at the lowest level (down, middle and up). The sinusoidal time embedding
goes through an MLP, the label embedding is added to it, and every residual block adds a linear
projection of the result to its features.

Opacus-compatible (DP-SGD on this network): GroupNorm only, no in-place ops, no parameter
sharing, every trainable layer is a plain Conv2d / Linear / GroupNorm / Embedding (attention is
1x1 convolutions around ``F.scaled_dot_product_attention``, which has no parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.layers import group_count, label_embedding, level_channels, level_sizes

N_LABELS = 3  # 0 healthy, 1 lesion, 2 no label (classifier-free guidance)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. / Ho et al.): t (B,) float -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + projected embedding, GroupNorm -> SiLU -> conv, + skip:
    (B, cin, H, W), (B, emb) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions with a residual connection:
    (B, C, H, W) -> (B, C, H, W). Parameters live in 1x1 convolutions only (Opacus)."""

    def __init__(self, channels: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        # contiguous: Opacus 1.6 unfolds conv inputs with as_strided, which silently gives wrong
        # per-sample gradients for a non-contiguous input (what the reshape is with one head)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w).contiguous())


class UNet(nn.Module):
    """Noise predictor; see the module docstring. ``image_size`` must be a multiple of 8 (every
    halving is exact: 32, 64, 128, ... all work; with ``patch`` 1, also 8 and 16). ``channels``:
    of the input and of the output (1 for images; 4 for the latent diffusion's latents)."""

    def __init__(self, image_size: int, width: int = 16, groups: int = 8, attention: bool = True, cap: int = 4,
                 patch: int = 2, channels: int = 1, cond_channels: int = 0):
        super().__init__()
        self.cond_channels = cond_channels
        chans = level_channels(width, len(level_sizes(image_size // patch, bottom=8)), cap)
        self.patch = patch
        self.width, emb = width, 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = label_embedding(emb, N_LABELS)
        full = max(1, width // 2)
        self.full_in = nn.Conv2d(channels + cond_channels, full, 3, padding=1)
        self.stem = nn.Conv2d(full * patch ** 2, chans[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb, groups) for a, b in zip(chans[:1] + chans[:-1], chans))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in chans[:-1])
        attn = (lambda: SelfAttention(chans[-1], groups)) if attention else nn.Identity
        self.down_attn, self.mid_attn, self.up_attn = attn(), attn(), attn()
        self.mid1, self.mid2 = ResBlock(chans[-1], chans[-1], emb, groups), ResBlock(chans[-1], chans[-1], emb, groups)
        self.up = nn.ModuleList(ResBlock(2 * c, c, emb, groups) for c in reversed(chans))
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1))
            for a, b in zip(chans[:0:-1], chans[-2::-1]))
        self.out_norm, self.out = _norm(chans[0], groups), nn.Conv2d(chans[0], full * patch ** 2, 3, padding=1)
        self.full_norm, self.full_out = _norm(full, groups), nn.Conv2d(full, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, C, S, S), t (B,) float in [0, 1000], y (B,) int64 in {0, 1, 2}, cond (B, cond_channels,
        S, S) (required when cond_channels > 0, else None) -> (B, C, S, S)."""
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(f"UNet with cond_channels={self.cond_channels}: cond "
                             f"{'missing' if cond is None else 'given'}")
        x = torch.cat([x, cond.to(x.dtype)], 1) if cond is not None else x
        emb = self.time_mlp(timestep_embedding(t, self.width)) + self.label(y)
        full = self.full_in(x)
        h, skips, last = self.stem(F.pixel_unshuffle(full, self.patch)), [], len(self.down) - 1
        for i, block in enumerate(self.down):
            h = block(h, emb)
            h = self.down_attn(h) if i == last else h
            skips.append(h)
            h = self.downsample[i](h) if i < last else h
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = self.up_attn(h) if i == 0 else h
            h = self.upsample[i](h) if i < last else h
        h = F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), self.patch) + full
        return self.full_out(F.silu(self.full_norm(h)))
