import os

import numpy as np
import pytest
import torch

from conftest import AFFINE, head, make_plain_site, save
from medgen.data import dataset
from medgen.data.dataset import ENTRIES_PER_SCAN, HEALTHY, LESION, SliceDataset, load_site
from medgen.data.errors import DataError, SiteDataError


@pytest.fixture
def calls(monkeypatch):
    """Counts real preprocessing runs per subject (the real function still runs)."""
    seen = []
    real = dataset._preprocess

    def spy(subject, cfg):
        seen.append(subject.id)
        return real(subject, cfg)

    monkeypatch.setattr(dataset, "_preprocess", spy)
    return seen


def test_site_slices_shapes_labels(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=2)
    s = load_site(site, cfg.data)
    n = len(s)
    assert s.site == "A" and n > 20
    assert s.images.shape == (n, 64, 64) and s.images.dtype == np.float32
    assert s.brain.shape == s.lesion.shape == (n, 64, 64) and s.lesion.dtype == bool
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert np.all(s.images[~s.brain] == 0)
    assert set(s.subjects) == {"sub-00", "sub-01", "sub-02", "sub-03"}
    healthy = np.isin(s.subjects, ["sub-00", "sub-01"])
    assert np.all(s.labels[healthy] == HEALTHY) and not s.lesion[healthy].any()
    assert (s.labels[~healthy] == LESION).sum() >= 2
    assert np.all(s.lesion[s.labels == LESION].reshape((s.labels == LESION).sum(), -1).sum(1)
                  >= cfg.data.min_lesion_pixels)
    assert s.lesion_subjects == ["sub-02", "sub-03"]
    # lesion pixels are darker than the brain around them (the sphere was written at 20 of 60-100)
    assert s.images[s.lesion].mean() < s.images[s.brain & ~s.lesion].mean() - 0.2

    image, label, brain, lesion = SliceDataset(s)[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and brain.dtype == torch.bool and lesion.shape == (1, 64, 64)


def test_cache_reuse_and_invalidation(tmp_path, cfg, calls):
    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=1)
    first = load_site(site, cfg.data)
    assert sorted(calls) == ["sub-00", "sub-01", "sub-02"]

    calls.clear()
    again = load_site(site, cfg.data)
    assert calls == []
    np.testing.assert_array_equal(first.images, again.images)

    # a changed file re-processes that subject only; its entries stay at most ENTRIES_PER_SCAN
    cache_dir = next((tmp_path / "cache").iterdir())
    for seed in (42, 43):
        calls.clear()
        image, _ = head(seed=seed)
        save(site / "sub-01.nii.gz", image)
        st = (site / "sub-01.nii.gz").stat()
        os.utime(site / "sub-01.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        load_site(site, cfg.data)
        assert calls == ["sub-01"]
    assert len(list(cache_dir.glob("sub-01-*.npz"))) == ENTRIES_PER_SCAN == 2

    # two settings used in turn: each is processed once, then both are read from the cache
    small = cfg.data.model_copy(update={"image_size": 32})
    calls.clear()
    load_site(site, small)
    assert sorted(calls) == ["sub-00", "sub-01", "sub-02"]
    calls.clear()
    load_site(site, cfg.data), load_site(site, small), load_site(site, cfg.data)
    assert calls == []

    # a changed preprocessing setting re-processes everything; a label-only setting does not
    calls.clear()
    load_site(site, cfg.data.model_copy(update={"min_lesion_pixels": 50}))
    assert calls == []
    load_site(site, cfg.data.model_copy(update={"spacing_mm": (3.0, 3.0, 3.0)}))
    assert sorted(calls) == ["sub-00", "sub-01", "sub-02"]


def test_damaged_cache_entry_is_rebuilt(tmp_path, cfg, calls):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    first = load_site(site, cfg.data)
    entry = next((tmp_path / "cache").rglob("*.npz"))
    entry.write_bytes(b"garbage")
    calls.clear()
    second = load_site(site, cfg.data)
    assert calls == ["sub-00"]
    np.testing.assert_array_equal(first.images, second.images)


def _add_bad_files(site):
    (site / "sub-90.nii.gz").write_bytes(b"this is not a nifti file")
    image, _ = head()
    image[5, 5, 5] = np.nan
    save(site / "sub-91.nii.gz", image)


def test_fail_reports_every_bad_file(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    _add_bad_files(site)
    with pytest.raises(SiteDataError) as e:
        load_site(site, cfg.data)
    named = {p.path.name for p in e.value.problems}
    assert named == {"sub-90.nii.gz", "sub-91.nii.gz"}
    assert "sub-90.nii.gz" in str(e.value) and "sub-91.nii.gz" in str(e.value)


def test_skip_uses_the_good_files(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    _add_bad_files(site)
    s = load_site(site, cfg.data.model_copy(update={"on_bad_file": "skip"}))
    assert set(s.subjects) == {"sub-00", "sub-01"}
    assert {p.path.name for p in s.problems} == {"sub-90.nii.gz", "sub-91.nii.gz"}


def test_nothing_usable_fails_even_with_skip(tmp_path, cfg):
    site = tmp_path / "A"
    site.mkdir()
    (site / "a.nii.gz").write_bytes(b"junk")
    with pytest.raises(SiteDataError, match="a.nii.gz"):
        load_site(site, cfg.data.model_copy(update={"on_bad_file": "skip"}))


def test_mask_label_conflicts(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    save(site / "sub-00_mask.nii.gz", np.zeros((40, 48, 40), np.uint8))
    (site / "manifest.csv").write_text(
        "image,mask,label\n"
        "sub-00.nii.gz,sub-00_mask.nii.gz,lesion\n"
        "sub-01.nii.gz,sub-01_mask.nii.gz,healthy\n")
    with pytest.raises(SiteDataError) as e:
        load_site(site, cfg.data)
    text = str(e.value)
    assert "sub-00_mask.nii.gz: lesion mask is empty but scan 'sub-00' is labelled lesion" in text
    assert "sub-01_mask.nii.gz: lesion mask is not empty but scan 'sub-01' is labelled healthy" in text


def test_lesion_label_without_mask_labels_every_slice(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    (site / "manifest.csv").write_text("image,label\nsub-00.nii.gz,lesion\n")
    s = load_site(site, cfg.data)
    assert np.all(s.labels == LESION) and not s.lesion.any()
    assert any("without a lesion mask" in n for n in s.notes)


def test_missing_folder(tmp_path, cfg):
    with pytest.raises(DataError, match="does not exist"):
        load_site(tmp_path / "nowhere", cfg.data)


def _two_session_site(root):
    """A BIDS site: sub-01..sub-04 with two sessions each (sub-03, sub-04 with a lesion), sub-05 once."""
    for i in range(1, 6):
        sessions = (1, 2) if i < 5 else (1,)
        for ses in sessions:
            image, mask = head(seed=10 * i + ses, lesion_centre=(14, 24, 20) if i in (3, 4) else None)
            save(root / f"sub-0{i}/ses-{ses}/anat/sub-0{i}_ses-{ses}_T1w.nii.gz", image)
            if i in (3, 4):
                save(root / f"derivatives/lesions/sub-0{i}/ses-{ses}/anat/sub-0{i}_ses-{ses}_label-lesion_mask.nii.gz",
                     mask)
    return root


def test_sessions_of_one_patient_are_one_subject_in_split_and_dp(tmp_path, cfg, calls):
    from medgen.privacy.dp import plan

    s = load_site(_two_session_site(tmp_path / "bids"), cfg.data)
    assert sorted(set(s.subjects)) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]
    assert len(set(s.scans)) == 9 and len(calls) == 9  # each scan is its own volume and cache entry
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 9
    assert s.lesion_subjects == ["sub-03", "sub-04"]
    for seed in range(20):
        train, val = s.split_subjects(0.4, seed)
        assert len(val) and not set(train.subjects) & set(val.subjects)
        assert set(val.scans) == {scan for scan in set(s.scans) if scan.split("_")[0] in set(val.subjects)}
    dp_cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"enabled": True, "unit": "subject"})})
    assert plan(dp_cfg, s, steps=10).units == 5


