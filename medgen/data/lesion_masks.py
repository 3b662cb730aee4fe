"""Lesion masks for mask-conditioned synthesis (`medgen synthesize`): read from NIfTI files, or drawn
from a site's own masks, deformed and placed inside a brain.

Every mask here is an axial slice (S, S) bool in the display orientation of the training slices
(``preprocess.py``: row 0 anterior, column 0 the patient's left), S = ``data.image_size``.

Files (:func:`read_mask_files`): each ``*.nii`` / ``*.nii.gz`` of a folder is a lesion mask, read by
:func:`~medgen.data.nifti.load_lesion_mask` (binary, probabilities >= 0.5, or ``data.lesion_labels``).
A file with one axial slice of S x S voxels (what `medgen synthesize` writes) is taken as it is,
after reorientation to RAS+. Any other volume is resampled into the RAS+ grid at
``data.spacing_mm`` (the preprocessing's own geometry) and each axial slice with at least
``data.min_lesion_pixels`` lesion pixels at S x S becomes a mask, framed by the square around the
mask's field of view (the brain's extent, which frames training slices, is unknown for a mask
alone: use ``--from-site`` for masks placed on a real brain).

Targeted masks (:func:`targeted_masks`): a real lesion mask of the site, drawn at random, deformed
(a random elastic displacement field, then a random morphological dilation or erosion by up to a
quarter of its radius, a random rotation and flip) and moved to a random place inside a real brain
mask of the site, so the whole lesion lies inside the (eroded) brain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medgen.config import ConfigError, DataConfig
from medgen.data.nifti import load_lesion_mask
from medgen.data.preprocess import extract_slices, resample_mask, square_window, target_grid

NOMINAL_FOV_MM = 192.0  # in-plane field of view written into synthesised slices' affines (S px over it)


@dataclass
class MaskSet:
    """Masks (N, S, S) bool and where each came from (``sources``, e.g. "file.nii.gz[z=12]")."""

    masks: np.ndarray
    sources: list[str]
    site: object | None = None  # the SiteSlices the masks were drawn from (--from-site), else None


def nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))


def read_mask_files(folder: str | Path, cfg: DataConfig, argument: str = "--masks") -> MaskSet:
    """Every lesion mask slice of the NIfTI files in ``folder`` (module docstring). ConfigError naming
    ``argument`` for a missing folder or one without a usable mask; DataError naming a bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{argument} {folder}: no such folder")
    files = nifti_files(folder)
    if not files:
        raise ConfigError(f"{argument} {folder}: no NIfTI lesion mask (*.nii, *.nii.gz) in the folder")
    masks, sources = [], []
    for path in files:
        for z, mask in file_slices(path, cfg):
            masks.append(mask)
            sources.append(f"{path.name}[z={z}]")
    if not masks:
        raise ConfigError(f"{argument} {folder}: none of its {len(files)} NIfTI files has an axial slice with "
                          f"at least data.min_lesion_pixels={cfg.min_lesion_pixels} lesion pixels at "
                          f"{cfg.image_size} x {cfg.image_size}")
    return MaskSet(np.stack(masks), sources)


def file_slices(path: Path, cfg: DataConfig) -> list[tuple[int, np.ndarray]]:
    """(axial index, (S, S) bool mask) of each slice of one mask file with enough lesion pixels."""
    vol = load_lesion_mask(path, cfg.volume_index, cfg.lesion_labels, cfg.max_voxels)
    size = cfg.image_size
    ornt = nib.orientations.io_orientation(vol.affine)
    ras = nib.orientations.apply_orientation(vol.data, ornt) > 0.5
    if ras.shape[:2] == (size, size) and ras.shape[2] == 1:  # already a slice on the model's grid
        slices, index = [to_display(ras[:, :, 0])], [0]
    else:
        grid = target_grid(vol.data.shape, vol.affine, cfg.spacing_mm)
        mask = resample_mask(vol, grid)
        window = square_window(np.ones(grid.shape, bool), grid.spacing)
        index = np.flatnonzero(mask.any(axis=(0, 1)))
        slices = [s >= 0.5 for s in extract_slices([mask], index, window, size)[0]] if len(index) else []
    return [(int(z), s) for z, s in zip(index, slices) if s.sum() >= cfg.min_lesion_pixels]


def to_display(a: np.ndarray) -> np.ndarray:
    """A RAS+ axial slice a[x, y] in display orientation (row 0 anterior, column 0 patient left)."""
    return np.flipud(a.T)


