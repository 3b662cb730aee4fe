"""The feature network phi of the reconstruction's feature term: fixed random convolutions.

phi needs no downloaded weights (LPIPS / VGG cannot be fetched here) and is the same for every
family, so the feature term means the same whichever generator is the prior. Why random and not
the model's own networks: a GAN's discriminator is trained to tell its own samples from real ones
(its features chase the generator's artefacts, and it is the DP-trained network), a VAE has no
discriminator, and an encoder's features are what the latent is fitted through already. Untrained
conv nets still give a useful multi-scale image representation for losses (He, Wang & Hopcroft
2016, "A powerful generative model using random weights for the deep image representation"):
here they add local structure (edges, texture) to the pixel term.

``RandomFeatures()(x)``: x (B, 1, H, W) in [0, 1] (any H, W >= 4) -> one feature map per level:
(B, 16, H, W), (B, 32, H/2, W/2), (B, 64, H/4, W/4); 3x3 convolutions (He-normal weights from a
fixed seed, zero bias) + ReLU, 2x2 average pooling between levels. Never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEED = 20210607  # fixed: the same phi in every run
WIDTHS = (16, 32, 64)


class RandomFeatures(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS, seed: int = SEED):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = (1, *widths)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(b, a, 3, 3, generator=g) * (2 / (9 * a)) ** 0.5, requires_grad=False)
            for a, b in zip(chans, chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = 2 * x - 1, []
        for i, w in enumerate(self.weights):
            if i:
                h = F.avg_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h
            h = F.relu(F.conv2d(h, w.to(h), padding=1))
            out.append(h)
        return out


def feature_distance(phi: RandomFeatures, a_features: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """(B,) mean over levels of the mean squared difference between precomputed features of a and
    phi(b); b (B, 1, H, W)."""
    return torch.stack([((fa - fb) ** 2).flatten(1).mean(1) for fa, fb in zip(a_features, phi(b))]).mean(0)
