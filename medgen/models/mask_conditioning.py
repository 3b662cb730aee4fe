"""The lesion-mask condition of a mask-conditioned family (``model.mask_conditioning``; the DDPM).

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
                         f"from masks; retrain with model.mask_conditioning=true (model.family=ddpm)")


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