def from_display(d: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`: a display slice -> a[x, y] of a RAS+ axial slice."""
    return np.flipud(d).T


def slice_affine(size: int) -> np.ndarray:
    """RAS+ affine of an (S, S, 1) slice written by `medgen synthesize`: square pixels of
    NOMINAL_FOV_MM / S (the training window's real extent differs per subject), centred at 0."""
    step = NOMINAL_FOV_MM / size
    affine = np.diag([step, step, step, 1.0])
    affine[:2, 3] = -(size - 1) * step / 2
    return affine


def write_slice(path: Path, slice_: np.ndarray, descrip: str) -> None:
    """Write a display-orientation slice (S, S) as an (S, S, 1) NIfTI: float32 images, uint8 masks."""
    dtype = np.uint8 if slice_.dtype == bool else np.float32
    img = nib.Nifti1Image(from_display(slice_).astype(dtype)[:, :, None], slice_affine(slice_.shape[0]))
    img.header["descrip"] = descrip[:79].encode()
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, path)


# ------------------------------------------------------------------------------------- targeted


def elastic(mask: np.ndarray, rng: np.random.Generator, alpha: float = 3.0, sigma: float = 3.0) -> np.ndarray:
    """An elastic deformation of an (S, S) bool mask (Simard et al. 2003): a random displacement field,
    Gaussian-smoothed (``sigma`` px) and scaled to about ``alpha`` px, applied with linear
    interpolation (>= 0.5)."""
    shape = mask.shape
    dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma) for _ in range(2))
    scale = alpha / max(np.abs(dx).max(), np.abs(dy).max(), 1e-6)
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.stack([yy + scale * dy, xx + scale * dx])
    return ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant") >= 0.5


def morphological(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dilate or erode an (S, S) bool mask by up to a quarter of its equivalent radius (at least 1 px;
    cross structuring element). An erosion that would keep less than 40 % of the mask is skipped."""
    top = max(1, round(0.25 * np.sqrt(mask.sum() / np.pi)))
    radius = int(rng.integers(-top, top + 1))
    if radius == 0:
        return mask
    op = ndimage.binary_dilation if radius > 0 else ndimage.binary_erosion
    out = op(mask, iterations=abs(radius))
    return out if out.sum() >= 0.4 * mask.sum() else mask


def rotated(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation (any angle, about the mask's centre of mass) and left-right flip."""
    centre = np.array(ndimage.center_of_mass(mask))
    angle = np.deg2rad(rng.uniform(0, 360))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    out = ndimage.affine_transform(mask.astype(np.float32), rot, centre - rot @ centre, order=1) >= 0.5
    return out[:, ::-1] if rng.random() < 0.5 else out


def place_inside(mask: np.ndarray, brain: np.ndarray, rng: np.random.Generator, margin: int = 2,
                 tries: int = 50) -> np.ndarray | None:
    """Move an (S, S) bool lesion (shifted by whole pixels) so that it lies inside ``brain`` eroded by
    ``margin`` px, its centre at a random brain pixel; None when no try fits."""
    inner = ndimage.binary_erosion(brain, iterations=margin) if margin else brain
    ys, xs = np.nonzero(mask)
    if not len(ys) or not inner.any():
        return None
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    cand_y, cand_x = np.nonzero(inner)
    size = mask.shape[0]
    for _ in range(tries):
        k = rng.integers(len(cand_y))
        ty, tx = ys + cand_y[k] - cy, xs + cand_x[k] - cx
        if ty.min() < 0 or tx.min() < 0 or ty.max() >= size or tx.max() >= size:
            continue
        if inner[ty, tx].all():
            out = np.zeros_like(mask)
            out[ty, tx] = True
            return out
    return None


def deform(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real lesion made a new one: elastic, then morphological, then rotated/flipped; never empty."""
    out = rotated(morphological(elastic(mask, rng), rng), rng)
    return out if out.any() else mask


def targeted_masks(lesion: np.ndarray, brain: np.ndarray, n: int, seed: int, min_pixels: int,
                   site: str = "site") -> MaskSet:
    """``n`` masks (n, S, S) bool from a site's lesion masks ``lesion`` (N, S, S) and brain masks
    ``brain`` (N, S, S): each a random real lesion (of a slice with >= ``min_pixels`` lesion pixels)
    deformed (:func:`deform`) and placed inside a random brain slice of the site (:func:`place_inside`).
    ConfigError when the site has no such lesion slice."""
    sizes = lesion.reshape(len(lesion), -1).sum(1)
    donors = np.flatnonzero(sizes >= min_pixels)
    if not len(donors):
        raise ConfigError(f"--from-site {site}: no slice with a lesion mask of at least "
                          f"data.min_lesion_pixels={min_pixels} pixels to draw lesions from")
    brains = np.flatnonzero(brain.reshape(len(brain), -1).sum(1) > brain[0].size // 8)  # slices with real brain
    rng = np.random.default_rng(seed)
    masks, sources = [], []
    while len(masks) < n:
        donor = int(rng.choice(donors))
        for _ in range(20):
            host = int(rng.choice(brains)) if len(brains) else donor
            new = deform(lesion[donor], rng)
            placed = place_inside(new, brain[host], rng)
            if placed is not None and placed.sum() >= min_pixels:
                masks.append(placed)
                sources.append(f"{site}: lesion of slice {donor} deformed, placed in the brain of slice {host}")
                break
        else:  # a lesion too large for every brain tried: itself, where it was
            masks.append(lesion[donor].copy())
            sources.append(f"{site}: lesion of slice {donor} as it is (no deformed copy fitted a brain)")
    return MaskSet(np.stack(masks), sources)


def read_site_masks(folder: str | Path, cfg: DataConfig, n: int, seed: int) -> MaskSet:
    """Targeted masks drawn from the site folder's own lesion masks (preprocessed like training slices)."""
    from medgen.data.dataset import load_site

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--from-site {folder}: no such folder")
    slices = load_site(folder, cfg)  # SiteDataError naming the bad files
    drawn = targeted_masks(slices.lesion, slices.brain, n, seed, cfg.min_lesion_pixels, str(folder))
    return MaskSet(drawn.masks, drawn.sources, slices)
