"""Site folders made from site folders: `medgen data split` and `medgen data implant` (synthetic
lesions in real scans), and the anomaly-map post-processing the lesion benchmark uses."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.cli.main import main
from medgen.config import Config, ConfigError, load_config
from medgen.data.cohort import implant_site, split_site
from medgen.data.dataset import LESION, load_site
from medgen.data.errors import DataError
from medgen.data.implant import implant_lesions
from medgen.data.sites import discover_site
from medgen.evaluation.anomaly import postprocess

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_ixi = pytest.mark.skipif(not (SHARED / "ixi-t1" / "scans").is_dir(),
                               reason=f"real scans not found at {SHARED} (see /work/shared/data/README.md)")


def head(rng, shape=(48, 56, 40)):
    """A 2 mm 'head': ellipsoid brain inside a scalp, grey/white-like texture; (image, brain, affine)."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    brain = r < 0.7
    image = np.where(brain, 0.6 + 0.25 * (r < 0.45), 0.1 * (r < 0.98)) + rng.normal(0, 0.02, shape)
    return image.astype(np.float32), brain, np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.mark.parametrize("kind", ["hypo", "hyper"])
def test_implant_changes_exactly_the_mask_towards_its_target(kind):
    image, brain, affine = head(np.random.default_rng(0))
    out = implant_lesions(image, brain, affine, np.random.default_rng(1), kind)
    assert out.mask.any() and not (out.mask & ~brain).any()
    assert np.array_equal(out.image[~out.mask], image[~out.mask])  # nothing else moves
    inside = out.image[out.mask] - image[out.mask]
    assert (inside < 0).mean() > 0.95 if kind == "hypo" else (inside > 0).mean() > 0.95
    assert out.info["kind"] == kind and 1 <= out.info["n_lesions"] <= 3
    assert out.info["volume_ml"] == pytest.approx(out.mask.sum() * 8 / 1000, abs=1e-3)
    again = implant_lesions(image, brain, affine, np.random.default_rng(1), kind)
    assert np.array_equal(again.mask, out.mask)  # the seed decides everything


def test_implant_works_in_anisotropic_oblique_grids_and_refuses_a_tiny_brain():
    image, brain, _ = head(np.random.default_rng(0))
    affine = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, 1.2, 3.0])
    out = implant_lesions(image, brain, affine, np.random.default_rng(2))
    assert out.info["volume_ml"] == pytest.approx(out.mask.sum() * 3.6 / 1000, rel=1e-3)
    tiny = np.zeros_like(brain)
    tiny[20:25, 20:25, 20:25] = True
    with pytest.raises(ValueError, match="too small"):
        implant_lesions(image, tiny, affine, np.random.default_rng(2))


def write_site(folder: Path, n: int, with_masks: bool = True) -> Path:
    """Plain-files site of ``n`` heads, with brain masks in a separate folder ``<folder>-masks``."""
    rng = np.random.default_rng(3)
    masks = folder.parent / f"{folder.name}-masks"
    folder.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        image, brain, affine = head(rng)
        nib.save(nib.Nifti1Image((image * 1000).astype(np.int16), affine), folder / f"s{i:02d}_T1.nii.gz")
        if with_masks:
            nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), masks / f"s{i:02d}_brainmask.nii.gz")
    return masks


def test_split_assigns_every_subject_once_and_pairs_brain_masks(tmp_path):
    masks = write_site(tmp_path / "all", 7)
    cfg = Config().data
    folders = split_site(tmp_path / "all", tmp_path / "sites", ["A", "B", "C"], cfg, seed=0, brain_masks=masks)
    listed = {site: discover_site(folder, cfg) for site, folder in folders.items()}
    subjects = [s.subject for lst in listed.values() for s in lst.scans]
    assert sorted(subjects) == [f"s{i:02d}_T1" for i in range(7)]
    assert sorted(len(lst.scans) for lst in listed.values()) == [2, 2, 3]
    for lst in listed.values():
        assert lst.layout == "manifest" and not lst.problems
        assert all(s.brain_mask.name == s.subject.replace("_T1", "_brainmask.nii.gz") for s in lst.scans)
    split = json.loads((tmp_path / "sites" / "split.json").read_text())
    assert sorted(sum(split["sites"].values(), [])) == sorted(subjects)
    with pytest.raises(DataError, match="not an empty folder"):  # never writes over a site
        split_site(tmp_path / "all", tmp_path / "sites", ["A", "B"], cfg)


def test_split_names_a_scan_without_its_brain_mask(tmp_path):
    masks = write_site(tmp_path / "all", 3)
    (masks / "s01_brainmask.nii.gz").unlink()
    with pytest.raises(DataError, match=r"s01_T1.*0 files named s01_\*"):
        split_site(tmp_path / "all", tmp_path / "sites", ["A"], Config().data, brain_masks=masks)


