"""Preprocessing of one subject: geometry, brain mask, intensity normalisation, axial slices.

The path of one subject (:func:`preprocess_subject`):

1. :func:`target_grid` - an axis-aligned RAS+ grid at ``cfg.spacing_mm`` covering the image.
2. :func:`resample_image` / :func:`resample_mask` - image and masks into that grid through their own
   affines (exact reorientation first, so non-oblique data needs only a diagonal map).
3. :func:`brain_mask_estimate` - when no brain mask is given: deepbet or :func:`estimate_brain_mask`
   (``data.brain_mask``); then N4 bias-field correction inside the brain mask, supplied or
   estimated (``data.bias_correction``, :mod:`medgen.data.bias`).
4. :func:`normalise` - brain percentiles ``cfg.percentiles`` -> [0, 1], 0 outside the brain.
5. :func:`select_slices`, :func:`square_window`, :func:`extract_slices` - axial slices with enough
   brain, one square field of view per subject, resized to ``cfg.image_size``.

Display convention of the slices (neurological): image left = patient left, anterior at the top.
For a RAS+ axial slice ``a[x, y]`` this is ``np.flipud(a.T)``: row 0 is the most anterior row,
column 0 the patient's leftmost column.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from medgen.config import DataConfig
from medgen.data import brain_mask
from medgen.data.bias import n4_correct
from medgen.data.errors import DataError
from medgen.data.nifti import Volume, check_affine

SQUARE_MARGIN = 0.08  # the square field of view is this much wider than the brain
SLAB = 32  # axial slices per slab where a whole-volume temporary would cost several volumes
EDT_SLAB_VOXELS = 2**21  # voxels per slab of _farther_than (scipy's transform: ~48 bytes each, ~100 MB)


@dataclass
class SubjectSlices:
    """Axial slices of one subject, N slices of S x S pixels (S = ``cfg.image_size``).

    images: (N, S, S) float32 in [0, 1], 0 outside the brain.
    brain: (N, S, S) bool brain mask.
    lesion: (N, S, S) bool lesion mask (all False when the subject has no lesion mask).
    slice_index: (N,) int, axial index of each slice in the resampled canonical volume.
    """

    images: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    slice_index: np.ndarray


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (3 ints) and ``affine`` (4, 4) voxel -> world RAS+ mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def preprocess_subject(
    image: Volume, cfg: DataConfig, lesion: Volume | None = None, brain: Volume | None = None
) -> SubjectSlices:
    """Turn one subject's volumes into normalised, brain-masked axial slices (see module docstring).

    ``lesion`` and ``brain`` may lie in other grids than ``image``: they are resampled from their own
    affines. Raises DataError naming the file for masks that do not overlap the image, an empty
    brain mask, and an image that is constant inside the brain.
    """
    grid = target_grid(image.data.shape, check_affine(image.affine, image.path), cfg.spacing_mm)
    n_voxels = int(np.prod(grid.shape, dtype=np.int64))
    if n_voxels > cfg.max_voxels:  # e.g. 512^3 voxels of 20 mm: a 10 m field of view
        fov = " x ".join(f"{n * s:.0f}" for n, s in zip(grid.shape, grid.spacing))
        shape = "x".join(map(str, grid.shape))
        raise DataError(image.path, f"its field of view ({fov} mm) at data.spacing_mm is {shape} = {n_voxels:.3g} "
                                    f"voxels, more than data.max_voxels={cfg.max_voxels}; refused before resampling")
    data = resample_image(image, grid)
    if brain is not None:
        mask = resample_mask(brain, grid)
        if not mask.any():
            raise DataError(brain.path, f"brain mask is empty inside the field of view of {image.path.name}")
    else:
        mask = brain_mask_estimate(data, grid, cfg.brain_mask, image)
    if cfg.bias_correction == "n4":
        try:
            data = n4_correct(data, mask, grid.spacing)
        except ValueError as e:
            raise DataError(image.path, str(e)) from None
    try:
        data = normalise(data, mask, cfg.percentiles)
    except ValueError as e:
        raise DataError(image.path, str(e)) from None
    les = resample_mask(lesion, grid) if lesion is not None else np.zeros(grid.shape, bool)

    keep = select_slices(mask, cfg.min_brain_fraction)
    window = square_window(mask, grid.spacing)
    images, brain_s, lesion_s = extract_slices([data, mask, les], keep, window, cfg.image_size)
    brain_s = brain_s >= 0.5
    images = np.where(brain_s, np.clip(images, 0.0, 1.0), 0.0).astype(np.float32)
    return SubjectSlices(images=images, brain=brain_s, lesion=lesion_s >= 0.5, slice_index=keep)


# ---------------------------------------------------------------------------------- geometry


def target_grid(shape: tuple[int, ...], affine: np.ndarray, spacing_mm) -> Grid:
    """Axis-aligned RAS+ grid with spacing ``spacing_mm`` (3 floats, mm) covering the field of view.

    The field of view is the world bounding box of the corner voxel centres of an image of ``shape``
    (first 3 used) under ``affine``; the new grid is centred on it. Any orientation or obliquity.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    lo, hi = _world_box(shape, affine, half_voxel=False)
    n = np.ceil((hi - lo) / spacing - 1e-3).astype(int) + 1
    out = np.diag([*spacing, 1.0])
    out[:3, 3] = (lo + hi) / 2 - (n - 1) * spacing / 2
    return Grid(shape=tuple(int(k) for k in n), affine=out)


