import os

import numpy as np
import pytest
import torch

from conftest import head, make_plain_site, save
from medgen.data import dataset
from medgen.data.dataset import HEALTHY, LESION, SliceDataset, load_site
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

    # a changed file re-processes that subject only, and its stale entry is replaced
    image, _ = head(seed=42)
    save(site / "sub-01.nii.gz", image)
    st = (site / "sub-01.nii.gz").stat()
    os.utime(site / "sub-01.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_site(site, cfg.data)
    assert calls == ["sub-01"]
    cache_dir = next((tmp_path / "cache").iterdir())
    assert len(list(cache_dir.glob("sub-01-*.npz"))) == 1

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
    assert "sub-00_mask.nii.gz: lesion mask is empty but subject 'sub-00' is labelled lesion" in text
    assert "sub-01_mask.nii.gz: lesion mask is not empty but subject 'sub-01' is labelled healthy" in text


def test_lesion_label_without_mask_labels_every_slice(tmp_path, cfg):
    site = make_plain_site(tmp_path / "A", n_healthy=1, n_lesion=0)
    (site / "manifest.csv").write_text("image,label\nsub-00.nii.gz,lesion\n")
    s = load_site(site, cfg.data)
    assert np.all(s.labels == LESION) and not s.lesion.any()
    assert any("without a lesion mask" in n for n in s.notes)


def test_missing_folder(tmp_path, cfg):
    with pytest.raises(DataError, match="does not exist"):
        load_site(tmp_path / "nowhere", cfg.data)
