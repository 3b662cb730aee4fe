"""Preprocessing of one subject: geometry, brain mask, normalisation, slices.

Phantoms are defined in world space (RAS mm) and sampled into grids of any orientation, voxel size
and obliquity, so the true world position of every structure is known.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from medgen.config import DataConfig
from medgen.data.errors import DataError
from medgen.data.nifti import Volume
from medgen.data.preprocess import (
    Grid,
    estimate_brain_mask,
    normalise,
    preprocess_subject,
    resample_image,
    resample_mask,
    select_slices,
    target_grid,
)

MARK = np.array([-20.0, 24.0, 8.0])  # world mm: patient left (x < 0), anterior (y > 0), superior
RADII = np.array([40.0, 48.0, 36.0])  # brain ellipsoid, mm

FAST = {"brain_mask": "threshold", "bias_correction": "none"}  # as conftest.FAST_DATA


def grid_affine(shape, spacing, codes="RAS", centre=(0.0, 0.0, 0.0), rotation=None) -> np.ndarray:
    """Voxel -> world affine whose voxel axes point along ``codes``, centred on ``centre`` (mm)."""
    ornt = nib.orientations.axcodes2ornt(codes)
    lin = np.zeros((3, 3))
    for i, (axis, flip) in enumerate(ornt):
        lin[int(axis), i] = flip * spacing[i]
    if rotation is not None:
        lin = rotation @ lin
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = np.asarray(centre) - lin @ ((np.asarray(shape) - 1) / 2)
    return affine


def world(shape, affine) -> np.ndarray:
    """(3, *shape) world coordinates of every voxel centre."""
    ijk = np.indices(shape).reshape(3, -1).T
    return apply_affine(affine, ijk).T.reshape(3, *shape)


def marker(xyz, half=5.0) -> np.ndarray:
    return np.all(np.abs(xyz - MARK[:, None, None, None]) <= half, axis=0)


def brain_image(xyz) -> np.ndarray:
    """Ellipsoid brain: 'grey matter' 60, 'white matter' 100, dark 'ventricles' 25, and a marker cube
    peaking at 300 in its centre."""
    r = np.sqrt(((xyz / RADII[:, None, None, None]) ** 2).sum(0))
    img = np.where(r < 1, 60.0, 0.0) + np.where(r < 0.65, 40.0, 0.0)
    img[(np.abs(xyz[0]) - 8) ** 2 / 36 + xyz[1] ** 2 / 400 + xyz[2] ** 2 / 100 < 1] = 25.0
    m = marker(xyz)
    img[m] = 300.0 - 10 * np.abs(xyz[:, m] - MARK[:, None]).max(axis=0)
    return img.astype(np.float32)


def volume(data, affine, name="img.nii.gz") -> Volume:
    return Volume(data=np.asarray(data, np.float32), affine=affine, path=Path(f"/data/{name}"))


def ras_image(codes="RAS", spacing=(2.0, 2.0, 2.0), shape=(48, 56, 44)) -> Volume:
    """The phantom on a RAS grid, then stored in ``codes`` orientation with nibabel's own tools."""
    affine = grid_affine(shape, spacing)
    img = nib.Nifti1Image(brain_image(world(shape, affine)), affine)
    to_codes = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
    img = img.as_reoriented(to_codes)
    assert "".join(nib.aff2axcodes(img.affine)) == codes
    return volume(img.get_fdata(), img.affine)


def marker_mask(codes="PSR", spacing=(1.5, 1.25, 1.0), shape=(40, 50, 40), centre=(-10, 10, 5)) -> Volume:
    """Only the marker cube, on its own grid (orientation, voxel size, shape, offset)."""
    affine = grid_affine(shape, spacing, codes, centre)
    return volume(marker(world(shape, affine)), affine, "lesion.nii.gz")


def centroid(mask) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def assert_aligned(image: Volume, mask: Volume):
    grid = target_grid(image.data.shape, image.affine, (2.0, 2.0, 2.0))
    assert np.allclose(grid.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))  # axis aligned RAS+
    img = resample_image(image, grid)
    msk = resample_mask(mask, grid)
    expected = apply_affine(np.linalg.inv(grid.affine), MARK)
    assert np.linalg.norm(centroid(img > 200) - expected) < 1.0
    assert np.linalg.norm(centroid(msk) - expected) < 1.0
    assert np.abs(np.array(np.unravel_index(np.argmax(img), img.shape)) - expected).max() <= 1.0
    assert 80 < msk.sum() < 200  # 10 mm cube at 2 mm = 125 voxels
    return grid, expected