def resample(
    data: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1, antialias: bool = False
) -> np.ndarray:
    """Resample a 3-D array with voxel->world ``affine`` into ``grid``; 0 outside the source.

    The array is first reoriented exactly (flips / axis swaps) to the grid's axes, so for
    non-oblique data the remaining voxel map is diagonal (scipy's fast path). ``antialias`` blurs
    the source along axes that are downsampled (Gaussian, sigma = 0.4 * sqrt(factor^2 - 1) voxels,
    i.e. the target voxel size as FWHM). Returns ``grid.shape`` in ``data``'s float dtype.
    """
    ornt = nib.orientations.io_orientation(affine)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    data = nib.orientations.apply_orientation(data, ornt)
    vox = np.linalg.solve(affine, grid.affine)  # target voxel -> source voxel
    lin, offset = vox[:3, :3], vox[:3, 3]
    if antialias:
        factor = np.linalg.norm(lin, axis=1)  # source voxels per target voxel, per source axis
        sigma = 0.4 * np.sqrt(np.clip(factor**2 - 1.0, 0.0, None))
        if sigma.max() > 0.1:
            data = ndimage.gaussian_filter(data, np.where(sigma > 0.1, sigma, 0.0), truncate=3.0)
    off_diagonal = np.abs(lin - np.diag(np.diag(lin))).max()
    matrix = np.diag(lin) if off_diagonal <= 1e-6 * np.abs(lin).max() else lin
    return ndimage.affine_transform(
        data, matrix, offset, output_shape=grid.shape, order=order, mode="constant", cval=0.0, prefilter=False
    )


def resample_image(image: Volume, grid: Grid) -> np.ndarray:
    """``image`` in ``grid``: (grid.shape) float32, linear interpolation, anti-aliased, 0 outside."""
    affine = check_affine(image.affine, image.path)
    return resample(image.data.astype(np.float32, copy=False), affine, grid, order=1, antialias=True)


def resample_mask(mask: Volume, grid: Grid) -> np.ndarray:
    """A mask (values in {0, 1}) in ``grid`` from its own affine: (grid.shape) bool, linear then >= 0.5.

    Raises DataError naming the mask file when its affine is invalid or its world bounding box
    does not overlap the grid's.
    """
    affine = check_affine(mask.affine, mask.path)
    mlo, mhi = _world_box(mask.data.shape, affine, half_voxel=True)
    glo, ghi = _world_box(grid.shape, grid.affine, half_voxel=True)
    if np.any(mlo >= ghi) or np.any(glo >= mhi):
        raise DataError(
            mask.path,
            f"mask grid does not overlap the image (mask spans {_box(mlo, mhi)} mm, image {_box(glo, ghi)} mm); "
            "cannot be resampled",
        )
    data = (np.asarray(mask.data) > 0.5).astype(np.float32)
    return resample(data, affine, grid, order=1) >= 0.5