def test_implant_site_gives_a_lesion_site_that_loads(tmp_path):
    masks = write_site(tmp_path / "all", 4)
    cfg = Config().data
    split_site(tmp_path / "all", tmp_path / "sites", ["H"], cfg, brain_masks=masks)
    folder = implant_site(tmp_path / "sites" / "H", tmp_path / "sites" / "D", cfg, seed=0, fraction=0.5)
    drawn = json.loads((folder / "implant.json").read_text())["scans"]
    assert len(drawn) == 2
    slices = load_site(folder, cfg.model_copy(update={"cache_dir": tmp_path / "cache"}), "D")
    assert len(slices.lesion_subjects) == 2 and (slices.labels == LESION).any()
    assert (slices.lesion & ~slices.brain).sum() == 0
    healthy = [p for p in (folder / "scans").iterdir() if p.is_symlink()]
    assert len(healthy) == 2  # unchanged scans are links to the originals, not copies
    with pytest.raises(DataError, match="implant needs healthy scans"):
        implant_site(folder, tmp_path / "again", cfg)


def test_cli_split_and_implant(tmp_path, capsys):
    masks = write_site(tmp_path / "all", 4)
    assert main(["data", "split", str(tmp_path / "all"), "--out", str(tmp_path / "s"), "--sites", "A,B",
                 "--brain-masks", str(masks)]) == 0
    assert main(["data", "implant", str(tmp_path / "s" / "A"), "--out", str(tmp_path / "s" / "A-lesions"),
                 "--fraction", "1"]) == 0
    assert "2 scans with implanted lesions" in capsys.readouterr().out
    assert main(["data", "implant", str(tmp_path / "s" / "B"), "--out", str(tmp_path / "s" / "A-lesions")]) == 3
    assert "not an empty folder" in capsys.readouterr().err


@needs_ixi
def test_implanted_lesions_in_real_ixi_heads(tmp_path):
    ixi = SHARED / "ixi-t1"
    cfg = Config().data
    names = [f"S{i}" for i in range(35)]  # ~4 subjects per site: a cheap real site
    split_site(ixi / "scans", tmp_path / "sites", names, cfg, brain_masks=ixi / "brainmasks")
    folder = implant_site(tmp_path / "sites" / "S0", tmp_path / "D", cfg, fraction=1.0)
    for scan_id, info in json.loads((folder / "implant.json").read_text())["scans"].items():
        mask = nib.load(folder / "masks" / f"{Path(scan_id).name}_lesion.nii.gz").get_fdata() > 0
        brain = nib.load(next((folder / "brainmasks").glob(Path(scan_id).name.split("_")[0] + "_*"))).get_fdata() > 0
        assert mask.any() and not (mask & ~brain).any()
        assert 0.3 <= info["volume_ml"] <= 60


def test_postprocess_median_and_erosion():
    scores = np.zeros((2, 16, 16), np.float32)
    brain = np.zeros((2, 16, 16), bool)
    brain[:, 2:14, 2:14] = True
    scores[0, 8, 8] = 5.0  # one hot pixel: noise, removed by the median
    scores[1, 6:11, 6:11] = 1.0  # a 5x5 blob: kept
    scores[1, 2, 2:14] = 3.0  # the brain edge: zeroed by erosion
    out = postprocess(scores, brain, median_px=3, erode_px=1)
    assert out.shape == scores.shape and out.dtype == np.float32
    assert out[0].max() == 0 and out[1, 8, 8] == 1.0 and out[1, 2].max() == 0
    assert np.array_equal(postprocess(scores, brain), scores)


def test_median_filter_size_must_be_odd():
    with pytest.raises(ConfigError, match="median_filter_px"):
        load_config(None, ["evaluation.median_filter_px=4"])


@needs_ixi
def test_implant_without_brain_masks_places_lesions_in_the_model_brain_mask(tmp_path):
    """A head with skull and no brain mask: the lesions go where deepbet (data.brain_mask=auto)
    finds brain, in the scan's own (PSR) grid — scored here against the reference parcellation."""
    ixi = SHARED / "ixi-t1"
    cfg = Config().data
    split_site(ixi / "scans", tmp_path / "sites", [f"S{i}" for i in range(35)], cfg)
    folder = implant_site(tmp_path / "sites" / "S1", tmp_path / "D", cfg, fraction=0.25)
    (scan_id,) = json.loads((folder / "implant.json").read_text())["scans"]
    name = Path(scan_id).name
    mask = nib.load(folder / "masks" / f"{name}_lesion.nii.gz").get_fdata() > 0
    reference = nib.load(ixi / "brainmasks" / name.replace("_T1", "_brainmask.nii.gz")).get_fdata() > 0
    assert mask.any() and (mask & reference).sum() >= 0.95 * mask.sum()
