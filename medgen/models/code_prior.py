"""A small class-conditional PixelCNN over a grid of code indices (the VQ-VAE's prior).

``CodePrior(codes, labels)``: codes (B, h, w) int64 in [0, K), labels (B,) int64 -> logits
(B, K, h, w), where the logits at (i, j) depend on the label and on the codes strictly before
(i, j) in raster order only (row by row, left to right). Two streams as in the gated PixelCNN
(van den Oord et al. 2016) without its blind spot: a vertical stream that sees the rows above and a
horizontal one that sees the same row to the left plus the vertical stream.

Causality comes from zero padding on the top / left and cropping, so every layer is a plain
``nn.Conv2d`` / ``nn.Embedding`` (Opacus computes their per-sample gradients). No normalisation
layer: GroupNorm's statistics over the grid would let every position see the future.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgen.models.layers import label_embedding


def _above(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (kernel (kh, kw), kw odd) over rows i-kh .. i-1 only: (B, C, H, W) -> (B, C', H, W)."""
    kh, kw = conv.kernel_size
    return conv(F.pad(x, (kw // 2, kw // 2, kh, 0)))[:, :, :x.shape[2]].contiguous()


def _up_to(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (kernel (kh, kw), kw odd) over rows i-kh+1 .. i: same size."""
    kh, kw = conv.kernel_size
    return conv(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)))


def _left(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (kernel (1, kw)) over columns j-kw .. j-1 of the same row: same size."""
    kw = conv.kernel_size[1]
    return conv(F.pad(x, (kw, 0, 0, 0)))[:, :, :, :x.shape[3]].contiguous()


def _left_to(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (kernel (1, kw)) over columns j-kw+1 .. j: same size."""
    return conv(F.pad(x, (conv.kernel_size[1] - 1, 0, 0, 0)))


class CodePrior(nn.Module):
    def __init__(self, n_codes: int, width: int, layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(n_codes, width)
        self.label = label_embedding(width)
        self.v_in, self.h_in = nn.Conv2d(width, width, (2, 3)), nn.Conv2d(width, width, (1, 2))
        self.v2h_in = nn.Conv2d(width, width, 1)
        self.v = nn.ModuleList(nn.Conv2d(width, width, (2, 3)) for _ in range(layers))
        self.h = nn.ModuleList(nn.Conv2d(width, width, (1, 2)) for _ in range(layers))
        self.v2h = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.h_out = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.head = nn.Conv2d(width, n_codes, 1)
        self.context_rows = 2 + layers  # the logits of row i depend on code rows i - context_rows .. i only

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2).contiguous()
        label = self.label(labels)[:, :, None, None]  # on the streams: the first position sees no code
        v = F.silu(_above(self.v_in, x) + label)
        h = F.silu(_left(self.h_in, x) + self.v2h_in(v) + label)
        for conv_v, conv_h, v2h, h_out in zip(self.v, self.h, self.v2h, self.h_out):
            v = v + F.silu(_up_to(conv_v, v))
            h = h + h_out(F.silu(_left_to(conv_h, h) + v2h(v)))
        return self.head(F.silu(h))

    def nll(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each grid (B, h, w) under the prior, summed over positions: (B,) nats."""
        return F.cross_entropy(self(codes, labels), codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, grid: tuple[int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling in raster order, one position per pass, the categorical draws made on
        CPU from ``generator``: labels (n,) -> codes (n, h, w) int64. Each pass sees only the rows that
        can change the current one (``context_rows`` above it, none below)."""
        h, w = grid
        codes = torch.zeros(len(labels), h, w, dtype=torch.long, device=labels.device)
        for i in range(h):
            top = max(0, i - self.context_rows)
            for j in range(w):
                probs = self(codes[:, top:i + 1], labels)[:, :, i - top, j].softmax(1).float().cpu()
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0].to(codes.device)
        return codes