def test_manifest_rows_of_one_subject_stay_together(tmp_path, cfg):
    from medgen.privacy.dp import plan

    site = make_plain_site(tmp_path / "A", n_healthy=4, n_lesion=0)
    (site / "manifest.csv").write_text("subject,image\np1,sub-00.nii.gz\np1,sub-01.nii.gz\n"
                                       "p2,sub-02.nii.gz\np3,sub-03.nii.gz\n")
    s = load_site(site, cfg.data)
    assert sorted(set(s.subjects)) == ["p1", "p2", "p3"] and len(set(s.scans)) == 4
    assert plan(cfg, s, steps=10).units == 3
    for seed in range(20):
        train, val = s.split_subjects(0.34, seed)
        assert sorted(set(val.subjects)) in (["p1"], ["p2"], ["p3"]) and not set(train.subjects) & set(val.subjects)
        if "p1" in set(val.subjects):
            assert set(val.scans) == {"sub-00", "sub-01"}


def test_header_limits_apply_to_cached_scans(tmp_path, cfg, calls):
    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=0)
    load_site(site, cfg.data)
    calls.clear()
    with pytest.raises(SiteDataError) as e:
        load_site(site, cfg.data.model_copy(update={"max_voxels": 1000}))
    assert calls == [] and len(e.value.problems) == 2
    assert all("more than data.max_voxels=1000" in p.problem for p in e.value.problems)
    load_site(site, cfg.data.model_copy(update={"max_voxels": 10**7, "allow_external_paths": True}))
    assert calls == []  # keys that do not change the slices keep the cache