def _world_box(shape, affine, half_voxel: bool) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (lo, hi) of the voxel centres, or of the voxels themselves (``half_voxel``)."""
    e = 0.5 if half_voxel else 0.0
    corners = np.array(list(itertools.product(*[(-e, n - 1 + e) for n in shape[:3]])), dtype=np.float64)
    world = nib.affines.apply_affine(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def _box(lo, hi) -> str:
    return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(lo, hi))


# -------------------------------------------------------------------------------- brain mask


def brain_mask_estimate(data: np.ndarray, grid: Grid, setting: str, image: Volume) -> np.ndarray:
    """Brain mask of ``data`` (resampled into the RAS+ ``grid``) by the method ``data.brain_mask`` =
    ``setting`` resolves to (:mod:`medgen.data.brain_mask`): bool (grid.shape). DataError naming
    ``image``'s file when no brain is found."""
    method, _ = brain_mask.resolve(setting)
    try:
        mask = brain_mask.model_mask(data) if method == brain_mask.MODEL else estimate_brain_mask(data, grid.spacing)
    except ValueError as e:
        raise DataError(image.path, f"no brain found ({method} brain mask: {e})") from None
    if not mask.any():
        raise DataError(image.path, f"no brain found (the {method} brain mask is empty)")
    return mask


def estimate_brain_mask(data: np.ndarray, spacing_mm, erode_mm: float = 4.0, close_mm: float = 4.0) -> np.ndarray:
    """Estimate the brain in a (X, Y, Z) image with voxel size ``spacing_mm`` (3 floats): bool (X, Y, Z).

    No trained model: smooth, Otsu threshold, largest component; erode by ``erode_mm`` to detach
    skull/scalp, largest component, dilate back inside the threshold mask; close by ``close_mm``
    (sulci), fill holes in 3-D and per axial slice. Skull-stripped images give a tight mask.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    smooth = ndimage.gaussian_filter(data.astype(np.float32, copy=False), 1.5 / spacing, truncate=3.0)
    fg = smooth > _otsu(smooth)
    del smooth  # before labelling: the int32 labels are another volume
    fg = _largest_component(fg)
    if not fg.any():
        return fg
    # Work in the bounding box of the head (plus room for the closing) to keep it cheap.
    pad = int(np.ceil(max(erode_mm, close_mm) / spacing.min())) + 2
    box = tuple(slice(max(i.start - pad, 0), i.stop + pad) for i in ndimage.find_objects(fg.astype(np.uint8))[0])
    head = fg[box]
    core = _largest_component(_farther_than(head, spacing, erode_mm))
    if core.any():
        near_core = ~_farther_than(~core, spacing, erode_mm + 1e-3)
        head = _largest_component(head & near_core)
    dilated = ndimage.binary_fill_holes(~_farther_than(~head, spacing, close_mm + 1e-3))
    closed = _farther_than(dilated, spacing, close_mm + 1e-3)
    head = ndimage.binary_fill_holes(head | closed)
    for z in range(head.shape[2]):
        head[:, :, z] = ndimage.binary_fill_holes(head[:, :, z])
    out = np.zeros(data.shape, bool)
    out[box] = _largest_component(head)
    return out


def _farther_than(mask: np.ndarray, spacing: np.ndarray, radius: float) -> np.ndarray:
    """``distance_transform_edt(mask, sampling=spacing) > radius`` (bool, the shape of ``mask``),
    computed in axial slabs of about EDT_SLAB_VOXELS voxels: scipy's transform holds about 48 bytes
    a voxel at once (int32 feature indices, their offsets, float64 distances), 12 float32 volumes
    of the mask's size. A voxel is within ``radius`` of a background (False) voxel only if that
    voxel lies within ``radius / spacing[2]`` slices of it, so each slab carries that many slices
    of margin on either side and gives the same answer as the whole volume."""
    nz = mask.shape[2]
    margin = int(np.ceil(radius / spacing[2])) + 1
    step = max(1, EDT_SLAB_VOXELS // max(1, mask.shape[0] * mask.shape[1]) - 2 * margin)
    out = np.empty(mask.shape, bool)
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        a, b = max(z0 - margin, 0), min(z1 + margin, nz)
        part = mask[:, :, a:b]
        if part.all():  # no background within reach (scipy's transform is undefined without any)
            out[:, :, z0:z1] = True
            continue
        out[:, :, z0:z1] = ndimage.distance_transform_edt(part, sampling=spacing)[:, :, z0 - a:z1 - a] > radius
    return out


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (histogram between the 0.1 and 99.9 percentiles)."""
    lo, hi = np.percentile(values, (0.1, 99.9))
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    return float(edges[1:][np.nanargmax(between[:-1])])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


# ----------------------------------------------------------------------------- normalisation


