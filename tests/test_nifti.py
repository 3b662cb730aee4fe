"""Reading and validating NIfTI files: every bad input gives a DataError naming file and problem."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medgen.data.errors import DataError
from medgen.data.nifti import Volume, describe, load_mask, load_volume

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path, data, affine=AFFINE, slope=None, inter=0.0):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def assert_error(path, fragment, fn=load_volume, **kw):
    with pytest.raises(DataError) as e:
        fn(path, **kw)
    assert e.value.path == path and str(path) in str(e.value)
    assert fragment in e.value.problem
    return e.value


def test_loads_nii_and_nii_gz_as_float32(tmp_path):
    data = rand((6, 7, 8))
    affine = np.diag([-1.0, -1.2, 3.0, 1.0])
    for name in ("a.nii", "a.nii.gz"):
        vol = load_volume(save(tmp_path / name, data, affine))
        assert isinstance(vol, Volume) and vol.path == tmp_path / name
        assert vol.data.dtype == np.float32 and vol.data.shape == (6, 7, 8)
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_allclose(vol.affine, affine)
        assert vol.affine.dtype == np.float64


@pytest.mark.parametrize("dtype, slope, inter", [(np.uint8, 2.5, 10.0), (np.int16, 0.25, -3.0)])
def test_integer_dtypes_with_scl_slope(tmp_path, dtype, slope, inter):
    raw = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 200).astype(dtype)
    if dtype == np.int16:
        raw = raw * -7
    path = save(tmp_path / "s.nii.gz", raw, slope=slope, inter=inter)
    assert nib.load(path).dataobj.slope == slope  # the file really stores scaled integers
    vol = load_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, raw.astype(np.float64) * slope + inter, rtol=1e-6)
    assert describe(path)["dtype"] == np.dtype(dtype).name


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nope.nii.gz", "not found")
    assert_error(tmp_path / "nope.nii.gz", "not found", fn=describe)


def test_text_file_is_not_nifti(tmp_path):
    for name in ("notes.nii", "notes.nii.gz"):
        path = tmp_path / name
        path.write_text("patient notes, not an image\n" * 20)
        assert_error(path, "not a NIfTI file")
        assert_error(path, "not a NIfTI file", fn=load_mask)


def test_truncated_files(tmp_path):
    good = save(tmp_path / "good.nii.gz", rand((20, 20, 20)))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_error(cut, "truncated or corrupt")
    good = save(tmp_path / "good.nii", rand((20, 20, 20)))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_error(cut, "truncated or corrupt")
    assert_error(cut, "truncated or corrupt", fn=describe)
    # a gzip stream that ends inside the 348-byte header
    head = tmp_path / "head.nii.gz"
    head.write_bytes(gzip.compress(good.read_bytes())[:40])
    assert_error(head, "truncated or corrupt")
    short = tmp_path / "short.nii"
    short.write_bytes(good.read_bytes()[:200])
    assert_error(short, "truncated or corrupt")


@pytest.mark.parametrize("shape, ndim", [((20, 20), 2), ((5, 5, 5, 2, 3), 5)])
def test_wrong_dimensions(tmp_path, shape, ndim):
    path = save(tmp_path / "x.nii.gz", rand(shape))
    assert_error(path, f"has {ndim} dimensions")
    assert_error(path, "expected a 3-D volume", fn=describe)


def test_4d_needs_volume_index(tmp_path):
    data = np.stack([rand((6, 6, 6), seed=i) for i in range(3)], axis=-1)
    path = save(tmp_path / "bold.nii.gz", data)
    err = assert_error(path, "4-D with 3 volumes")
    assert "data.volume_index" in err.problem
    np.testing.assert_array_equal(load_volume(path, volume_index=2).data, data[..., 2])
    assert_error(path, "out of range", volume_index=3)
    assert describe(path)["shape"] == (6, 6, 6, 3)
    one = save(tmp_path / "one.nii.gz", data[..., :1])
    np.testing.assert_array_equal(load_volume(one).data, data[..., 0])


def test_nan_and_inf_voxels_are_counted(tmp_path):
    data = rand((6, 6, 6))
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    path = save(tmp_path / "nan.nii.gz", data)
    assert_error(path, "4 of 216 voxels are NaN or Inf")
    assert_error(path, "NaN", fn=load_mask)


def test_constant_image_rejected_but_empty_mask_allowed(tmp_path):
    path = save(tmp_path / "flat.nii.gz", np.full((6, 6, 6), 7.0, np.float32))
    assert_error(path, "all voxels equal 7")
    mask = load_mask(save(tmp_path / "empty_mask.nii.gz", np.zeros((6, 6, 6), np.uint8)))
    assert mask.data.dtype == np.float32 and not mask.data.any()


def test_mask_is_binarised(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = 0.4, 0.6, 3.0
    mask = load_mask(save(tmp_path / "m.nii.gz", data))
    assert set(np.unique(mask.data)) == {0.0, 1.0} and mask.data.sum() == 2 and mask.data[0, 0, 0] == 0


def test_singular_affine(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 2] = affine[:3, 1]  # two voxel axes point the same way
    path = save(tmp_path / "flat_affine.nii.gz", rand((6, 6, 6)), affine)
    assert_error(path, "singular affine")
    assert_error(path, "singular affine", fn=describe)


def test_describe_reads_header_only(tmp_path):
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    lps = np.diag([-1.0, -1.5, 3.0, 1.0])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([1.0, 1.0, 2.0])
    for name, affine, codes, is_oblique in [("lps", lps, "LPS", False), ("obl", oblique, "RAS", True)]:
        path = save(tmp_path / f"{name}.nii", (rand((5, 6, 7)) * 100).astype(np.int16), affine)
        info = describe(path)
        assert info["shape"] == (5, 6, 7) and info["dtype"] == "int16"
        assert info["orientation"] == codes and info["oblique"] is is_oblique
        assert info["voxel_size"] == pytest.approx(np.abs(np.diag(affine)[:3]) if name == "lps" else (1, 1, 2))