def test_lesion_labels_select_labels_and_key_the_cache(tmp_path, cfg, calls):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=1)
    _, mask = head(lesion_centre=(14, 24, 20))
    labels = mask * 2
    labels[30:34, 20:28, 18:22] = 5  # another structure, not lesion
    save(site / "sub-01_mask.nii.gz", labels)
    with pytest.raises(SiteDataError, match=r"sub-01_mask.nii.gz: multi-label mask \(labels 2, 5\).*"
                                            r"data.lesion_labels.*\(scan sub-01.nii.gz not used\)"):
        load_site(site, cfg.data)
    s = load_site(site, cfg.data.model_copy(update={"lesion_labels": [2]}))
    assert s.lesion_subjects == ["sub-01"]
    calls.clear()
    both = load_site(site, cfg.data.model_copy(update={"lesion_labels": [2, 5]}))
    assert calls == ["sub-00", "sub-01"] and both.lesion.sum() > s.lesion.sum()


def test_lesion_labels_validation():
    from pydantic import ValidationError

    from medgen.config import DataConfig

    assert DataConfig(lesion_labels=[1, 3]).lesion_labels == [1, 3]
    for bad in ([0, 1], [2, 2], []):
        with pytest.raises(ValidationError):
            DataConfig(lesion_labels=bad)


def test_check_lists_skipped_files_and_warnings(tmp_path, cfg):
    import nibabel as nib

    from medgen.data.check import check_site

    site = make_plain_site(tmp_path / "A", n_healthy=2, n_lesion=1)
    _add_bad_files(site)
    save(site / "tiny.nii.gz", np.random.default_rng(0).random((3, 3, 3)).astype(np.float32))
    soft = head(lesion_centre=(14, 24, 20))[1] * 0.3
    save(site / "sub-02_mask.nii.gz", soft.astype(np.float32))
    (site / "folder.nii.gz").mkdir()
    (site / "broken.nii.gz").symlink_to(site / "gone.nii.gz")
    image, _ = head(seed=7)
    img = nib.Nifti1Image(image, AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [0.0, 0.0, 12.0]
    img.set_qform(shifted, code=1)
    img.set_sform(AFFINE, code=1)
    nib.save(img, str(site / "two_frames.nii.gz"))

    report = check_site(site, cfg.data)
    text = report.summary(cfg.data)
    skipped = {"sub-02.nii.gz", "sub-90.nii.gz", "sub-91.nii.gz", "tiny.nii.gz"}
    assert {p.name for p in report.skipped} == skipped
    assert f"skipped scans: {len(skipped)}" in text
    assert all(f"  - {site / name}" in text for name in skipped)
    assert "usable scans: 3 (3 subjects)" in text
    assert f"{site / 'sub-02_mask.nii.gz'}: mask is empty: its values are below 0.5 (a probabilistic mask?)" in text
    assert "(scan sub-02.nii.gz not used)" in text
    assert f"{site / 'tiny.nii.gz'}: too small to hold a brain" in text
    assert f"{site / 'broken.nii.gz'}: named like a NIfTI file but is a broken symlink" in text
    assert "warnings: 2" in text
    assert f"{site / 'folder.nii.gz'}: a folder named like a NIfTI file; skipped" in text
    assert f"{site / 'two_frames.nii.gz'}: qform and sform disagree (by up to 12 mm" in text
    assert report.exit_code == 1


def test_parallel_preprocessing_gives_the_same_slices_and_problems(tmp_path, cfg):
    """data.workers: new scans preprocessed by 2 threads give the slices and the named problems that
    one thread gives, in the same order; a study config cannot ask for more threads than the site's
    process may use (its torch threads). A DataError survives pickling with its path and problem."""
    import pickle
    from medgen.data import parallel

    site = make_plain_site(tmp_path / "site", n_healthy=3, n_lesion=2)
    (site / "sub-09.nii.gz").write_bytes(b"not a nifti")
    serial = load_site(site, cfg.data.model_copy(update={"workers": 1, "on_bad_file": "skip"}))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert parallel.workers(None) == 2 and parallel.workers(64) == 2 and parallel.workers(1) == 1
        pooled = load_site(site, cfg.data.model_copy(update={"workers": 2, "on_bad_file": "skip",
                                                              "cache_dir": tmp_path / "cache-threads"}))
    finally:
        torch.set_num_threads(before)
    for key in ("images", "brain", "lesion", "labels", "subjects", "slice_index"):
        assert np.array_equal(getattr(serial, key), getattr(pooled, key)), key
    assert [str(p) for p in pooled.problems] == [str(p) for p in serial.problems]
    assert len(serial.problems) == 1 and "sub-09.nii.gz" in str(serial.problems[0])
    copy = pickle.loads(pickle.dumps(serial.problems[0]))
    assert (copy.path, copy.problem, str(copy)) == (serial.problems[0].path, serial.problems[0].problem,
                                                    str(serial.problems[0]))
