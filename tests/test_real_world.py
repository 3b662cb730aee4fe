"""Scans as hospitals export them — LPS/PSR/oblique, uint8/int16/float, with a skull,
anisotropic voxels, masks in another grid — all yield the same, correctly oriented brain slices.

The anatomy is the MNI ICBM-152 template shipped in the nilearn wheel, at 2 mm; a spherical
"lesion" sits in the patient's left-anterior brain and is drawn analytically in world space, so
every variant holds the same physical head."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template
from scipy import ndimage

from medgen.data.dataset import LESION, load_site
from medgen.data.nifti import describe

LESION_CENTRE_MM = np.array([-30.0, 20.0, 10.0])  # x<0: patient left; y>0: anterior of the brain centre
LESION_RADIUS_MM = 9.0


@pytest.fixture(scope="module")
def reference():
    t = load_mni152_template(resolution=1)
    data = t.get_fdata(dtype=np.float32)[::2, ::2, ::2]
    affine = t.affine.copy()
    affine[:3, :3] *= 2
    return data, affine


def sphere(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - LESION_CENTRE_MM, axis=-1) <= LESION_RADIUS_MM


def with_lesion(data, affine):
    data = data.copy()
    data[sphere(data.shape, affine) & (data > 0.1)] = 0.05
    return data


def reoriented(data, affine, codes):
    img = nib.Nifti1Image(data, affine)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(codes))
    return img.as_reoriented(ornt)


def oblique(data, affine, degrees=(12.0, 0.0, 18.0)):
    """The same head stored in a rotated (oblique) grid, resampled into it."""
    ax, _, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    new = affine.copy()
    new[:3, :3] = rx @ rz @ affine[:3, :3]
    centre_vox = (np.array(data.shape) - 1) / 2
    centre_world = affine[:3, :3] @ centre_vox + affine[:3, 3]
    new[:3, 3] = centre_world - new[:3, :3] @ centre_vox
    vox_to_vox = np.linalg.inv(affine) @ new
    out = ndimage.affine_transform(data, vox_to_vox[:3, :3], vox_to_vox[:3, 3], order=1)
    return out.astype(np.float32), new


def add_skull(data):
    head = data > 0.05
    outside = ndimage.distance_transform_edt(~head)
    skull = data.copy()
    skull[(outside > 2) & (outside <= 4)] = 0.9   # scalp, after a dark 2-voxel gap (CSF/skull)
    return skull


def save(path, img_or_data, affine=None, dtype=None):
    img = img_or_data if affine is None else nib.Nifti1Image(img_or_data, affine)
    if dtype is not None:
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        img.set_data_dtype(dtype)
    nib.save(img, str(path))


def make_hospital_site(folder, reference):
    data, affine = reference
    folder.mkdir(parents=True)
    lesioned = with_lesion(data, affine)
    mask = sphere(data.shape, affine).astype(np.uint8)
    rows = ["subject,image,mask,label"]

    def add(name, img, mask_img=None):
        save(folder / f"{name}.nii.gz", img)
        if mask_img is not None:
            save(folder / f"{name}_lesion.nii.gz", mask_img)
        rows.append(f"{name},{name}.nii.gz,{name + '_lesion.nii.gz' if mask_img is not None else ''},"
                    f"{'lesion' if mask_img is not None else 'healthy'}")

    add("ras_float", nib.Nifti1Image(lesioned, affine), nib.Nifti1Image(mask, affine))
    lps = reoriented((lesioned * 3000).astype(np.int16), affine, ("L", "P", "S"))
    add("lps_int16", lps, reoriented(mask, affine, ("L", "P", "S")))
    add("psr_uint8", reoriented((lesioned * 250).astype(np.uint8), affine, ("P", "S", "R")),
        reoriented(mask, affine, ("P", "S", "R")))
    obl, obl_affine = oblique(lesioned, affine)
    add("oblique", nib.Nifti1Image(obl, obl_affine), nib.Nifti1Image(mask, affine))
    add("skull", nib.Nifti1Image(add_skull(lesioned), affine), nib.Nifti1Image(mask, affine))
    thick = affine.copy()
    thick[:3, 2] *= 2
    add("thick_slices", nib.Nifti1Image(lesioned[:, :, ::2].copy(), thick), nib.Nifti1Image(mask, affine))
    # the mask in its own 1.5 mm LPS grid with a different field of view
    grid = np.diag([-1.5, -1.5, 1.5, 1.0])
    grid[:3, 3] = [70.0, 60.0, -50.0]
    add("mask_other_grid", nib.Nifti1Image(lesioned, affine),
        nib.Nifti1Image(sphere((100, 110, 90), grid).astype(np.uint8), grid))
    add("healthy", nib.Nifti1Image(data.copy(), affine))
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_hospital_exports_give_the_same_oriented_slices(tmp_path, reference, cfg):
    make_hospital_site(tmp_path / "H", reference)
    site = load_site(tmp_path / "H", cfg.data)
    assert site.problems == []
    s = cfg.data.image_size

    def lesion_slice(subject):
        idx = np.flatnonzero(site.subjects == subject)
        best = idx[np.argmax(site.lesion[idx].sum((1, 2)))]
        return site.images[best], site.lesion[best]

    ref_image, ref_lesion = lesion_slice("ras_float")
    for subject in ["ras_float", "lps_int16", "psr_uint8", "oblique", "skull", "thick_slices", "mask_other_grid"]:
        image, lesion = lesion_slice(subject)
        rows, cols = np.nonzero(lesion)
        # neurological convention: patient left on the image left, anterior at the top
        assert cols.mean() < s / 2 and rows.mean() < s / 2, subject
        dice = 2 * (lesion & ref_lesion).sum() / (lesion.sum() + ref_lesion.sum())
        assert dice > 0.6, (subject, dice)
        corr = np.corrcoef(image.ravel(), ref_image.ravel())[0, 1]
        assert corr > 0.8, (subject, corr)
        assert image[lesion].mean() < image[site.brain[0] & ~lesion].mean(), subject

    healthy = site.subjects == "healthy"
    assert not site.lesion[healthy].any() and np.all(site.labels[healthy] != LESION)
    assert set(site.lesion_subjects) == set(site.subjects.tolist()) - {"healthy"}


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "ixi-t1" / "scans").is_dir(),
                                  reason=f"real scans not found at {SHARED} (see /work/shared/data/README.md)")


@needs_shared
def test_real_exports_pass_the_header_checks_without_warnings():
    files = sorted(SHARED.rglob("*.nii*"))
    assert len(files) > 200
    for path in files:
        assert describe(path)["warnings"] == [], path


@needs_shared
def test_real_sessions_of_one_participant_are_one_subject(tmp_path, cfg):
    """Three real IXI scans as a BIDS site where two are sessions of one participant, with the
    IXI parcellations (labels 0..207) as brain masks."""
    ixi = SHARED / "ixi-t1"
    names = sorted(p.name.removesuffix("_T1.nii.gz") for p in (ixi / "scans").glob("*_T1.nii.gz"))[:3]
    site = tmp_path / "bids"
    for name, (sub, ses) in zip(names, [("01", "1"), ("01", "2"), ("02", "1")]):
        entities = f"sub-{sub}_ses-{ses}"
        anat = site / f"sub-{sub}/ses-{ses}/anat"
        masks = site / f"derivatives/brain/sub-{sub}/ses-{ses}/anat"
        anat.mkdir(parents=True)
        masks.mkdir(parents=True)
        (anat / f"{entities}_T1w.nii.gz").symlink_to(ixi / "scans" / f"{name}_T1.nii.gz")
        (masks / f"{entities}_desc-brain_mask.nii.gz").symlink_to(ixi / "brainmasks" / f"{name}_brainmask.nii.gz")
    s = load_site(site, cfg.data)
    assert s.problems == [] and s.warnings == []
    assert sorted(set(s.scans)) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    assert sorted(set(s.subjects)) == ["sub-01", "sub-02"]
    train, val = s.split_subjects(0.5, seed=0)
    assert not set(train.subjects) & set(val.subjects)
    assert {tuple(sorted(set(part.scans))) for part in (train, val)} == {("sub-01_ses-1", "sub-01_ses-2"),
                                                                       ("sub-02_ses-1",)}