def assert_marker_left_top(image: Volume, mask: Volume, expected_z: float, size=64):
    out = preprocess_subject(image, DataConfig(**FAST, image_size=size), lesion=mask)
    has = out.lesion.any(axis=(1, 2))
    assert has.any() and np.abs(out.slice_index[has] - expected_z).max() <= 3.5
    rows, cols = np.nonzero(out.lesion.any(axis=0))
    assert rows.max() < size / 2 and cols.max() < size / 2  # anterior = top, patient left = image left
    assert out.images[out.lesion].mean() > 0.9  # the bright marker sits under the lesion mask


@pytest.mark.parametrize("codes", ["LPS", "PSR", "LAS"])
def test_orientation_and_resampling_keep_image_and_mask_aligned(codes):
    image, mask = ras_image(codes), marker_mask()
    _, expected = assert_aligned(image, mask)
    assert_marker_left_top(image, mask, expected[2])


def test_oblique_affine_keeps_alignment():
    a = np.deg2rad(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    shape = (56, 64, 54)
    affine = grid_affine(shape, (2.0, 2.0, 2.0), "LAS", rotation=rz @ rx)
    image = volume(brain_image(world(shape, affine)), affine)
    assert nib.affines.obliquity(affine).max() > np.deg2rad(10)
    _, expected = assert_aligned(image, marker_mask("RAS", (1.5, 1.5, 1.5), (30, 30, 30), MARK))
    assert_marker_left_top(image, marker_mask(), expected[2])


def test_anisotropic_input_resampled_to_2mm():
    shape = (60, 70, 15)
    affine = grid_affine(shape, (1.0, 1.0, 4.0))
    xyz = world(shape, affine)
    grid = target_grid(shape, affine, (2.0, 2.0, 2.0))
    # field of view 59 x 69 x 56 mm between corner voxel centres
    assert grid.shape == (31, 36, 29)
    np.testing.assert_allclose(grid.spacing, [2, 2, 2])
    out = resample_image(volume(xyz[2] + 100.0, affine), grid)  # intensity = world z (linear)
    assert out.shape == grid.shape and out.dtype == np.float32
    z = world(grid.shape, grid.affine)[2]
    inner = (slice(2, -2), slice(2, -2), slice(1, -1))
    np.testing.assert_allclose(out[inner], z[inner] + 100.0, atol=1e-3)


def test_mask_that_does_not_overlap_names_the_mask():
    image = ras_image()
    far = marker_mask("RAS", (1.0, 1.0, 1.0), (20, 20, 20), centre=(400.0, 0.0, 0.0))
    for kwargs in ({"lesion": far}, {"brain": far}):
        with pytest.raises(DataError) as e:
            preprocess_subject(image, DataConfig(**FAST), **kwargs)
        assert e.value.path == far.path and "does not overlap the image" in e.value.problem
    broken = volume(np.ones((4, 4, 4)), np.zeros((4, 4)), "broken_mask.nii.gz")
    with pytest.raises(DataError, match="broken_mask.nii.gz.*affine"):
        preprocess_subject(image, DataConfig(**FAST), lesion=broken)


def test_normalise_maps_brain_percentiles_to_0_and_1():
    data = np.full((10, 10, 10), 1e6, np.float32)  # huge values outside the brain must not matter
    brain = np.zeros(data.shape, bool)
    brain[2:8, 2:8, 2:8] = True
    values = np.random.default_rng(0).permutation(216).astype(np.float32) + 1000
    data[brain] = values
    out = normalise(data, brain, (1.0, 99.0))
    lo, hi = np.percentile(values, (1, 99))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[~brain] == 0)
    assert np.count_nonzero(out[brain] == 0) == np.count_nonzero(values <= lo)
    assert np.count_nonzero(out[brain] == 1) == np.count_nonzero(values >= hi) == 3
    np.testing.assert_allclose(out[brain], np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.count_nonzero(normalise(data, brain, (10.0, 90.0))[brain] == 1) > 20
    with pytest.raises(ValueError, match="constant"):
        normalise(np.ones_like(data), brain)


def test_select_slices_by_brain_area():
    brain = np.zeros((10, 10, 6), bool)
    for z, area in enumerate([0, 10, 50, 100, 30, 20]):
        brain[:, :, z].flat[:area] = True
    assert select_slices(brain, 0.25).tolist() == [2, 3, 4]
    assert select_slices(brain, 1.0).tolist() == [3]
    assert select_slices(brain, 0.05).tolist() == [1, 2, 3, 4, 5]


def test_preprocess_subject_outputs():
    image = ras_image()
    mask_affine = image.affine  # brain mask in the image's own grid: the target grid is the same
    brain = world(image.data.shape, mask_affine)
    brain = ((brain / RADII[:, None, None, None]) ** 2).sum(0) < 1
    for fraction, size in [(0.25, 64), (0.9, 32)]:
        out = preprocess_subject(image, DataConfig(**FAST, image_size=size, min_brain_fraction=fraction),
                                 brain=volume(brain, mask_affine, "brain.nii.gz"))
        n = len(out.slice_index)
        np.testing.assert_array_equal(out.slice_index, select_slices(brain, fraction))
        assert out.images.shape == out.brain.shape == out.lesion.shape == (n, size, size)
        assert out.images.dtype == np.float32 and out.brain.dtype == bool and out.lesion.dtype == bool
        assert out.slice_index.dtype.kind == "i" and not out.lesion.any()
        assert out.images.min() == 0.0 and out.images.max() == 1.0 and np.all(out.images[~out.brain] == 0)
        area = brain.sum(axis=(0, 1))
        assert np.all(area[out.slice_index] >= fraction * area.max())
    # one square field of view: the brain's longer side (y, 96 mm) fills ~1/1.08 of the rows, centred
    rows = np.flatnonzero(out.brain.any(axis=(0, 2)))
    assert abs(len(rows) - size / 1.08) <= 1.5 and abs(rows[0] - (size - 1 - rows[-1])) <= 1
    assert len(np.flatnonzero(out.brain.any(axis=(0, 1)))) < len(rows) - 3  # x is narrower (80 mm)


def synthetic_head(skull=True, seed=0):
    """(56, 64, 56) 2 mm head: textured ellipsoid brain, 3-voxel dark gap, 3-voxel bright scalp,
    a thin bridge brain -> scalp, noisy background. Returns (image, true brain, scalp)."""
    rng = np.random.default_rng(seed)
    shape = (56, 64, 56)
    idx = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    radii = np.array([18.0, 22.0, 17.0])[:, None, None, None]
    r = np.sqrt(((idx / radii) ** 2).sum(0))
    d = (r - 1) * 18  # approximate distance (voxels) outside the brain surface
    brain = r < 1
    img = np.where(brain, 60.0, 0.0) + np.where(r < 0.65, 40.0, 0.0)
    img += np.where(brain, 8 * np.sin(idx[0] / 2) * np.cos(idx[1] / 3), 0)  # folds / texture
    img[(idx[0] ** 2 / 9 + idx[1] ** 2 / 36 + idx[2] ** 2 / 16 < 1)] = 20.0  # ventricles
    scalp = (d >= 3) & (d < 6)
    bridge = (np.abs(idx[0]) < 1) & (np.abs(idx[1]) < 1) & (idx[2] < 0) & (d < 6)
    if skull:
        img[scalp] = 90.0
        img[bridge & ~brain] = 70.0
    img += np.abs(rng.normal(0, 3, shape))
    return img.astype(np.float32), brain, scalp


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_brain_mask_removes_skull_and_scalp():
    img, brain, scalp = synthetic_head(skull=True)
    est = estimate_brain_mask(img, (2.0, 2.0, 2.0))
    assert est.dtype == bool and est.shape == img.shape
    assert dice(est, brain) > 0.85
    assert np.count_nonzero(est & scalp) < 0.05 * np.count_nonzero(scalp)


def test_brain_mask_on_skull_stripped_image_is_tight():
    img, brain, _ = synthetic_head(skull=False)
    img[~brain] = 0.0
    est = estimate_brain_mask(img, (2.0, 2.0, 2.0))
    assert dice(est, brain) > 0.95
    assert np.count_nonzero(est & ~brain) < 0.05 * np.count_nonzero(brain)


def test_grid_is_dataclass_with_spacing():
    grid = Grid(shape=(2, 3, 4), affine=np.diag([1.5, 2.0, 3.0, 1.0]))
    np.testing.assert_allclose(grid.spacing, [1.5, 2.0, 3.0])


def test_slab_distance_thresholds_equal_scipys_whole_volume_transform(monkeypatch):
    """The brain-mask step thresholds distance transforms slab by slab (memory); with slabs of a
    few slices the answer is the one scipy gives on the whole volume, for any spacing and radius."""
    from scipy import ndimage

    from medgen.data import preprocess

    rng = np.random.default_rng(0)
    for shape, spacing, radius in [((30, 26, 41), (2.0, 2.0, 2.0), 4.0), ((21, 33, 37), (1.5, 1.0, 3.0), 4.001),
                                   ((40, 20, 25), (0.9, 1.2, 0.7), 2.5)]:
        monkeypatch.setattr(preprocess, "EDT_SLAB_VOXELS", shape[0] * shape[1] * 3)
        mask = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
        expected = ndimage.distance_transform_edt(mask, sampling=spacing) > radius
        assert np.array_equal(preprocess._farther_than(mask, np.asarray(spacing), radius), expected)


def test_a_field_of_view_too_large_to_resample_is_refused_first():
    """64^3 voxels of 20 mm (a 1.3 m field of view) would be 640^3 voxels at 2 mm: refused, naming
    the file and data.max_voxels, before anything of that size is allocated."""
    vol = Volume(data=np.ones((64, 64, 64), np.float32), affine=np.diag([20.0, 20.0, 20.0, 1.0]),
                 path=Path("huge.nii.gz"))
    with pytest.raises(DataError, match=r"huge\.nii\.gz.*field of view.*data\.max_voxels"):
        preprocess_subject(vol, DataConfig())


MEMORY_CHILD = r"""
import gzip, resource, sys
import nibabel as nib
import numpy as np
from medgen.config import DataConfig
from medgen.data.nifti import load_volume
from medgen.data.preprocess import preprocess_subject

path, n = sys.argv[1], int(sys.argv[2])
header = nib.Nifti1Header()  # n^3 float64 at 1 mm: zeros around a bright ellipsoid, one slice at a time
header.set_data_shape((n, n, n))
header.set_data_dtype(np.float64)
affine = np.diag([1.0, 1.0, 1.0, 1.0])
affine[:3, 3] = -(n - 1) / 2
header.set_sform(affine, code=1)
c = np.arange(n) - (n - 1) / 2
x, y = np.meshgrid(c, c, indexing="ij")
with gzip.open(path, "wb", compresslevel=1) as f:
    header.write_to(f)
    for z in c:
        r = np.sqrt((x / (0.4 * n)) ** 2 + (y / (0.45 * n)) ** 2 + (z / (0.35 * n)) ** 2)
        f.write((np.where(r < 1, 100.0, 0.0) + np.where(r < 0.6, 50.0, 0.0)).tobytes(order="F"))
del x, y, r
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
limit = vm + int(float(sys.argv[3]) * n**3 * 4)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
# medgen's own steps: the threshold brain mask, no bias correction, where those options exist
fast = {"brain_mask": "threshold", "bias_correction": "none"}
cfg = DataConfig(**{k: v for k, v in fast.items() if k in DataConfig.model_fields})
slices = preprocess_subject(load_volume(path), cfg)
print("slices", len(slices.images))
"""


def test_preprocessing_a_large_float64_volume_stays_within_a_few_decoded_volumes(tmp_path):
    """A 256^3 float64 .nii.gz (a few hundred kB, 64 MB as float32), loaded and preprocessed in a
    child whose address space may grow by only 3.5 float32 volumes beyond what it had mapped
    after its imports (RLIMIT_AS): it completes. Reading the file whole took 4.2 volumes for the
    load alone (the float64 array, a second copy of it inside gzip, the float32 result);
    benchmarks/memory.py measures the peak (about 2.2 volumes)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "big.nii.gz"), "256", "3.5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "slices" in out.stdout, out.stderr[-2000:]
