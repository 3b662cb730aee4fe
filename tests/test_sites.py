import pytest
import yaml

from conftest import head, make_plain_site, save
from medgen.data.errors import DataError
from medgen.data.sites import discover_site


def test_plain_layout_pairs_masks(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=2)
    image, _ = head()
    save(site / "sub-00_brainmask.nii.gz", (image > 0).astype("uint8"))
    save(site / "sub-09_seg.nii.gz", (image > 0).astype("uint8"))  # a mask without its scan
    listing = discover_site(site, cfg.data)
    assert listing.layout == "plain"
    by_id = {s.id: s for s in listing.scans}
    assert sorted(by_id) == ["sub-00", "sub-01", "sub-02"]
    assert by_id["sub-00"].lesion_mask is None and by_id["sub-00"].brain_mask.name == "sub-00_brainmask.nii.gz"
    assert by_id["sub-02"].lesion_mask.name == "sub-02_mask.nii.gz"
    assert len(listing.problems) == 1 and listing.problems[0].path.name == "sub-09_seg.nii.gz"
    assert "no scan sub-09" in str(listing.problems[0])


def test_manifest_csv_and_yaml(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    (site / "manifest.csv").write_text(
        "subject,image,mask,label\n"
        "h1,sub-00.nii.gz,,healthy\n"
        "p1,sub-01.nii.gz,sub-01_mask.nii.gz,lesion\n"
        "p2,missing.nii.gz,,1\n"
        "p3,sub-00.nii.gz,,maybe\n"
        "p4,sub-00.nii.gz,lost_mask.nii.gz,lesion\n")
    listing = discover_site(site, cfg.data)
    assert listing.layout == "manifest"
    assert [(s.subject, s.id, s.label) for s in listing.scans] == [("h1", "sub-00", "healthy"),
                                                                    ("p1", "sub-01", "lesion")]
    assert listing.scans[1].lesion_mask.name == "sub-01_mask.nii.gz"
    problems = sorted(str(p) for p in listing.problems)
    assert any("missing.nii.gz" in p and "row 4" in p and "does not exist" in p for p in problems)
    assert any("row 5" in p and "'maybe'" in p for p in problems)
    assert any("lost_mask.nii.gz" in p and "row 6 (mask) but does not exist" in p for p in problems)
    assert len(problems) == 3  # row 6 is left out whole (no "appears twice" for its image)

    (site / "manifest.csv").unlink()
    (site / "manifest.yaml").write_text(yaml.safe_dump(
        {"subjects": [{"image": "sub-01.nii.gz", "mask": "sub-01_mask.nii.gz", "label": 1}]}))
    listing = discover_site(site, cfg.data)
    assert [(s.subject, s.id, s.label) for s in listing.scans] == [("sub-01", "sub-01", "lesion")]


def test_manifest_errors(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    (site / "manifest.csv").write_text("img,lbl\nsub-00.nii.gz,healthy\n")
    with pytest.raises(DataError, match=r"no 'image' column \(its columns: img, lbl") as e:
        discover_site(site, cfg.data)
    assert e.value.path.name == "manifest.csv"
    (site / "manifest.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="no rows"):
        discover_site(site, cfg.data)


def test_bids_layout(tmp_path, cfg):
    root = tmp_path / "bids"
    image, mask = head(lesion_centre=(14, 24, 20))
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", image)
    save(root / "sub-01/anat/sub-01_FLAIR.nii.gz", image)
    save(root / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", image)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_space-orig_label-lesion_mask.nii.gz", mask)
    save(root / "derivatives/brain/sub-01/anat/sub-01_desc-brain_mask.nii.gz", (image > 0).astype("uint8"))
    listing = discover_site(root, cfg.data)
    assert listing.layout == "bids"
    by_id = {s.id: s for s in listing.scans}
    assert sorted(by_id) == ["sub-01", "sub-02_ses-1"]
    assert by_id["sub-02_ses-1"].subject == "sub-02"
    assert "label-lesion" in by_id["sub-01"].lesion_mask.name
    assert "desc-brain" in by_id["sub-01"].brain_mask.name
    assert by_id["sub-02_ses-1"].lesion_mask is None
    flair = discover_site(root, cfg.data.model_copy(update={"bids_suffix": "FLAIR"}))
    assert [s.image.name for s in flair.scans] == ["sub-01_FLAIR.nii.gz"]


def test_missing_empty_and_file_folders(tmp_path, cfg):
    with pytest.raises(DataError, match="does not exist") as e:
        discover_site(tmp_path / "nope", cfg.data)
    assert e.value.path == tmp_path / "nope"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no NIfTI scans found"):
        discover_site(tmp_path / "empty", cfg.data)
    (tmp_path / "file.nii").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        discover_site(tmp_path / "file.nii", cfg.data)


def test_bids_sessions_and_runs_are_one_subject(tmp_path, cfg):
    root = tmp_path / "bids"
    image, _ = head()
    for name in ("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz",
                 "sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"):
        save(root / name, image)
    listing = discover_site(root, cfg.data)
    assert [(s.id, s.subject) for s in listing.scans] == [
        ("sub-02", "sub-02"), ("sub-01_ses-1", "sub-01"), ("sub-01_ses-2_run-1", "sub-01"),
        ("sub-01_ses-2_run-2", "sub-01")]


def test_manifest_rows_of_one_subject_are_scans_of_one_patient(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=1)
    (site / "manifest.csv").write_text(
        "subject,image,mask\n"
        "p1,sub-00.nii.gz,\n"
        "p1,sub-02.nii.gz,sub-02_mask.nii.gz\n"
        ",sub-01.nii.gz,\n"
        "p9,sub-01.nii.gz,\n")
    listing = discover_site(site, cfg.data)
    assert [(s.id, s.subject) for s in listing.scans] == [("sub-00", "p1"), ("sub-02", "p1"), ("sub-01", "sub-01")]
    assert len(listing.problems) == 1 and "row 5: image 'sub-01.nii.gz' appears twice" in str(listing.problems[0])


def test_manifest_paths_stay_inside_the_site_folder(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    image, _ = head()
    outside = save(tmp_path / "elsewhere" / "x.nii.gz", image)
    (site / "link.nii.gz").symlink_to(outside)
    (site / "loop.nii.gz").symlink_to(site / "loop.nii.gz")
    (site / "manifest.csv").write_text(
        "image\nsub-00.nii.gz\n../elsewhere/x.nii.gz\n" f"{outside}\n" "link.nii.gz\nloop.nii.gz\n")
    listing = discover_site(site, cfg.data)
    assert [s.id for s in listing.scans] == ["sub-00", "link"]  # a link the site made is followed
    assert len(listing.problems) == 3
    assert listing.problems[-1].problem == "listed in manifest.csv row 6 (image) but is a symlink loop"
    for row, problem in zip((3, 4), listing.problems):
        assert problem.path.name == "manifest.csv"
        assert f"row {row} (image)" in problem.problem and "outside the site folder" in problem.problem
        assert "data.allow_external_paths" in problem.problem
    allowed = discover_site(site, cfg.data.model_copy(update={"allow_external_paths": True}))
    assert [s.image for s in allowed.scans] == [site.resolve() / "sub-00.nii.gz", outside.resolve()]
    assert [p.problem for p in allowed.problems][:2] == [  # the same file, named three ways
        f"row 4: image '{outside}' appears twice", "row 5: image 'link.nii.gz' appears twice"]


def test_unreadable_entries_named_like_nifti_are_reported(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    image, _ = head()
    save(site / "SUB-05.NII.GZ", image)
    (site / "folder.nii.gz").mkdir()
    (site / "broken.nii.gz").symlink_to(site / "gone.nii.gz")
    (site / "loop.nii").symlink_to(site / "loop.nii")
    (site / "notes.txt").write_text("not a scan")
    save(site / "sub-07.nii.gz", image)
    (site / "sub-07_mask.nii.gz").symlink_to(site / "lost_mask.nii.gz")
    listing = discover_site(site, cfg.data)
    assert [s.id for s in listing.scans] == ["SUB-05", "sub-00"]
    assert [(w.path.name, w.problem) for w in listing.warnings] == [
        ("folder.nii.gz", "a folder named like a NIfTI file; skipped")]
    problems = {p.path.name: p.problem for p in listing.problems}
    assert set(problems) == {"broken.nii.gz", "loop.nii", "sub-07_mask.nii.gz", "sub-07.nii.gz"}
    assert problems["sub-07.nii.gz"] == "not used: its mask sub-07_mask.nii.gz cannot be read"
    assert "broken symlink" in problems["broken.nii.gz"] and "gone.nii.gz" in problems["broken.nii.gz"]
    assert "symlink loop" in problems["loop.nii"]

    bids = tmp_path / "bids"
    save(bids / "sub-01/anat/sub-01_T1w.nii.gz", image)
    (bids / "sub-01/anat/sub-01_run-2_T1w.nii.gz").symlink_to(bids / "nowhere.nii.gz")
    lesions = bids / "derivatives/lesions/sub-01/anat"
    lesions.mkdir(parents=True)
    (lesions / "sub-01_label-lesion_mask.nii.gz").symlink_to(bids / "lost.nii.gz")
    listing = discover_site(bids, cfg.data)
    assert listing.scans == []  # not used without its lesion mask
    assert [(p.path.name, p.problem) for p in listing.problems] == [
        ("sub-01_label-lesion_mask.nii.gz", f"named like a NIfTI file but is a broken symlink (to {bids}/lost.nii.gz); "
                                            "skipped"),
        ("sub-01_run-2_T1w.nii.gz", f"named like a NIfTI file but is a broken symlink (to {bids}/nowhere.nii.gz); "
                                    "skipped"),
        ("sub-01_T1w.nii.gz", "not used: its mask sub-01_label-lesion_mask.nii.gz cannot be read")]


def test_manifest_extra_columns_are_kept_and_named_once(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=0)
    (site / "manifest.csv").write_text("image,age,site_scanner\nsub-00.nii.gz,34,x\nsub-01.nii.gz,51,y\n")
    listing = discover_site(site, cfg.data)
    assert [s.id for s in listing.scans] == ["sub-00", "sub-01"] and not listing.problems
    assert listing.notes == ["manifest.csv: column(s) age, site_scanner ignored "
                             "(medgen uses subject, image, mask, brain_mask, label)"]


def test_bids_named_files_side_by_side_and_plain_names(tmp_path, cfg):
    image, mask = head(lesion_centre=(14, 24, 20))
    flat = tmp_path / "flat"
    save(flat / "sub-01_ses-1_dwi.nii.gz", image)
    save(flat / "sub-01_ses-1_FLAIR.nii.gz", image)
    save(flat / "sub-01_ses-1_msk.nii.gz", mask)
    save(flat / "sub-02_dwi.nii.gz", image)
    listing = discover_site(flat, cfg.data.model_copy(update={"bids_suffix": "dwi"}))
    assert listing.layout == "bids"
    assert [(s.id, s.subject, s.lesion_mask and s.lesion_mask.name) for s in listing.scans] == [
        ("sub-01_ses-1", "sub-01", "sub-01_ses-1_msk.nii.gz"), ("sub-02", "sub-02", None)]
    with pytest.raises(DataError, match=r"no T1w scans \(data.bids_suffix\); found: dwi \(2\), FLAIR \(1\)"):
        discover_site(flat, cfg.data)
    # sub-XX.nii.gz with sub-XX_mask.nii.gz is a plain site (no BIDS suffix on the scans)
    assert discover_site(make_plain_site(tmp_path / "plain", 1, 1), cfg.data).layout == "plain"


def test_bids_rawdata_root_and_other_datatypes(tmp_path, cfg):
    image, mask = head(lesion_centre=(14, 24, 20))
    root = tmp_path / "study"
    save(root / "rawdata/sub-01/ses-1/perf/sub-01_ses-1_cbf.nii.gz", image)
    save(root / "rawdata/sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz", image)
    save(root / "derivatives/lesions/sub-01/ses-1/anat/sub-01_ses-1_label-lesion_mask.nii.gz", mask)
    listing = discover_site(root, cfg.data)
    (found,) = listing.scans
    assert (found.id, found.subject, found.contrast) == ("sub-01_ses-1_run-1", "sub-01", "T1w")
    assert found.lesion_mask.name == "sub-01_ses-1_label-lesion_mask.nii.gz"  # fewer entities: the session's
    (cbf,) = discover_site(root, cfg.data.model_copy(update={"bids_suffix": "cbf"})).scans
    assert cbf.image.parent.name == "perf" and cbf.lesion_mask is not None
