"""The autoencoder of the latent diffusion model (``model.space="latent"``, used by ``ddpm.py``).

``encode``: images (B, 1, S, S) in [0, 1] -> latents (B, 4, S/4, S/4), each latent standardised to
mean 0, std 1 over its C x H x W values (a parameter-free GroupNorm with one group), so the
diffusion sees unit-variance data whatever the encoder's scale, as Rombach et al. (2022) get from
rescaling by a measured std. ``decode``: latents -> images in [0, 1] (sigmoid). Two stride-2
conv blocks down and two nearest-upsample conv blocks up, ``width`` -> 4 ``width`` channels.

Opacus-compatible like ``layers.py``: GroupNorm only, no in-place ops, no parameter sharing.
"""

from __future__ import annotations

import torch
from torch import nn

from medgen.models.layers import ConvBlock, Down, Up

LATENT_CHANNELS = 4
DOWNSAMPLING = 4  # image side / latent side


class Autoencoder(nn.Module):
    def __init__(self, width: int, groups: int, channels: int = LATENT_CHANNELS):
        super().__init__()
        c = [width, 2 * width, 4 * width]
        self.encoder = nn.Sequential(ConvBlock(1, c[0], groups), Down(c[0], c[1], groups), Down(c[1], c[2], groups),
                                     nn.Conv2d(c[2], channels, 3, padding=1))
        self.standardise = nn.GroupNorm(1, channels, affine=False)
        self.decoder = nn.Sequential(ConvBlock(channels, c[2], groups), Up(c[2], c[1], groups), Up(c[1], c[0], groups),
                                     ConvBlock(c[0], c[0], groups), nn.Conv2d(c[0], 1, 3, padding=1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 4, S/4, S/4), per-latent mean 0, std 1."""
        return self.standardise(self.encoder(2 * images - 1))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, S/4, S/4) -> (B, 1, S, S) in [0, 1]."""
        return torch.sigmoid(self.decoder(latents))
