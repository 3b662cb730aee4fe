"""Phantom cohort: layout, determinism, lesions where intensity changed, site differences, geometry."""

from __future__ import annotations

import csv
import itertools
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medgen.data import phantom as ph

SITES = ["A", "B", "C", "D"]
DESIGN = {  # site: (orientation, on-disk dtype, zooms in storage order)
    "A": (("R", "A", "S"), np.float32, (1.0, 1.0, 1.0)),
    "B": (("L", "P", "S"), np.int16, (1.0, 1.0, 3.0)),
    "C": (("P", "S", "R"), np.uint8, (1.2, 1.2, 2.5)),
    "D": (("L", "A", "S"), np.int16, (1.1, 1.1, 1.1)),
}
BRAIN_CENTRE = np.array([0.0, -20.0, 10.0])  # MNI ICBM-152 brain-mask centroid is (0, -22, 9.5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    folders = ph.synthesize_cohort(out, SITES, subjects_per_site=2, seed=0)
    assert folders == {s: out / s for s in SITES}
    return out


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _canonical(path: Path) -> np.ndarray:
    return nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)


def test_layout_manifest_and_masks(cohort):
    record = json.loads((cohort / "cohort.json").read_text())
    assert record["seed"] == 0 and record["subjects_per_site"] == 2
    assert [s["site"] for s in record["sites"]] == SITES
    for site, entry in zip(SITES, record["sites"]):
        folder = cohort / site
        with open(folder / "manifest.csv", newline="") as fh:
            assert next(csv.reader(fh)) == ["subject", "image", "mask", "label"]
        rows = _manifest(folder)
        assert [r["label"] for r in rows] == ["lesion", "healthy"]
        assert sorted(p.name for p in folder.glob("*.nii.gz")) == [
            "sub-001.nii.gz", "sub-001_mask.nii.gz", "sub-002.nii.gz"]
        for row, subj in zip(rows, entry["subjects"]):
            assert subj["subject"] == row["subject"] and subj["label"] == row["label"]
            img = nib.load(folder / row["image"])
            if row["label"] == "healthy":
                assert row["mask"] == "" and subj["mask"] is None
                continue
            mask = nib.load(folder / row["mask"])
            assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
            m = np.asanyarray(mask.dataobj)
            assert set(np.unique(m)) == {0, 1}
            vol_ml = m.sum() * np.prod(mask.header.get_zooms()[:3]) / 1000
            assert vol_ml == pytest.approx(subj["lesion_volume_ml"], rel=1e-3)
            assert 0.3 < vol_ml < 80
            assert subj["kind"] in ("hypo", "hyper") and subj["lesion_contrast"] != 0
            assert (subj["lesion_contrast"] < 0) == (subj["kind"] == "hypo")


def test_same_seed_identical_and_sites_independent(cohort, tmp_path):
    """Same seed -> identical voxels and manifests, even when generating fewer sites."""
    again = ph.synthesize_cohort(tmp_path / "again", ["A", "B"], subjects_per_site=2, seed=0)
    for site, folder in again.items():
        assert (folder / "manifest.csv").read_text() == (cohort / site / "manifest.csv").read_text()
        for row in _manifest(folder):
            for key in ("image", "mask"):
                if row[key]:
                    a, b = nib.load(folder / row[key]), nib.load(cohort / site / row[key])
                    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
                    assert np.array_equal(a.affine, b.affine)
                    assert a.header.get_data_dtype() == b.header.get_data_dtype()


def test_different_seed_differs():
    a = ph.make_subject(ph.make_site("B", 1, seed=0), 0, lesion=True)
    b = ph.make_subject(ph.make_site("B", 1, seed=1), 0, lesion=True)
    assert a.image.shape == b.image.shape and not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.mask, b.mask)
    c = ph.make_subject(ph.make_site("B", 1, seed=0), 1, lesion=True)  # another subject
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("index", range(4))
def test_lesion_mask_sits_where_intensity_changed(cohort, index):
    """Same subject with and without its lesion: the difference is the lesion, inside the mask."""
    site = ph.make_site(SITES[index], index, seed=0)
    with_l = ph.make_subject(site, 0, lesion=True)
    without = ph.make_subject(site, 0, lesion=True, apply_lesion=False)
    mask = with_l.mask
    assert mask is not None and mask.sum() > 20 and np.array_equal(mask, without.mask)
    diff = with_l.image - without.image
    sign = -1.0 if with_l.info["kind"] == "hypo" else 1.0
    tissue = np.median(without.image[mask])
    assert np.median(sign * diff[mask]) > 0.2 * tissue  # clearly changed inside the mask
    assert np.mean(sign * diff[mask] > 0) > 0.95
    near = ndi.binary_dilation(mask, ndi.generate_binary_structure(3, 3), iterations=3)
    if site.profile.artefact == "none":  # exact: changed exactly at the mask voxels
        assert np.array_equal(diff != 0, mask)
    else:  # a ghost / ringing copy of the lesion is faint
        assert np.abs(diff[~near]).max() < 0.5 * np.median(np.abs(diff[mask]))
    # the stored files are that subject: the mask file is the mask, the image the image
    folder = cohort / site.name
    assert np.array_equal(_canonical(folder / "sub-001_mask.nii.gz") > 0.5, mask)
    scale = site.profile.scale
    expected = with_l.image * scale
    if site.profile.dtype == "uint8":
        expected = np.clip(expected, 0, 255)
    assert np.abs(_canonical(folder / "sub-001.nii.gz") - expected).max() <= 0.51


