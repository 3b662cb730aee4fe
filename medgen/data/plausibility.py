"""Is each file what its place in the site folder says it is? Checks that catch readable but wrong
data: a label map found as a scan, a brain mask beside (not on) the head, a mask whose header puts
it on another subject's grid, a "lesion" mask that covers most of the brain.

Each check returns a DataError naming the file (None when plausible); the caller decides whether it
is a problem (the scan is not used) or a warning.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
from scipy import ndimage

from medgen.data.errors import DataError
from medgen.data.nifti import Volume

# A scan whose non-zero neighbouring voxels are equal this often is piecewise constant: a label map.
# Measured: IXI T1 (8-bit quantised) 0.14-0.17, a uint8 T2 0.04, DWI/ADC/FLAIR < 0.04; the IXI
# parcellations 0.79, binary masks 0.99+.
LABEL_MAP_EQUAL_NEIGHBOURS = 0.5
LABEL_MAP_MAX_VALUES = 1000  # more distinct integer values than this: an image, whatever its texture
# Share of a brain mask that must lie at least BRAIN_DEPTH_MM inside the head (the image foreground,
# holes filled). Measured on IXI heads: their own masks 1.00; the same masks moved 30 mm up 0.75-0.78,
# 20 mm forward 0.93-0.95 (a mask moved down into the neck stays on the head: not caught).
MIN_BRAIN_ON_HEAD = 0.9
BRAIN_DEPTH_MM = 6.0
# A skull-stripped image has no scalp to lie under: its mask passes when it covers the foreground
# itself (Dice >= this; measured on 3 IXI heads stripped by their own masks: 0.99; the same masks
# moved 20 mm along any axis: 0.74-0.80).
STRIPPED_DICE = 0.9
# Largest share of the brain a lesion mask may cover. The largest real infarcts (malignant MCA
# stroke) take about a hemisphere, i.e. under half the brain; more is a brain mask or parcellation
# given as a lesion mask.
MAX_LESION_BRAIN_FRACTION = 0.5
# Grids of an image and its mask: with equal shape and voxel size but corners this far apart, or
# with different grids whose centres are this far apart, the mask may be another subject's.
SAME_GRID_SHIFT_MM = 1.0
OTHER_GRID_CENTRE_MM = 20.0


def label_map_problem(image: Volume) -> DataError | None:
    """A DataError when ``image`` (any (X, Y, Z) array) looks like a label map or mask rather than
    an MR image: integer values only, at most LABEL_MAP_MAX_VALUES of them, and over
    LABEL_MAP_EQUAL_NEIGHBOURS of the neighbouring non-zero voxel pairs (along each axis) equal."""
    data = image.data
    if not np.array_equal(data, np.round(data)):
        return None
    values = np.unique(data)
    if len(values) > LABEL_MAP_MAX_VALUES:
        return None
    equal = pairs = 0
    for axis in range(3):
        a = np.moveaxis(data, axis, 0)
        both = (a[1:] != 0) & (a[:-1] != 0)
        pairs += int(both.sum())
        equal += int((both & (a[1:] == a[:-1])).sum())
    share = equal / pairs if pairs else 1.0
    if share < LABEL_MAP_EQUAL_NEIGHBOURS:
        return None
    labels = int((values != 0).sum())
    return DataError(image.path, f"looks like a label map, not an image ({labels} label(s), {share:.0%} of neighbouring "
                                 "voxels equal): a mask or parcellation? Name it as a mask of its scan "
                                 "(data.lesion_mask_suffixes, data.brain_mask_suffix) or move it out of the site folder")


def brain_off_head_problem(image: Volume, brain: Volume) -> DataError | None:
    """A DataError naming the brain mask when under MIN_BRAIN_ON_HEAD of its voxels lie at least
    BRAIN_DEPTH_MM inside the head of ``image`` (its foreground: above half the Otsu threshold of
    the smoothed image, closed, holes filled; the brain lies under scalp and skull), compared in the
    image's grid (the mask is resampled there, nearest neighbour)."""
    mask = _in_grid(brain, image.data.shape, image.affine)
    n = int(mask.sum())
    if n == 0:
        return None  # an empty mask is reported by its own check
    from medgen.data.preprocess import _otsu

    smooth = ndimage.gaussian_filter(image.data, 1.0)
    head = smooth > 0.5 * _otsu(smooth)
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=2))
    inside = ndimage.distance_transform_edt(head, sampling=np.sqrt((image.affine[:3, :3] ** 2).sum(0))) >= BRAIN_DEPTH_MM
    share = float((mask & inside).sum()) / n
    if share >= MIN_BRAIN_ON_HEAD:
        return None
    on_head = int((mask & head).sum())
    if on_head >= MIN_BRAIN_ON_HEAD * n and 2 * on_head / (n + int(head.sum())) >= STRIPPED_DICE:
        return None  # a skull-stripped image: its foreground is the brain, and the mask is that foreground
    return DataError(brain.path, f"brain mask lies off the head of {image.path.name}: only {share:.0%} of its voxels "
                                 f"are {BRAIN_DEPTH_MM:g} mm or more inside the head (at least "
                                 f"{MIN_BRAIN_ON_HEAD:.0%} expected; shifted, or another subject's mask?)")