def normalise(data: np.ndarray, brain: np.ndarray, percentiles=(1.0, 99.0)) -> np.ndarray:
    """Robust intensity normalisation: (X, Y, Z) float32 in [0, 1], 0 outside ``brain``.

    The ``percentiles`` (low, high) of the brain voxels map to 0 and 1; values beyond are clipped.
    Raises ValueError when the brain is empty or its intensities are constant.
    """
    values = data[brain]
    if values.size == 0:
        raise ValueError("brain mask is empty")
    lo, hi = np.percentile(values, percentiles, overwrite_input=True)  # values is our own copy
    del values
    if hi <= lo:
        raise ValueError(f"intensities inside the brain mask are constant ({lo:g} at percentiles {percentiles})")
    out = np.empty(data.shape, np.float32)
    for z in range(0, data.shape[-1], SLAB):  # in slabs: the float64 temporaries stay small
        s = np.s_[..., z:z + SLAB]
        out[s] = np.where(brain[s], np.clip((data[s] - lo) / (hi - lo), 0.0, 1.0), 0.0)
    return out


# ------------------------------------------------------------------------------------ slices


def select_slices(brain: np.ndarray, min_fraction: float) -> np.ndarray:
    """Axial (third-axis) indices of (X, Y, Z) ``brain`` whose brain area >= ``min_fraction`` x the largest."""
    area = brain.sum(axis=(0, 1))
    return np.flatnonzero((area > 0) & (area >= min_fraction * area.max()))


def square_window(brain: np.ndarray, spacing_mm, margin: float = SQUARE_MARGIN) -> tuple[tuple[float, float], ...]:
    """One square (in mm) in-plane field of view around the brain of all slices.

    Returns ((x0, width_x), (y0, width_y)) in voxel units: the window starts at the left edge ``x0``
    (voxel i spans [i - 0.5, i + 0.5]) and is ``width`` voxels wide; it may extend past the volume.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)[:2]
    xs, ys = (np.flatnonzero(brain.any(axis=axes)) for axes in ((1, 2), (0, 2)))
    lo = np.array([xs[0], ys[0]]) - 0.5
    hi = np.array([xs[-1], ys[-1]]) + 0.5
    side_mm = ((hi - lo) * spacing).max() * (1 + margin)
    width = side_mm / spacing
    start = (lo + hi) / 2 - width / 2
    return tuple((float(s), float(w)) for s, w in zip(start, width))


def extract_slices(volumes: list[np.ndarray], index: np.ndarray, window, size: int) -> list[np.ndarray]:
    """Axial slices ``index`` of each (X, Y, Z) volume, cropped to ``window`` and resized to (size, size).

    Area averaging when shrinking (anti-aliased), linear interpolation when enlarging; 0 outside the
    volume. Masks may come as bool (only the chosen slices are converted to float32). Output per
    volume: (N, size, size) float32 in display orientation (module docstring).
    """
    (x0, wx), (y0, wy) = window
    mx = _resize_matrix(x0, wx, volumes[0].shape[0], size)
    my = _resize_matrix(y0, wy, volumes[0].shape[1], size)
    out = []
    for vol in volumes:
        resized = np.empty((len(index), size, size), np.float32)
        for n in range(0, len(index), SLAB):  # SLAB slices at a time: no copy of the whole volume
            stack = np.moveaxis(vol[:, :, index[n:n + SLAB]], 2, 0).astype(np.float32, copy=False)  # (N, X, Y)
            resized[n:n + SLAB] = np.einsum("iX,nXY,jY->nji", mx, stack, my, optimize=True)  # (N, y, x)
        out.append(np.ascontiguousarray(resized[:, ::-1, :]))
    return out


def _resize_matrix(start: float, width: float, n: int, size: int) -> np.ndarray:
    """(size, n) weights taking n samples (voxel i at i) to ``size`` pixels over [start, start + width]."""
    step = width / size
    j = np.arange(n)[None, :]
    if step > 1:  # area: overlap of pixel [a, a + step] with voxel [j - 0.5, j + 0.5]
        a = start + step * np.arange(size)[:, None]
        overlap = np.minimum(a + step, j + 0.5) - np.maximum(a, j - 0.5)
        weights = np.clip(overlap, 0.0, None) / step
    else:  # linear interpolation at pixel centres
        centre = start + step * (np.arange(size)[:, None] + 0.5)
        weights = np.clip(1.0 - np.abs(centre - j), 0.0, None)
    return weights.astype(np.float32)
