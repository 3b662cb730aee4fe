"""Synthetic lesions implanted into real scans: the phantom's lesion model on real anatomy.

A benchmark of lesion detection needs lesions whose extent is known exactly. On the phantom they
are drawn in template space; here the same model (1-3 irregular blobs, 1-40 ml in total,
log-uniform; intensity moved a fraction 0.55-0.9 of the way to a target, exactly on the mask,
partial volume at the edge) is drawn directly in a real scan's own voxel grid, so the scan is
never resampled and every voxel outside the mask keeps its value.

Targets, from the scan's own brain intensities: hypointense lesions go towards the 2nd
percentile (CSF in a T1 image), hyperintense ones to 1.3 x the 99th percentile (brighter than
white matter). Blobs are centred on brain tissue (brain voxels brighter than the 30th brain
percentile, i.e. not in a ventricle) at least 4 mm inside the brain, and kept only where at
least half of the blob lies on tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from medgen.data.phantom import rotation

Kind = Literal["hypo", "hyper"]
TOTAL_ML = (1.0, 40.0)
STRENGTH = (0.55, 0.9)
MIN_DEPTH_MM = 4.0


@dataclass(frozen=True)
class Implanted:
    """image: (X, Y, Z) float32, the scan with lesions; mask: (X, Y, Z) bool lesion mask;
    info: what was drawn (kind, strength, volumes in ml, centres in voxels)."""

    image: np.ndarray
    mask: np.ndarray
    info: dict


def implant_lesions(image: np.ndarray, brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                    kind: Kind | Literal["mixed"] = "mixed") -> Implanted:
    """Implant 1-3 lesions into ``image`` (X, Y, Z) inside ``brain`` (bool, same grid); ``affine``
    (4, 4) voxel -> world mm gives the voxel geometry (any orientation, anisotropic voxels).

    Raises ValueError when the brain is too small to hold a lesion.
    """
    image = np.asarray(image, np.float32)
    brain = np.asarray(brain, bool)
    lin = np.asarray(affine, np.float64)[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))
    values = image[brain]
    if values.size < 1000:
        raise ValueError(f"brain mask holds {values.size} voxels; too small to implant a lesion")
    lo, p30, hi = np.percentile(values, (2, 30, 99))
    tissue = brain & (image > p30)
    centres = np.argwhere(tissue & (ndimage.distance_transform_edt(brain, sampling=spacing) >= MIN_DEPTH_MM))
    if len(centres) == 0:
        raise ValueError("no brain tissue deep enough to implant a lesion")

    kind = str(rng.choice(["hypo", "hyper"])) if kind == "mixed" else kind
    strength = float(rng.uniform(*STRENGTH))
    total_ml = float(np.exp(rng.uniform(*np.log(TOTAL_ML))))
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    lesion = np.zeros(image.shape, bool)
    placed = []
    for share in rng.dirichlet(np.full(n, 2.0)):
        vol_ml = max(total_ml * share, 0.6)
        for _ in range(50):
            c = centres[rng.integers(len(centres))]
            box, blob = _blob(rng, vol_ml, c, lin, image.shape)
            part = blob & tissue[box]
            if part.sum() >= 0.5 * max(blob.sum(), 1):
                lesion[box] |= part
                placed.append({"centre_voxel": c.tolist(), "volume_ml": round(float(part.sum()) * _voxel_ml(lin), 3)})
                break
    if not placed:
        raise ValueError("could not place a lesion on brain tissue")

    frac = ndimage.gaussian_filter(lesion.astype(np.float32), 0.5, truncate=3.0)
    mask = (frac >= 0.5) & brain
    target = lo if kind == "hypo" else 1.3 * hi
    out = image + np.where(mask, frac * strength, 0.0).astype(np.float32) * (np.float32(target) - image)
    info = {"kind": kind, "strength": round(strength, 3), "n_lesions": len(placed),
            "volume_ml": round(float(mask.sum()) * _voxel_ml(lin), 3), "target_intensity": round(float(target), 3),
            "lesions": placed}
    return Implanted(out.astype(np.float32), mask, info)


def _voxel_ml(lin: np.ndarray) -> float:
    return abs(float(np.linalg.det(lin))) / 1000


def _blob(rng: np.random.Generator, vol_ml: float, centre: np.ndarray, lin: np.ndarray, shape):
    """An irregular blob of about ``vol_ml`` ml around voxel ``centre``: (box slices into the
    volume, bool array of the box's shape). Its surface is an ellipsoid (random axes and
    orientation, in world mm) roughened by a smoothed random field, as on the phantom."""
    r_eq = (3 * vol_ml * 1000 / (4 * math.pi)) ** (1 / 3)
    axes = np.exp(rng.normal(0.0, 0.25, 3))
    axes = r_eq * axes / np.prod(axes) ** (1 / 3)
    spacing = np.sqrt((lin**2).sum(axis=0))
    half = np.ceil(axes.max() * 1.4 / spacing).astype(int) + 2
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)], indexing="ij"))
    mm = np.einsum("ij,j...->i...", lin, grid.astype(np.float64))  # offset from the centre in world mm
    local = np.einsum("ij,j...->i...", rotation(rng.uniform(-180, 180, 3)).T, mm)
    rho = np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(3)))
    noise = rng.standard_normal(rho.shape)
    noise = ndimage.gaussian_filter(noise, max(1.5, 0.3 * r_eq) / spacing)
    noise /= max(float(noise.std()), 1e-6)
    return box, rho + 0.25 * noise < 1.0