def _in_grid(mask: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """``mask`` (values {0, 1}) on the grid (shape, affine): bool ``shape[:3]``."""
    if mask.data.shape == tuple(shape[:3]) and np.allclose(mask.affine, affine, atol=1e-3):
        return mask.data > 0.5
    vox = np.linalg.solve(mask.affine, affine)  # target voxel -> mask voxel
    out = ndimage.affine_transform((mask.data > 0.5).astype(np.float32), vox[:3, :3], vox[:3, 3],
                                   output_shape=tuple(shape[:3]), order=0, mode="constant", cval=0.0)
    return out > 0.5


def grid_mismatch_warning(image_path, mask_path) -> DataError | None:
    """A DataError (a warning) naming the mask when its header puts it on another subject's grid:
    the same shape and voxel size as the image but placed more than SAME_GRID_SHIFT_MM apart (one
    export protocol, another head position), or a different grid whose centre is more than
    OTHER_GRID_CENTRE_MM from the image's. Headers only (nothing decompressed)."""
    (ishape, iaff), (mshape, maff) = (_grid(p) for p in (image_path, mask_path))
    same_size = ishape == mshape and np.allclose(np.linalg.norm(iaff[:3, :3], axis=0),
                                                np.linalg.norm(maff[:3, :3], axis=0), atol=1e-3)
    if same_size:
        shift = float(np.abs(_corners(ishape, iaff) - _corners(mshape, maff)).max())
        if shift <= SAME_GRID_SHIFT_MM:
            return None
        why = f"same grid size as {image_path.name} ({'x'.join(map(str, ishape))}) but placed {shift:.0f} mm apart"
    else:
        gap = float(np.linalg.norm(_corners(ishape, iaff).mean(0) - _corners(mshape, maff).mean(0)))
        if gap <= OTHER_GRID_CENTRE_MM:
            return None
        why = (f"its grid ({'x'.join(map(str, mshape))}) is centred {gap:.0f} mm from that of {image_path.name} "
               f"({'x'.join(map(str, ishape))})")
    return DataError(mask_path, f"mask may belong to another subject: {why}")


def _grid(path) -> tuple[tuple[int, ...], np.ndarray]:
    img = nib.load(path)
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def _corners(shape, affine) -> np.ndarray:
    """World positions (8, 3) of the corner voxel centres of a grid."""
    ijk = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])), dtype=np.float64)
    return nib.affines.apply_affine(affine, ijk)


def lesion_coverage_problem(lesion_path, lesion: np.ndarray, brain: np.ndarray) -> DataError | None:
    """A DataError naming the lesion mask when it covers more than MAX_LESION_BRAIN_FRACTION of the
    brain in the slices kept (``lesion``, ``brain``: bool arrays of one shape, e.g. (N, S, S))."""
    n = int(brain.sum())
    share = float((lesion & brain).sum()) / n if n else 0.0
    if share <= MAX_LESION_BRAIN_FRACTION:
        return None
    return DataError(lesion_path, f"lesion mask covers {share:.0%} of the brain (more than "
                                  f"{MAX_LESION_BRAIN_FRACTION:.0%}): a brain mask or parcellation given as a lesion mask?")
