"""Reading and validating NIfTI files (.nii, .nii.gz).

Every problem with a file is raised as :class:`~medgen.data.errors.DataError` naming the file and
saying what is wrong, so a site engineer can fix or remove that one file.
"""

from __future__ import annotations

import errno
import gzip
import io
import itertools
import os
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

DEFAULT_MAX_VOXELS = 512**3
VOXEL_SIZE_RANGE_MM = (0.1, 20.0)  # plausible MRI voxel edge lengths
MIN_BRAIN_EXTENT_MM = 40.0  # every axis of a brain image spans at least this (a newborn's brain: ~80 mm)
MIN_BRAIN_VOXELS = 8  # ... in at least this many voxels
MAX_HEADER_BYTES = 16 * 2**20  # header plus extensions (DICOM dumps, comments) before the voxels
QFORM_SFORM_TOLERANCE_MM = 1.0  # farther apart than this at any corner voxel: a warning
_GZIP_MAGIC = b"\x1f\x8b"
READ_SLAB_BYTES = 4 * 2**20  # voxels are read (and decompressed) this much at a time


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


def load_volume(path: str | Path, volume_index: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
                min_extent_mm: float | None = None) -> Volume:
    """Load an image volume as float32 (intensity scaling ``scl_slope``/``scl_inter`` applied).

    4-D files need ``volume_index`` unless they hold a single volume; 3-D files ignore it.
    Raises DataError for a missing, unreadable, truncated or non-NIfTI file, a header refused by
    :func:`check_header` (checked before any voxel is read), a 2-D or 5-D+ array, a bad
    ``volume_index``, NaN/Inf voxels, a constant image and a singular/invalid affine; with
    ``min_extent_mm`` also an image too small to hold a brain (:func:`check_brain_extent`).
    """
    vol = _load(path, volume_index, max_voxels, min_extent_mm)
    lo, hi = float(vol.data.min()), float(vol.data.max())
    if lo == hi:
        raise DataError(vol.path, f"all voxels equal {lo:g} (constant image)")
    return vol


