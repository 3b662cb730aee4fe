"""Reading and validating NIfTI files (.nii, .nii.gz).

Every problem with a file is raised as :class:`~medgen.data.errors.DataError` naming the file and
saying what is wrong, so a site engineer can fix or remove that one file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medgen.data.errors import DataError

# What nibabel, gzip and the OS raise for unreadable, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError)


@dataclass
class Volume:
    """One 3-D image as stored on disk.

    data: (X, Y, Z) float32, in the file's own voxel order (not reoriented).
    affine: (4, 4) float64, voxel index -> world (RAS+ mm, nibabel convention).
    path: the file it came from (named in every error about it).
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path


def load_volume(path: str | Path, volume_index: int | None = None) -> Volume:
    """Load an image volume as float32 (intensity scaling ``scl_slope``/``scl_inter`` applied).

    4-D files need ``volume_index`` unless they hold a single volume; 3-D files ignore it.
    Raises DataError for a missing, unreadable, truncated or non-NIfTI file, a 2-D or 5-D+ array,
    a bad ``volume_index``, NaN/Inf voxels, a constant image and a singular/invalid affine.
    """
    vol = _load(path, volume_index)
    lo, hi = float(vol.data.min()), float(vol.data.max())
    if lo == hi:
        raise DataError(vol.path, f"all voxels equal {lo:g} (constant image)")
    return vol


def load_mask(path: str | Path, volume_index: int | None = None) -> Volume:
    """Load a binary mask: (X, Y, Z) float32 with values {0, 1} (``data > 0.5``).

    Same file checks as :func:`load_volume`, except that a constant (e.g. empty) mask is allowed.
    """
    vol = _load(path, volume_index)
    vol.data = (vol.data > 0.5).astype(np.float32)
    return vol


def describe(path: str | Path) -> dict:
    """Header-only summary (no voxel data read).

    Returns {'shape': tuple of ints, 'voxel_size': 3 floats (mm), 'orientation': e.g. 'LPS'
    (``nib.aff2axcodes``), 'dtype': on-disk dtype name, 'oblique': bool}.
    Raises DataError for a missing/unreadable/non-NIfTI file, bad dimensions or affine, and an
    uncompressed file shorter than its header says.
    """
    path = Path(path)
    img = _open(path)
    shape = _check_shape(img, path)
    affine = _check_affine(img.affine, path)
    if path.suffix == ".nii":
        need = int(img.header.get("vox_offset", 0)) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < need:
            raise DataError(path, f"truncated or corrupt file ({path.stat().st_size} bytes; header needs {need})")
    return {
        "shape": shape,
        "voxel_size": tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(img.get_data_dtype()),
        "oblique": bool(np.abs(nib.affines.obliquity(affine)).max() > 1e-3),
    }


def check_affine(affine: np.ndarray, path: str | Path) -> np.ndarray:
    """``affine`` as (4, 4) float64 if it is a usable voxel->world map, else DataError naming ``path``."""
    return _check_affine(affine, Path(path))


def _open(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a file")
    try:
        img = nib.load(path)
    except ImageFileError as e:
        raise _unrecognised(path, e) from None
    except _READ_ERRORS as e:
        raise DataError(path, f"truncated or corrupt file ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI file (read as {type(img).__name__}); expected .nii or .nii.gz")
    return img


def _unrecognised(path: Path, error: Exception) -> DataError:
    """Tell a NIfTI file cut inside its header from a file that is not NIfTI at all."""
    try:
        with open(path, "rb") as f:
            opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (EOFError, OSError, zlib.error) as e:
        return DataError(path, f"truncated or corrupt file ({e})")
    sizeof_hdr = {int.from_bytes(head[:4], order) for order in ("little", "big")} if len(head) >= 4 else set()
    if sizeof_hdr & {348, 540}:  # a NIfTI-1/-2 header that ends early
        return DataError(path, f"truncated or corrupt file (header cut at {len(head)} bytes)")
    return DataError(path, f"not a NIfTI file ({error})")


def _check_shape(img, path: Path) -> tuple[int, ...]:
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 4 and shape[-1] == 1:  # trailing singleton dimensions carry nothing
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise DataError(
            path, f"has {len(shape)} dimensions {shape}; expected a 3-D volume (or 4-D with one volume)"
        )
    if min(shape) < 1:
        raise DataError(path, f"has an empty dimension {shape}")
    return shape


def _check_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(path, "invalid affine (not a finite 4x4 matrix)")
    lin = affine[:3, :3]
    scale = np.abs(lin).max()
    if scale == 0 or abs(np.linalg.det(lin)) < 1e-6 * scale**3:
        raise DataError(path, "singular affine (zero voxel size or collapsed axes); cannot place it in space")
    return affine


def _load(path: str | Path, volume_index: int | None) -> Volume:
    path = Path(path)
    img = _open(path)
    shape = _check_shape(img, path)
    affine = _check_affine(img.affine, path)
    if img.get_data_dtype().kind not in "uifb":
        raise DataError(path, f"unsupported voxel type {img.get_data_dtype()}; expected integer or float")
    if len(shape) == 4:
        n = shape[3]
        if volume_index is None and n > 1:
            raise DataError(path, f"4-D with {n} volumes; set data.volume_index to choose one")
        index = 0 if volume_index is None else volume_index
        if not 0 <= index < n:
            raise DataError(path, f"data.volume_index={index} out of range for 4-D with {n} volume(s)")
    try:
        if len(shape) == 3:
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
        else:
            data = np.asarray(img.dataobj[:, :, :, index], dtype=np.float32).reshape(shape[:3])
    except _READ_ERRORS as e:
        raise DataError(path, f"truncated or corrupt file ({type(e).__name__}: {e})") from None
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad} of {data.size} voxels are NaN or Inf")
    return Volume(data=data, affine=affine, path=path)
