"""Ingest that refuses to be fooled: real files in the wrong place each get a message in
`medgen data check` naming the file. Trap folders are built in tmp_path from symlinks to (or
rewritten copies of) the shared real scans, ``../shared/data`` (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.data.check import check_site
from medgen.data.sites import discover_site
from medgen.data.errors import DataError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
IXI = DATA / "ixi-t1"
ISLES = DATA / "real-lesions" / "isles22-strokecase0009"
T2 = DATA / "real-lesions" / "chronic-stroke-t2"
pytestmark = pytest.mark.skipif(not (IXI / "scans").is_dir() or not ISLES.is_dir(),
                                reason=f"real data not found at {DATA} (see the README, 'Real data')")


def ixi_ids(n: int) -> list[str]:
    return sorted(p.name[: -len("_T1.nii.gz")] for p in (IXI / "scans").glob("*_T1.nii.gz"))[:n]


def scan(i: str) -> Path:
    return IXI / "scans" / f"{i}_T1.nii.gz"


def parcellation(i: str) -> Path:
    return IXI / "brainmasks" / f"{i}_brainmask.nii.gz"


def link(target: Path, at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), at)
    return at


def rewritten(source: Path, at: Path, fn, affine=None) -> Path:
    """A copy of ``source`` with its voxels passed through ``fn`` (and another affine)."""
    img = nib.load(source)
    at.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj)), img.affine if affine is None else affine, img.header), at)
    return at


def shifted(d: np.ndarray) -> np.ndarray:
    """``d`` moved by (30, 50, 0) voxels, nothing wrapped round."""
    out = np.zeros_like(d)
    out[30:, 50:, :] = d[:-30, :-50, :]
    return out


def messages(report) -> dict[str, str]:
    return {e.path.name: e.problem for e in [*report.problems, *report.warnings]}


def test_a_parcellation_named_seg_is_refused_as_a_lesion_mask(tmp_path, cfg):
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    link(scan(a), site / f"{a}_T1.nii.gz")
    link(parcellation(a), site / f"{a}_T1_seg.nii.gz")
    link(scan(b), site / f"{b}_T1.nii.gz")
    report = check_site(site, cfg.data)
    problem = messages(report)[f"{a}_T1_seg.nii.gz"]
    assert "multi-label mask" in problem and "in all)" in problem and "data.lesion_labels" in problem
    assert [p.name for p in report.skipped] == [f"{a}_T1.nii.gz"]  # never used without its mask
    assert report.exit_code == 1


def test_manifest_mask_column_with_a_parcellation_and_an_extra_age_column(tmp_path, cfg):
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    link(scan(a), site / "a.nii.gz")
    link(scan(b), site / "b.nii.gz")
    link(parcellation(a), site / "a_labels.nii.gz")
    (site / "manifest.csv").write_text("image,mask,age,sex\na.nii.gz,a_labels.nii.gz,35,F\nb.nii.gz,,41,M\n")
    report = check_site(site, cfg.data)
    assert "multi-label mask" in messages(report)["a_labels.nii.gz"]
    assert report.slices.notes.count("manifest.csv: column(s) age, sex ignored "
                                     "(medgen uses subject, image, mask, brain_mask, label)") == 1
    assert "column(s) age, sex ignored" in report.summary(cfg.data)


def test_a_parcellation_found_as_a_scan_looks_like_a_label_map(tmp_path, cfg):
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    link(scan(a), site / f"{a}_T1.nii.gz")
    link(parcellation(b), site / f"{b}_parc.nii.gz")  # renamed: no mask suffix, so it is a "scan"
    link(T2 / "lesionT2.nii", site / "lesionT2.nii")  # a binary mask found as a scan
    report = check_site(site, cfg.data)
    found = messages(report)
    assert found[f"{b}_parc.nii.gz"].startswith("looks like a label map, not an image (148 label(s), ")
    assert found["lesionT2.nii"].startswith("looks like a label map, not an image (1 label(s), 100% of")
    assert f"{a}_T1.nii.gz" not in found  # the real (8-bit) T1 is an image


def test_a_lesion_mask_covering_most_of_the_brain_is_refused(tmp_path, cfg):
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    link(scan(a), site / f"{a}_T1.nii.gz")
    link(parcellation(a), site / f"{a}_T1_brainmask.nii.gz")
    rewritten(parcellation(a), site / f"{a}_T1_mask.nii.gz", lambda d: (d > 0).astype(np.uint8))
    link(scan(b), site / f"{b}_T1.nii.gz")
    report = check_site(site, cfg.data)
    problem = messages(report)[f"{a}_T1_mask.nii.gz"]
    assert problem.startswith("lesion mask covers 100% of the brain (more than 50%)")
    assert f"scan {a}_T1.nii.gz not used" in problem


def test_a_brain_mask_off_the_head_and_one_from_another_subject(tmp_path, cfg):
    a, b, c = ixi_ids(3)
    site = tmp_path / "site"
    link(scan(a), site / f"{a}_T1.nii.gz")
    # The same header, the mask moved 60 mm posterior and 100 mm superior (PSR voxels), off the head.
    rewritten(parcellation(a), site / f"{a}_T1_brainmask.nii.gz", shifted)
    link(scan(b), site / f"{b}_T1.nii.gz")
    link(parcellation(c), site / f"{b}_T1_brainmask.nii.gz")  # subject c's mask beside subject b's scan
    link(scan(c), site / f"{c}_T1.nii.gz")
    link(parcellation(c), site / f"{c}_T1_brainmask.nii.gz")
    report = check_site(site, cfg.data)
    problems = {e.path.name: e.problem for e in report.problems}
    warnings = {e.path.name: e.problem for e in report.warnings}
    assert problems[f"{a}_T1_brainmask.nii.gz"].startswith(f"brain mask lies off the head of {a}_T1.nii.gz: only ")
    assert warnings[f"{b}_T1_brainmask.nii.gz"].startswith(
        f"mask may belong to another subject: same grid size as {b}_T1.nii.gz (120x120x90) but placed ")
    assert f"{c}_T1_brainmask.nii.gz" not in problems | warnings  # its own mask passes


def test_contrasts_mixed_within_a_site(tmp_path, cfg):
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    link(scan(a), site / f"{a}_T1.nii.gz")
    link(scan(b), site / f"{b}_T1.nii.gz")
    link(T2 / "T2.nii", site / "T2.nii")
    report = check_site(site, cfg.data)
    assert dict(report.contrasts) == {"T1": 2, "T2": 1}
    assert messages(report)["T2.nii"] == ("contrast 'T2', but the site mixes contrasts (T1 (2), T2 (1)); one model "
                                          "learns one contrast: keep one per site (BIDS: data.bids_suffix)")
    assert "contrasts: T1 (2), T2 (1)" in report.summary(cfg.data)


def test_the_isles_case_as_distributed(cfg):
    with pytest.raises(DataError, match=r"no T1w scans \(data.bids_suffix\); found: adc \(1\), dwi \(1\), "
                                        r"flair \(1\) — set data.bids_suffix"):
        discover_site(ISLES, cfg.data)
    for contrast in ("dwi", "adc"):
        data = cfg.data.model_copy(update={"bids_suffix": contrast})
        (found,) = discover_site(ISLES, data).scans
        assert (found.id, found.subject, found.contrast) == ("sub-strokecase0009_ses-0001", "sub-strokecase0009",
                                                             contrast)
        assert found.lesion_mask.name == "sub-strokecase0009_ses-0001_msk.nii.gz"
        report = check_site(ISLES, data)
        assert report.exit_code == 0 and report.slices.lesion.any() and not report.warnings
        assert report.slices.lesion_subjects == ["sub-strokecase0009"]


def test_a_bids_tree_with_rawdata_sessions_datatypes_and_msk_masks(tmp_path, cfg):
    """The ISLES layout: rawdata/sub-*/ses-*/{dwi,anat}/, the mask under derivatives/ (on the DWI
    grid, so the FLAIR's mask lies on another grid)."""
    root = tmp_path / "isles"
    stem = "sub-strokecase0009_ses-0001"
    raw = root / "rawdata" / "sub-strokecase0009" / "ses-0001"
    for datatype, suffix in (("dwi", "dwi"), ("dwi", "adc"), ("anat", "flair")):
        link(ISLES / f"{stem}_{suffix}.nii.gz", raw / datatype / f"{stem}_{suffix}.nii.gz")
        link(ISLES / f"{stem}_{suffix}.json", raw / datatype / f"{stem}_{suffix}.json")
    link(ISLES / f"{stem}_msk.nii.gz",
         root / "derivatives" / "sub-strokecase0009" / "ses-0001" / f"{stem}_msk.nii.gz")
    with pytest.raises(DataError, match=r"found: adc \(1\), dwi \(1\), flair \(1\)"):
        discover_site(root, cfg.data)
    for contrast in ("dwi", "flair"):
        data = cfg.data.model_copy(update={"bids_suffix": contrast})
        (found,) = discover_site(root, data).scans
        assert found.image.parent.name == ("dwi" if contrast == "dwi" else "anat")
        assert found.lesion_mask.name == f"{stem}_msk.nii.gz"
        report = check_site(root, data)
        assert report.layout == "bids" and report.slices.lesion.any(), report.summary(data)
        assert not report.warnings  # the mask on the DWI grid is the FLAIR's too (same session)


def test_the_picture_of_real_sites_and_the_report_page(tmp_path, cfg):
    from types import SimpleNamespace

    from matplotlib.image import imread

    from medgen.data.picture import draw_site, picture_rows
    from medgen.evaluation.report import _site_picture

    site = tmp_path / "ixi"
    for i in ixi_ids(5):
        link(scan(i), site / f"{i}_T1.nii.gz")
        link(parcellation(i), site / f"{i}_T1_brainmask.nii.gz")
    ixi = check_site(site, cfg.data).slices
    rows = picture_rows(ixi)
    assert [len(idx) for _, idx in rows] == [5, 5, 5, 5]  # 4 of the 5 scans, 5 slices each
    assert all(np.all(np.diff(ixi.slice_index[idx]) > 0) for _, idx in rows)  # from the bottom up
    isles = check_site(ISLES, cfg.data.model_copy(update={"bids_suffix": "dwi"})).slices
    ((_, idx),) = picture_rows(isles)
    area = isles.lesion.reshape(len(isles), -1).sum(1)
    assert area.argmax() in idx  # the slice with the most lesion is shown
    for name, slices in (("ixi", ixi), ("isles", isles)):
        png = draw_site(slices, tmp_path / "sites" / name / "overview.png", name)
        rgb = imread(png)[..., :3]
        rgb = rgb[: int(0.9 * len(rgb))]  # above the legend
        red = ((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)).sum()
        yellow = ((rgb[..., 0] > 0.8) & (rgb[..., 1] > 0.6) & (rgb[..., 2] < 0.4)).sum()
        assert yellow > 500 and (red > 0) == (name == "isles"), (name, yellow, red)
    page = _site_picture(SimpleNamespace(path=tmp_path), "isles")
    assert "<h2>Data</h2>" in page and "data:image/png;base64," in page
    assert "No picture" in _site_picture(SimpleNamespace(path=tmp_path), "nowhere")


def test_a_skull_stripped_scan_with_its_own_brain_mask_passes_and_a_shifted_one_does_not(tmp_path, cfg):
    """No scalp to lie under: a stripped export's mask is its foreground, and that is not 'off the head'."""
    a, b = ixi_ids(2)
    site = tmp_path / "site"
    for i in (a, b):
        brain = nib.load(parcellation(i)).get_fdata() > 0
        rewritten(scan(i), site / f"{i}_T1.nii.gz", lambda d, brain=brain: d * brain)
    link(parcellation(a), site / f"{a}_T1_brainmask.nii.gz")
    rewritten(parcellation(b), site / f"{b}_T1_brainmask.nii.gz", lambda d: np.roll(d, 10, axis=1))  # 20 mm
    report = check_site(site, cfg.data)
    problems = {e.path.name: e.problem for e in report.problems}
    assert f"{a}_T1_brainmask.nii.gz" not in problems
    assert problems[f"{b}_T1_brainmask.nii.gz"].startswith(f"brain mask lies off the head of {b}_T1.nii.gz")
