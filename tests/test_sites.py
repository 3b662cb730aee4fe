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
    by_id = {s.id: s for s in listing.subjects}
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
        "p3,sub-00.nii.gz,,maybe\n")
    listing = discover_site(site, cfg.data)
    assert listing.layout == "manifest"
    assert [(s.id, s.label) for s in listing.subjects] == [("h1", "healthy"), ("p1", "lesion")]
    assert listing.subjects[1].lesion_mask.name == "sub-01_mask.nii.gz"
    problems = sorted(str(p) for p in listing.problems)
    assert any("missing.nii.gz" in p and "row 4" in p and "does not exist" in p for p in problems)
    assert any("row 5" in p and "'maybe'" in p for p in problems)

    (site / "manifest.csv").unlink()
    (site / "manifest.yaml").write_text(yaml.safe_dump(
        {"subjects": [{"image": "sub-01.nii.gz", "mask": "sub-01_mask.nii.gz", "label": 1}]}))
    listing = discover_site(site, cfg.data)
    assert [(s.id, s.label) for s in listing.subjects] == [("sub-01", "lesion")]


def test_manifest_errors(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    (site / "manifest.csv").write_text("img,lbl\nsub-00.nii.gz,healthy\n")
    with pytest.raises(DataError, match=r"unknown column\(s\) \['img', 'lbl'\]") as e:
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
    by_id = {s.id: s for s in listing.subjects}
    assert sorted(by_id) == ["sub-01", "sub-02_ses-1"]
    assert "label-lesion" in by_id["sub-01"].lesion_mask.name
    assert "desc-brain" in by_id["sub-01"].brain_mask.name
    assert by_id["sub-02_ses-1"].lesion_mask is None
    flair = discover_site(root, cfg.data.model_copy(update={"bids_suffix": "FLAIR"}))
    assert [s.image.name for s in flair.subjects] == ["sub-01_FLAIR.nii.gz"]


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