def test_files_orientation_dtype_geometry(cohort):
    record = json.loads((cohort / "cohort.json").read_text())
    for site, entry in zip(SITES, record["sites"]):
        codes, dtype, zooms = DESIGN[site]
        lesion = entry["subjects"][0]
        for row in _manifest(cohort / site):
            img = nib.load(cohort / site / row["image"])
            assert nib.aff2axcodes(img.affine) == codes
            assert img.get_data_dtype() == dtype
            assert np.allclose(img.header.get_zooms()[:3], zooms)
            assert int(img.header["sform_code"]) == 1 and np.allclose(img.get_sform(), img.affine)
            data = img.get_fdata(dtype=np.float32)
            head = data > (0.25 * np.percentile(data, 99) if site == "D" else 0)
            centre = nib.affines.apply_affine(img.affine, np.argwhere(head)).mean(0)
            assert np.linalg.norm(centre - BRAIN_CENTRE) < 12, (site, centre)
            if row["mask"]:  # lesion on the recorded side (physical position survived)
                m = np.asanyarray(nib.load(cohort / site / row["mask"]).dataobj) > 0
                x = nib.affines.apply_affine(img.affine, np.argwhere(m))[:, 0].mean()
                sides = {les["hemisphere"] for les in lesion["lesions"]}
                if len(sides) == 1:
                    assert (x > 0) == (sides == {"R"}), (site, x, sides)
    b = nib.load(cohort / "B" / "sub-001.nii.gz")
    assert b.dataobj.slope not in (1.0, None) and np.isfinite(b.dataobj.slope)


def test_sites_really_differ(cohort):
    hists, corners = {}, {}
    for site in SITES:
        img = nib.load(cohort / site / "sub-002.nii.gz")
        data = img.get_fdata(dtype=np.float32)
        corners[site] = data[:8, :8, -8:]
        brain = data[data > (0.15 * np.percentile(data, 99) if site == "D" else 0)]
        brain = brain / np.percentile(brain, 99)
        hists[site] = np.histogram(brain, bins=24, range=(0, 1.2))[0] / brain.size
    for a, b in itertools.combinations(SITES, 2):
        assert np.abs(hists[a] - hists[b]).sum() > 0.15, (a, b)
    assert len({DESIGN[s][0] for s in SITES}) == 4
    for site in ("A", "B", "C"):  # skull-stripped exports: air is exactly zero
        assert not corners[site].any()
    assert corners["D"].mean() > 0  # whole head: Rician noise in the air
    record = json.loads((cohort / "cohort.json").read_text())
    noise = [s["subjects"][1]["noise_sigma"] for s in record["sites"]]
    assert len(set(noise)) == 4


def test_overview_png(cohort):
    raw = (cohort / "overview.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 400 and height > 150 * len(SITES)


def test_sites_beyond_four_cycle_with_perturbation():
    base = ph.PROFILES[1]
    a = ph.site_profile(5, np.random.default_rng(0))
    b = ph.site_profile(5, np.random.default_rng(0))
    assert a == b and a != base
    assert (a.orientation, a.dtype, a.skull, a.lesion) == (base.orientation, base.dtype, base.skull, base.lesion)
    assert np.allclose(a.voxel_mm, base.voxel_mm, rtol=0.15)
    site = ph.make_site("F", 5, seed=0)
    assert site.profile == ph.site_profile(5, np.random.default_rng(np.random.SeedSequence(0, spawn_key=(5,))))


def test_lesion_labels_interleave():
    for frac in (0.0, 0.25, 0.5, 0.8, 1.0):
        for n in (1, 3, 8):
            labels = [ph.is_lesion_subject(j, frac) for j in range(n)]
            assert sum(labels) == int(np.floor(n * frac + 0.5))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        ph.synthesize_cohort(tmp_path / "x", ["A", "A"], 1, 0)
    with pytest.raises(ValueError, match="subjects_per_site"):
        ph.synthesize_cohort(tmp_path / "x", ["A"], 0, 0)
    with pytest.raises(ValueError, match="lesion_fraction"):
        ph.synthesize_cohort(tmp_path / "x", ["A"], 1, 0, lesion_fraction=1.5)
    theirs = tmp_path / "real" / "A"
    theirs.mkdir(parents=True)
    (theirs / "patient1.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not a phantom cohort"):
        ph.synthesize_cohort(tmp_path / "real", ["A"], 1, 0)
    assert (theirs / "patient1.nii.gz").read_bytes() == b"not ours"