def load_mask(path: str | Path, volume_index: int | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load a mask where every value > 0.5 is inside (binary masks, parcellations): (X, Y, Z)
    float32 with values {0, 1}.

    Same file checks as :func:`load_volume`, except that a constant (e.g. empty) mask is allowed;
    a mask whose values are all in (0, 0.5) (probabilistic) is refused rather than read as empty.
    """
    vol = _load(path, volume_index, max_voxels)
    _refuse_faint(vol)
    vol.data = (vol.data > 0.5).astype(np.float32)
    return vol


def load_lesion_mask(path: str | Path, volume_index: int | None = None, lesion_labels: list[int] | None = None,
                     max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load a lesion mask: (X, Y, Z) float32 with values {0, 1}.

    With ``lesion_labels`` null the mask must be binary: 0 and one other value (0/1, 0/255), or
    probabilities in [0, 1] (inside: >= 0.5); a mask with several labels (e.g. 0..5) is refused.
    With ``lesion_labels`` the mask holds integer labels and exactly these are lesion.
    Same file checks as :func:`load_mask`.
    """
    vol = _load(path, volume_index, max_voxels)
    values = np.unique(vol.data)
    if lesion_labels is not None:
        vol.data = _labels_to_mask(vol, values, lesion_labels)
        return vol
    _refuse_faint(vol)
    integers = values[values == np.round(values)]
    if values.min() < 0:
        raise DataError(vol.path, f"mask has negative values (min {values.min():g}); expected 0/1")
    if len(integers) == len(values) and len(values[values > 0]) > 1:
        raise DataError(vol.path, f"multi-label mask (labels {_list(values[values > 0])}); "
                                  "set data.lesion_labels to the labels that are lesion")
    if len(integers) < len(values) and values.max() > 1:
        raise DataError(vol.path, f"mask values run from {values.min():g} to {values.max():g}; "
                                  "expected 0/1 or probabilities in [0, 1]")
    vol.data = (vol.data >= 0.5 if len(integers) < len(values) else vol.data > 0).astype(np.float32)
    return vol


def _labels_to_mask(vol: Volume, values: np.ndarray, lesion_labels: list[int]) -> np.ndarray:
    """The voxels whose (integer) label is in ``lesion_labels``, as {0, 1} float32."""
    if not np.all(values == np.round(values)):
        raise DataError(vol.path, "mask holds non-integer values but data.lesion_labels is set; "
                                  "expected integer labels")
    return np.isin(np.round(vol.data), lesion_labels).astype(np.float32)


def _refuse_faint(vol: Volume) -> None:
    """DataError when every non-zero value of a mask is below 0.5 (it would binarise to empty)."""
    top = float(vol.data.max())
    if 0 < top < 0.5:
        raise DataError(vol.path, f"mask is empty: its values are below 0.5 (a probabilistic mask?); max {top:g}")


def _list(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def describe(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> dict:
    """Header-only summary (no voxel data read).

    Returns {'shape': tuple of ints, 'voxel_size': 3 floats (mm), 'orientation': e.g. 'LPS'
    (``nib.aff2axcodes``), 'dtype': on-disk dtype name, 'oblique': bool, 'warnings': list of str
    (e.g. qform and sform disagree)}.
    Raises DataError for a missing/unreadable/non-NIfTI file, a header refused by
    :func:`check_header`, bad dimensions or affine, and an uncompressed file shorter than its
    header says.
    """
    path = Path(path)
    img = _open(path, max_voxels)
    shape = _check_shape(img, path)
    affine = _check_affine(img.affine, path)
    if not _is_gzip(path):
        need = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < need:
            raise DataError(path, f"truncated or corrupt file ({path.stat().st_size} bytes; header needs {need})")
    return {
        "shape": shape,
        "voxel_size": tuple(float(z) for z in voxel_sizes(affine)),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(img.get_data_dtype()),
        "oblique": bool(np.abs(nib.affines.obliquity(affine)).max() > 1e-3),
        "warnings": header_warnings(img.header),
    }


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Edge lengths (mm) of a voxel along its three axes: the column norms of the affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def check_header(header, path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Refuse a header, before any voxel is read or decompressed, whose size or geometry is
    implausible: more than ``max_voxels`` voxels (all volumes), a header with extensions over
    MAX_HEADER_BYTES, or a spatial ``pixdim`` (up to 3) that is not finite or outside
    VOXEL_SIZE_RANGE_MM."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
    except _READ_ERRORS:
        return  # a dimension field nibabel cannot read: nib.load names it
    n_voxels = int(np.prod(shape, dtype=object)) if shape else 0
    if n_voxels > max_voxels:
        raise DataError(path, f"header says {'x'.join(map(str, shape))} = {n_voxels:.3g} voxels, more than "
                              f"data.max_voxels={max_voxels}; refused before reading it")
    offset = float(header["vox_offset"])
    if not np.isfinite(offset) or offset > MAX_HEADER_BYTES:
        raise DataError(path, f"header puts the voxels at byte {offset:g} (over {MAX_HEADER_BYTES} bytes of "
                              "header extensions); refused")
    spatial = min(len(shape), 3)  # a 2-D file is refused by its shape, not by its unused pixdim[3]
    if spatial:
        _check_spacing(np.asarray(header["pixdim"][1:1 + spatial], dtype=np.float64), path, "pixdim")


def _check_spacing(sizes: np.ndarray, path: Path, what: str) -> None:
    lo, hi = VOXEL_SIZE_RANGE_MM
    if not np.isfinite(sizes).all() or sizes.min() < lo or sizes.max() > hi:
        raise DataError(path, f"implausible voxel size ({what} {' x '.join(f'{z:g}' for z in sizes)} mm); "
                              f"each must be within {lo:g}-{hi:g} mm")


def check_brain_extent(shape: tuple[int, ...], affine: np.ndarray, path: Path,
                       min_extent_mm: float = MIN_BRAIN_EXTENT_MM) -> None:
    """Refuse an image too small to hold a brain: each of its three axes must span at least
    ``min_extent_mm`` (voxels x voxel size) in at least MIN_BRAIN_VOXELS voxels."""
    extent = np.asarray(shape[:3]) * voxel_sizes(affine)
    if min(shape[:3]) < MIN_BRAIN_VOXELS or extent.min() < min_extent_mm:
        raise DataError(path, f"too small to hold a brain ({'x'.join(map(str, shape[:3]))} voxels, "
                              f"{' x '.join(f'{e:.0f}' for e in extent)} mm); need at least "
                              f"{MIN_BRAIN_VOXELS} voxels and {min_extent_mm:g} mm along every axis")


def header_warnings(header) -> list[str]:
    """What is odd but usable in a header: a qform and an sform (both coded) that place the
    voxels more than QFORM_SFORM_TOLERANCE_MM apart (nibabel, like most tools, uses the sform)."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not qcode or not scode:
        return []
    shape = header.get_data_shape()[:3]
    corners = np.array(list(itertools.product(*[(0, max(n - 1, 0)) for n in shape])), dtype=np.float64)
    gap = float(np.abs(nib.affines.apply_affine(qform, corners) - nib.affines.apply_affine(sform, corners)).max())
    if not np.isfinite(gap) or gap > QFORM_SFORM_TOLERANCE_MM:
        return [f"qform and sform disagree (by up to {gap:.3g} mm at the corner voxels, qform "
                f"{''.join(nib.aff2axcodes(qform))}, sform {''.join(nib.aff2axcodes(sform))}); using the sform"]
    return []


def inspect_header(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[str]:
    """The header checks of :func:`describe` (size, geometry, affine, extensions) from the first
    bytes of the file, without opening it as an image (a quarter of the time); returns its warnings."""
    path = Path(path)
    header = _checked_raw_header(path, max_voxels)
    if header is None:
        return describe(path, max_voxels)["warnings"]  # not a NIfTI header: nibabel says what it is
    try:
        affine = header.get_best_affine()
    except _READ_ERRORS as e:
        raise DataError(path, f"invalid affine ({e})") from None
    _check_affine(affine, path)
    return header_warnings(header)


def check_affine(affine: np.ndarray, path: str | Path) -> np.ndarray:
    """``affine`` as (4, 4) float64 if it is a usable voxel->world map (finite, voxel sizes within
    VOXEL_SIZE_RANGE_MM, not singular), else DataError naming ``path``."""
    return _check_affine(affine, Path(path))


def _open(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS,
          keep_file_open: bool = False) -> nib.Nifti1Image | nib.Nifti2Image:
    _checked_raw_header(path, max_voxels)
    try:
        img = nib.load(path, keep_file_open=keep_file_open)
    except ImageFileError as e:
        raise _unrecognised(path, e) from None
    except _READ_ERRORS as e:
        raise DataError(path, f"truncated or corrupt file ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI file (read as {type(img).__name__}); expected .nii or .nii.gz")
    return img


def _checked_raw_header(path: Path, max_voxels: int):
    """The file's raw header (None: not a NIfTI header), refused by :func:`check_header` or
    :func:`_check_extensions` before nibabel repairs its pixdim and follows its extension sizes."""
    _check_is_file(path)
    header, has_extensions = _raw_header(path)
    if header is not None:
        check_header(header, path, max_voxels)
        if has_extensions:
            _check_extensions(path, header)
    return header


def _check_is_file(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        raise DataError(path, "file not found")
    problem = file_problem(path)
    if problem is not None:
        raise problem


def file_problem(path: Path) -> DataError | None:
    """Why ``path`` cannot be read as a file, or None: it does not exist, is a broken or looping
    symlink, a folder, or not a regular file."""
    if path.is_file():
        return None
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return DataError(path, "is a symlink loop")
        except OSError as e:
            if e.errno == errno.ELOOP:
                return DataError(path, "is a symlink loop")
            return DataError(path, f"is a broken symlink (to {os.readlink(path)})")
    if not path.exists():
        return DataError(path, "does not exist")
    return DataError(path, "is a folder, not a file" if path.is_dir() else "is not a regular file")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _raw_header(path: Path):
    """(the NIfTI-1/-2 header as stored, before nibabel repairs it and without extensions, or None
    when the file does not start with one; whether extensions follow it), from the first 544
    bytes. Refuses a gzip-named file that is not gzip-compressed, and a gzip-compressed one named
    .nii."""
    gz = _is_gzip(path)
    named_gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(544)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(path, f"truncated or corrupt file ({e})") from None
    size = _sizeof_hdr(head)
    if named_gz and not gz:
        raise DataError(path, "not gzip-compressed: a plain .nii named .gz (rename it to .nii)" if size
                        else "not gzip-compressed although named .gz; not a NIfTI file")
    if gz and not named_gz and size:
        raise DataError(path, "gzip-compressed but named .nii (rename it to .nii.gz)")
    if size is None or len(head) < size:
        return None, False
    klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    try:
        header = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
    except _READ_ERRORS:
        return None, False
    return header, head[size:size + 1] not in (b"", b"\x00")


def _check_extensions(path: Path, header) -> None:
    """Refuse header extensions whose sizes nibabel would follow past the voxel data (or to the end
    of the file: a size under 16 bytes); reads at most ``vox_offset`` (<= MAX_HEADER_BYTES) bytes."""
    start, end = header.sizeof_hdr + 4, int(header["vox_offset"])
    with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
        f.seek(start)
        block = f.read(max(end - start, 0))
    order = "little" if header.endianness == "<" else "big"
    at = 0
    while end - start - at >= 16:
        esize = int.from_bytes(block[at:at + 4], order, signed=True) if len(block) >= at + 4 else 0
        if esize < 16 or at + esize > end - start:
            raise DataError(path, f"header extension at byte {start + at} claims {esize} bytes, past the voxel "
                                  f"data at byte {end} (or under 16); corrupt header")
        at += esize


def _sizeof_hdr(head: bytes) -> int | None:
    """348 (NIfTI-1) or 540 (NIfTI-2) when ``head`` starts with such a header's size field."""
    if len(head) < 4:
        return None
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")} & {348, 540}
    return sizes.pop() if sizes else None


def _unrecognised(path: Path, error: Exception) -> DataError:
    """Tell a NIfTI file cut inside its header from a file that is not NIfTI at all."""
    try:
        with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
            head = f.read(540)
    except (EOFError, OSError, zlib.error) as e:
        return DataError(path, f"truncated or corrupt file ({e})")
    size = _sizeof_hdr(head)
    if size and len(head) < size:
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
    _check_spacing(voxel_sizes(affine), path, "affine")
    lin = affine[:3, :3]
    scale = np.abs(lin).max()
    if scale == 0 or abs(np.linalg.det(lin)) < 1e-6 * scale**3:
        raise DataError(path, "singular affine (zero voxel size or collapsed axes); cannot place it in space")
    return affine


def _load(path: str | Path, volume_index: int | None, max_voxels: int = DEFAULT_MAX_VOXELS,
          min_extent_mm: float | None = None) -> Volume:
    path = Path(path)
    img = _open(path, max_voxels, keep_file_open=True)  # read in slabs below: one pass over a .gz
    shape = _check_shape(img, path)
    affine = _check_affine(img.affine, path)
    if min_extent_mm is not None:
        check_brain_extent(shape, affine, path, min_extent_mm)
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
        data, bad = _read_float32(img, shape, None if len(shape) == 3 else index)
    except _READ_ERRORS as e:
        raise DataError(path, f"truncated or corrupt file ({type(e).__name__}: {e})") from None
    if bad:
        raise DataError(path, f"{bad} of {data.size} voxels are NaN or Inf")
    return Volume(data=data, affine=affine, path=path)


def _read_float32(img, shape: tuple[int, ...], index: int | None) -> tuple[np.ndarray, int]:
    """(the 3-D volume (volume ``index`` of a 4-D file) as float32, scaled; its number of NaN/Inf
    voxels), read in slabs of axial slices of about READ_SLAB_BYTES on disk: memory beyond the
    float32 result stays a few slabs, whatever the stored type (reading it whole holds the stored
    array, 8 bytes a voxel for float64, and for a .gz a second copy of it while decompressing)."""
    nx, ny, nz = shape[:3]
    out = np.empty((nx, ny, nz), dtype=np.float32, order="F")  # the file's own (Fortran) order
    step = max(1, READ_SLAB_BYTES // max(1, nx * ny * img.get_data_dtype().itemsize))
    tail = () if index is None else (index,)
    bad = 0
    for z in range(0, nz, step):
        slab = img.dataobj[(slice(None), slice(None), slice(z, z + step), *tail)]
        out[:, :, z:z + step] = np.asarray(slab).reshape(nx, ny, -1)
        bad += int(out[:, :, z:z + step].size - np.count_nonzero(np.isfinite(out[:, :, z:z + step])))
    return out, bad
