"""The lesion-mask condition of a mask-conditioned family (``model.mask_conditioning``; the DDPM and the GAN).

A condition is (B, 2, H, W) float32 on the network's grid (the image's S x S in pixel space, the
latents' S/4 x S/4 in latent space):

- channel 0: the lesion mask, area-downsampled to the grid (the share of each cell that is lesion,
  in [0, 1]); 0 where the mask is unknown;
- channel 1: 1 where the mask is known, 0 where it is not ("no mask", the mask's counterpart of
  classifier-free guidance's "no label").

Known: a healthy slice (its mask is empty by definition: stray lesion pixels below
``data.min_lesion_pixels`` are cleared) and a lesion slice with lesion pixels. Unknown: a lesion
slice with an empty mask (a scan labelled lesion without a mask file), a batch given without masks
(``masks=None``), and masks dropped in training (with the label, or on their own with probability
``model.cond_drop``) so the same network also samples from the label alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_CHANNELS = 2
HEALTHY = 0


class MaskConditioningError(ValueError):
    """A mask-conditioned request to a model trained without mask conditioning."""

    def __init__(self, family: str):
        super().__init__(f"this {family} model was trained without mask conditioning: it cannot place lesions "
                         f"from masks; retrain with model.mask_conditioning=true (model.family=ddpm or gan)")


def downsample(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Masks (B, 1, S, S) (bool or float in [0, 1]) -> (B, 1, side, side) float32, each cell the mean
    of its (S/side)^2 pixels (area averaging: a lesion smaller than a cell still shows, as a fraction).
    S must be a multiple of ``side``."""
    masks = masks.float()
    s = masks.shape[-1]
    if s % side or masks.shape[-2] != s:
        raise ValueError(f"masks of {tuple(masks.shape[-2:])} pixels cannot be area-averaged to {side} x {side}")
    return F.avg_pool2d(masks, s // side) if s != side else masks


def known_masks(labels: torch.Tensor, masks: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (B, 1, S, S) float32 with healthy slices' masks cleared, known (B,) bool). Without
    ``masks`` every mask is unknown (masks returned as None)."""
    if masks is None:
        return None, torch.zeros(n, dtype=torch.bool, device=device)
    masks = masks.to(device).float()
    healthy = labels == HEALTHY
    masks = masks * (~healthy).view(-1, 1, 1, 1).float()
    return masks, healthy | (masks.flatten(1).amax(1) > 0)


def condition(masks: torch.Tensor | None, known: torch.Tensor, side: int) -> torch.Tensor:
    """The (B, 2, side, side) float32 condition (module docstring) of masks (B, 1, S, S) or None
    (all unknown) and ``known`` (B,) bool."""
    n = len(known)
    k = known.float().view(n, 1, 1, 1).expand(n, 1, side, side)
    if masks is None:
        return torch.cat([torch.zeros_like(k), k], 1)
    return torch.cat([downsample(masks, side) * k, k], 1)


def dropped(known: torch.Tensor, labels_dropped: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Training's mask dropout: ``known`` (B,) with the masks of dropped labels, and of another share
    ``p`` of the batch, made unknown."""
    alone = torch.rand(len(known), generator=generator).to(known.device) < p
    return known & ~labels_dropped & ~alone


# data-independent lesion blobs (synthetic_masks): equivalent radius as a share of the image side,
# drawn log-uniformly (64 px: 2.6 to 9 px, about 20 to 250 pixels, the phantom's lesion slices' range)
BLOB_RADIUS = (0.04, 0.14)
BLOB_MARGIN = 2  # px: blob centres lie at least this far inside the brain


def _eroded(brain: torch.Tensor, px: int) -> torch.Tensor:
    """(B, 1, S, S) bool brain eroded by ``px`` pixels (square structuring element)."""
    if px <= 0:
        return brain
    return -F.max_pool2d(-brain.float(), 2 * px + 1, stride=1, padding=px) > 0.5


def synthetic_masks(brain: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One data-independent lesion blob per slice inside ``brain`` (B, 1, S, S) bool: (B, 1, S, S) bool.

    Every random number is drawn on CPU from ``generator`` (the global RNG when None); nothing depends
    on any data but ``brain``. Each blob: its centre a uniformly drawn pixel of the brain eroded by
    BLOB_MARGIN px (of the whole brain when that is empty, of the whole slice when there is no brain);
    an ellipse of equivalent radius log-uniform in BLOB_RADIUS x S, axis ratio in [0.5, 1], any angle,
    its outline perturbed by random harmonics 2..4 (irregular, stroke-like shapes); cut to the brain
    (where there is one) and never empty (at least its centre pixel)."""
    b, _, h, w = brain.shape
    inner = _eroded(brain, BLOB_MARGIN)
    weights = torch.where(inner.flatten(1).any(1, keepdim=True), inner.flatten(1), brain.flatten(1)).float().cpu()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    centre = torch.multinomial(weights, 1, generator=generator).view(b)
    cy, cx = (centre // w).float(), (centre % w).float()
    lo, hi = BLOB_RADIUS
    radius = min(h, w) * torch.exp(torch.empty(b).uniform_(float(torch.tensor(lo).log()), float(torch.tensor(hi).log()),
                                                           generator=generator))
    ratio = 0.5 + 0.5 * torch.rand(b, generator=generator)
    angle = torch.pi * torch.rand(b, generator=generator)
    harmonics = 0.15 * (2 * torch.rand(b, 3, 2, generator=generator) - 1)  # (cos, sin) amplitudes of k = 2, 3, 4
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dy, dx = yy - cy.view(b, 1, 1), xx - cx.view(b, 1, 1)
    c, s = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
    u, v = c * dx + s * dy, -s * dx + c * dy
    a, bb = (radius / ratio.sqrt()).view(b, 1, 1), (radius * ratio.sqrt()).view(b, 1, 1)
    phi = torch.atan2(v / bb, u / a)
    wobble = 1 + sum(harmonics[:, i, 0].view(b, 1, 1) * torch.cos((i + 2) * phi)
                     + harmonics[:, i, 1].view(b, 1, 1) * torch.sin((i + 2) * phi) for i in range(3))
    blob = ((u / a) ** 2 + (v / bb) ** 2).sqrt() <= wobble
    blob = blob.unsqueeze(1).to(brain.device)
    has_brain = brain.flatten(1).any(1).view(b, 1, 1, 1)
    blob = torch.where(has_brain, blob & brain, blob)
    seed_pixel = torch.zeros(b, h * w, dtype=torch.bool)
    seed_pixel[torch.arange(b), centre] = True
    return blob | seed_pixel.view(b, 1, h, w).to(brain.device)
