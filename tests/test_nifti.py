"""Reading and validating NIfTI files: every bad input gives a DataError naming file and problem."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medgen.data.errors import DataError
from medgen.data.nifti import (
    MIN_BRAIN_EXTENT_MM, MIN_BRAIN_VOXELS, Volume, describe, inspect_header, load_lesion_mask, load_mask, load_volume,
)

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


def raw_nifti(path, shape, pixdim=(2.0, 2.0, 2.0), data=b"", trailing_zeros=0):
    """A NIfTI-1 file written from nibabel's header as is (nibabel's save would repair pixdim),
    gzip-compressed when ``path`` ends in .gz; ``trailing_zeros`` bytes of zeros after the data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = pixdim
    hdr["vox_offset"] = 352
    opener = gzip.open(path, "wb", compresslevel=1) if str(path).endswith(".gz") else open(path, "wb")
    with opener as f:
        f.write(hdr.binaryblock + b"\0" * 4 + data)
        chunk = b"\0" * 2**20
        for _ in range(trailing_zeros // len(chunk)):
            f.write(chunk)
    return path


def test_header_implying_too_many_voxels_is_refused_before_reading(tmp_path):
    huge = raw_nifti(tmp_path / "huge.nii.gz", (30000, 30000, 30000))
    for fn in (load_volume, load_mask, describe, inspect_header):
        err = assert_error(huge, "2.7e+13 voxels, more than data.max_voxels=134217728", fn=fn)
        assert "refused before reading" in err.problem
    small = save(tmp_path / "small.nii.gz", rand((20, 20, 20)))
    assert_error(small, "data.max_voxels=1000", max_voxels=1000)
    assert load_volume(small, max_voxels=8000).data.shape == (20, 20, 20)


def test_decompression_is_bounded_by_the_header(tmp_path):
    """A small gzip that expands to 200 MB: refused from its header, and a valid file followed by
    200 MB of zeros is read without decompressing them."""
    import tracemalloc

    bomb = raw_nifti(tmp_path / "bomb.nii.gz", (1024, 1024, 1024), trailing_zeros=200 * 2**20)
    data = rand((20, 20, 20))
    padded = raw_nifti(tmp_path / "padded.nii.gz", data.shape, data=data.tobytes(order="F"),
                       trailing_zeros=200 * 2**20)
    assert bomb.stat().st_size < 2**20 and padded.stat().st_size < 2**20
    tracemalloc.start()
    try:
        assert_error(bomb, "more than data.max_voxels")
        np.testing.assert_array_equal(load_volume(padded).data, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


@pytest.mark.parametrize("pixdim", [(0.0, 2.0, 2.0), (2.0, -1.0, 2.0), (0.01, 1.0, 1.0), (1e6, 1e6, 1e6),
                                    (np.nan, 1.0, 1.0), (np.inf, 1.0, 1.0)])
def test_implausible_pixdim_is_refused(tmp_path, pixdim):
    data = rand((20, 20, 20))
    path = raw_nifti(tmp_path / "odd.nii", data.shape, pixdim=pixdim, data=data.tobytes(order="F"))
    for fn in (load_volume, describe, inspect_header):
        assert_error(path, "implausible voxel size (pixdim", fn=fn)


def test_implausible_affine_voxel_size_is_refused(tmp_path):
    img = nib.Nifti1Image(rand((20, 20, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = 2.0
    img.set_sform(np.diag([1e6, 2.0, 2.0, 1.0]), code=1)  # 1 km voxels in the transform nibabel uses
    path = tmp_path / "km.nii.gz"
    nib.save(img, str(path))
    for fn in (load_volume, inspect_header):
        assert_error(path, "implausible voxel size (affine 1e+06 x 2 x 2 mm)", fn=fn)


def test_qform_sform_disagreement_is_a_warning(tmp_path):
    img = nib.Nifti1Image(rand((20, 20, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = [0.0, 15.0, 0.0]
    img.set_qform(shifted, code=1)
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    path = tmp_path / "two_frames.nii.gz"
    nib.save(img, str(path))
    (warning,) = describe(path)["warnings"]
    assert "qform and sform disagree (by up to 15 mm" in warning and "using the sform" in warning
    assert inspect_header(path) == [warning]
    agree = save(tmp_path / "agree.nii.gz", rand((20, 20, 20)))
    assert describe(agree)["warnings"] == []


@pytest.mark.parametrize("shape, spacing", [((3, 3, 3), 1.0), ((2, 1, 1), 2.0), ((3, 3, 3), 18.0),
                                            ((100, 100, 10), 1.0)])
def test_image_too_small_to_hold_a_brain(tmp_path, shape, spacing):
    path = save(tmp_path / "tiny.nii.gz", rand(shape), np.diag([spacing] * 3 + [1.0]))
    err = assert_error(path, "too small to hold a brain", min_extent_mm=MIN_BRAIN_EXTENT_MM)
    assert f"{MIN_BRAIN_VOXELS} voxels and 40 mm along every axis" in err.problem
    ok = save(tmp_path / "ok.nii.gz", rand((20, 10, 8)), np.diag([2.0, 4.0, 5.0, 1.0]))
    assert load_volume(ok, min_extent_mm=MIN_BRAIN_EXTENT_MM).data.shape == (20, 10, 8)


def test_lesion_masks_binary_multilabel_and_probabilistic(tmp_path):
    labels = np.zeros((8, 8, 8), np.uint8)
    for value in range(1, 6):
        labels[value, :2, :2] = value
    multi = save(tmp_path / "labels.nii.gz", labels)
    err = assert_error(multi, "multi-label mask (labels 1, 2, 3, 4, 5)", fn=load_lesion_mask)
    assert "data.lesion_labels" in err.problem
    picked = load_lesion_mask(multi, lesion_labels=[2, 4])
    np.testing.assert_array_equal(picked.data, np.isin(labels, [2, 4]).astype(np.float32))
    assert load_mask(multi).data.sum() == (labels > 0).sum()  # brain masks: any label > 0 is inside

    binary = save(tmp_path / "b255.nii.gz", (labels > 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(load_lesion_mask(binary).data, (labels > 0).astype(np.float32))
    soft = np.zeros((8, 8, 8), np.float32)
    soft[2:4, 2:4, 2:4] = 0.3
    faint = save(tmp_path / "prob.nii.gz", soft)
    for fn in (load_lesion_mask, load_mask):
        assert_error(faint, "mask is empty: its values are below 0.5 (a probabilistic mask?)", fn=fn)
    soft[3, 3, 3] = 0.9
    np.testing.assert_array_equal(load_lesion_mask(save(tmp_path / "p2.nii.gz", soft)).data, soft >= 0.5)
    assert_error(save(tmp_path / "percent.nii.gz", soft * 100), "expected 0/1 or probabilities", fn=load_lesion_mask)
    assert_error(faint, "non-integer values but data.lesion_labels is set", fn=load_lesion_mask, lesion_labels=[1])


def test_extension_case_and_misnamed_compression(tmp_path):
    data = rand((20, 20, 20))
    upper = save(tmp_path / "SCAN.NII.GZ", data)
    np.testing.assert_array_equal(load_volume(upper).data, data)
    plain = save(tmp_path / "plain.nii", data)
    named_gz = tmp_path / "plain.nii.gz"
    named_gz.write_bytes(plain.read_bytes())
    for fn in (load_volume, describe, inspect_header):
        assert_error(named_gz, "not gzip-compressed: a plain .nii named .gz", fn=fn)
    named_nii = tmp_path / "zipped.nii"
    named_nii.write_bytes(gzip.compress(plain.read_bytes()))
    assert_error(named_nii, "gzip-compressed but named .nii")


def test_unreadable_entries(tmp_path):
    (tmp_path / "folder.nii.gz").mkdir()
    assert_error(tmp_path / "folder.nii.gz", "a folder, not a file")
    (tmp_path / "broken.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    assert_error(tmp_path / "broken.nii.gz", "broken symlink")
    (tmp_path / "loop.nii").symlink_to(tmp_path / "loop.nii")
    assert_error(tmp_path / "loop.nii", "symlink loop", fn=describe)


def test_header_extensions_are_bounded(tmp_path):
    data = rand((20, 20, 20))
    img = nib.Nifti1Image(data, AFFINE)
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"scanner notes " * 10))
    good = tmp_path / "ext.nii.gz"
    nib.save(img, str(good))
    np.testing.assert_array_equal(load_volume(good).data, data)
    raw = gzip.decompress(good.read_bytes())
    for esize, name in [(2**30, "claims_1gb"), (0, "claims_0")]:  # nibabel would read 1 GB / to the end
        bad = tmp_path / f"{name}.nii.gz"
        bad.write_bytes(gzip.compress(raw[:352] + np.int32(esize).tobytes() + raw[356:] + b"\0" * 2**22))
        for fn in (load_volume, inspect_header):
            assert_error(bad, f"claims {esize} bytes, past the voxel data", fn=fn)
    far = tmp_path / "far.nii.gz"
    far.write_bytes(gzip.compress(raw[:108] + np.float32(2**30).tobytes() + raw[112:]))
    assert_error(far, "voxels at byte 1.07374e+09")


def test_2d_file_is_named_by_its_shape_not_its_unused_pixdim(tmp_path):
    data = rand((20, 20))
    path = raw_nifti(tmp_path / "slice.nii", data.shape, pixdim=(1.0, 1.0, 0.0), data=data.tobytes(order="F"))
    assert_error(path, "has 2 dimensions")
