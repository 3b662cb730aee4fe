"""Calibration on patient cohorts and the evaluation guards: a held-out site with only patients
gets a Dice at a threshold the training sites fixed on their healthy validation slices (its source
named), a class no training site held gets no samples or distances, a site of another contrast is
flagged; plus what a site accepts from the server in an EvaluationPlan."""

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_DATA, head, save
from medgen.config import load_config
from medgen.data.dataset import HEALTHY, LESION, SiteSlices
from medgen.evaluation import anomaly
from medgen.evaluation.evaluate import evaluate_checkpoint
from medgen.evaluation.plan import OWN_HEALTHY, THRESHOLD_PREFIX, TRAINING_SITES, EvaluationPlan, pooled_thresholds
from medgen.evaluation.site import anomaly_metrics, split_for_threshold
from medgen.models import build_model
from medgen.server.guards import contrast_key, js_divergence, shift_warnings, trained_classes
from medgen.server.rundir import RunDir
from test_federation import federate


# ------------------------------------------------------------------------------------ units
def test_plan_round_trip_and_what_a_site_refuses_to_read():
    plan = EvaluationPlan((HEALTHY,), {"": 0.25, "@t=800": 0.5, "/outlier": 0.1}, send_calibration=True)
    assert EvaluationPlan.from_config(plan.to_config()) == plan
    hostile = {"trained-classes": [0, 7], "send-calibration": "yes", THRESHOLD_PREFIX: float("nan"),
               THRESHOLD_PREFIX + "@t=1": float("inf"), THRESHOLD_PREFIX + "/../../etc": 1.0,
               THRESHOLD_PREFIX + "@t=2": "0.3", THRESHOLD_PREFIX + "@t=3": True}
    read = EvaluationPlan.from_config(hostile)
    assert read == EvaluationPlan()  # every class, no threshold, no calibration asked
    assert EvaluationPlan.from_config({}) == EvaluationPlan()


def test_pooled_threshold_is_the_pixel_weighted_mean_of_the_sites_quantiles():
    results = {"A": {"calibration-pixels": 100.0, THRESHOLD_PREFIX: 0.2, THRESHOLD_PREFIX + "@t=5": 1.0},
               "B": {"calibration-pixels": 300.0, THRESHOLD_PREFIX: 0.6, THRESHOLD_PREFIX + "@t=5": 2.0},
               "C": {"loss": 1.0}}  # no healthy slices: no share
    assert pooled_thresholds(results) == pytest.approx({"": 0.5, "@t=5": 1.75})
    assert pooled_thresholds({"C": {"loss": 1.0}}) == {}


def test_trained_classes_from_the_training_sites_summaries():
    healthy_only = {"A": {"train-examples": 10, "train-lesion-slices": 0},
                    "B": {"train-examples": 8, "train-lesion-slices": 0}, "C": {"train-examples": 0}}
    assert trained_classes(healthy_only, ["A", "B"]) == (HEALTHY,)
    healthy_only["B"]["train-lesion-slices"] = 3
    assert trained_classes(healthy_only, ["A", "B"]) == (HEALTHY, LESION)
    assert trained_classes({"A": {"train-examples": 4}}, ["A"]) == (HEALTHY, LESION)  # no counts: assume both


def test_intensity_and_contrast_shift_warnings():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([1, 1], [2, 2]) == pytest.approx(0.0)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 1/2 [1/2 log2(2/3) + 1/2 log2 2] + 1/2 log2(4/3)
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(0.5 * (0.5 * np.log2(2 / 3) + 0.5) + 0.5 * np.log2(4 / 3))
    assert contrast_key("T1w") == contrast_key("t1") == "t1" and contrast_key("unknown") == ""
    t1 = {"contrasts": ["T1w"], "intensity-hist": [0.5, 0.5, 0, 0], "train-examples": 10, "eval-examples": 2}
    summaries = {"A": t1, "B": t1, "D": {**t1, "contrasts": ["T1"]},
                 "E": {**t1, "contrasts": ["FLAIR"]}, "F": {**t1, "contrasts": ["unknown"], "intensity-hist": [0, 0, .5, .5]}}
    found = shift_warnings(summaries, ["A", "B"], ["A", "B", "D", "E", "F"], max_shift=0.15)
    assert set(found) == {"E", "F"}
    assert "contrast flair differs from the training sites' (t1)" in found["E"][0]
    assert "1.000 bits" in found["F"][0] and "evaluation.max_intensity_shift=0.15" in found["F"][0]


def test_per_volume_scores_by_hand():
    brain = np.ones((4, 4, 4), bool)
    lesion = np.zeros_like(brain)
    lesion[0, 0, :2] = True  # subject a: 2 of 32 pixels
    lesion[2, :2, :2] = True  # subject b: 4 of 32 pixels
    scores = lesion.astype(np.float32)
    scores[2, 3, 3] = 1.0  # one false positive in b
    subjects = np.array(["a", "a", "b", "b"])
    out = anomaly.per_volume(scores, lesion, brain, subjects, threshold=0.5)
    assert out["volumes"] == 2
    assert out["volume_dice_at_threshold"] == pytest.approx((1.0 + 8 / 9) / 2)  # b: 2*4 / (5 + 4)
    assert out["volume_pixel_auprc"] == pytest.approx((1.0 + 0.8) / 2)  # b: all 4 lesion pixels tie with 1 healthy
    assert out["volume_prevalence"] == pytest.approx((2 / 32 + 4 / 32) / 2)
    assert out["volume_all_brain_dice"] == pytest.approx(np.mean([2 * p / (1 + p) for p in (2 / 32, 4 / 32)]))
    assert anomaly.per_volume(scores, np.zeros_like(lesion), brain, subjects, 0.5)["volumes"] == 0


def _patients_only():
    """8 slices of 4 patients (every subject has a lesion): no healthy subject to fix a threshold on."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.3, 0.5, (8, 16, 16)).astype(np.float32)
    brain = np.zeros((8, 16, 16), bool)
    brain[:, 2:14, 2:14] = True
    lesion = np.zeros_like(brain)
    lesion[::2, 6:10, 6:10] = True
    images[lesion] = 0.9
    labels = np.where(lesion.any((1, 2)), LESION, HEALTHY)
    return SiteSlices("P", images, brain, lesion, labels, np.repeat(["p0", "p1", "p2", "p3"], 2), np.arange(8))


@pytest.mark.parametrize("calibration, source", [("auto", 0), ("training-sites", 0), ("outside-lesions", 3)])
def test_a_site_with_only_patients_names_where_its_threshold_came_from(calibration, source):
    cfg = load_config(None, ["model.width=8", "model.latent_dim=8", "data.image_size=16", "evaluation.median_filter_px=0",
                             f"evaluation.calibration={calibration}"])
    model = build_model(cfg).eval()
    data = _patients_only()
    metrics, _, _ = anomaly_metrics(model, data, cfg)
    assert metrics["threshold-source"] == source and metrics["n-scored-slices"] == 8  # nothing held apart
    assert np.isnan(metrics["dice-at-threshold"]) == (source == 0)
    if source == 3:
        assert "reference-outlier-dice-at-threshold" in metrics
    if calibration == "outside-lesions":
        return
    told = EvaluationPlan(thresholds={"": 0.0, "/outlier-level": 0.4, "/outlier": 0.3})
    metrics, _, overlays = anomaly_metrics(model, data, cfg, told)
    assert metrics["threshold-source"] == TRAINING_SITES and metrics["threshold"] == 0.0
    # threshold 0: every brain pixel with a positive score is called lesion
    assert 0 < metrics["dice-at-threshold"] <= metrics["reference-all-brain-dice"] + 1e-9
    assert metrics["reference-outlier-dice-at-threshold"] == 1.0  # |0.9 - 0.4| > 0.3 > |U(0.3, 0.5) - 0.4|
    # with the per-side quantiles (since 2026-12-03) the reference is two-sided; an old record above is not
    told = EvaluationPlan(thresholds={"": 0.0, "/outlier-level": 0.4, "/outlier": 0.3, "/outlier-dark": 0.1,
                                      "/outlier-bright": 0.1})
    assert EvaluationPlan.from_config(told.to_config()) == told
    metrics, _, _ = anomaly_metrics(model, data, cfg, told)
    assert metrics["reference-outlier-threshold"] == 1.0 and metrics["reference-outlier-bright-threshold"] == 0.1
    assert metrics["reference-outlier-dice-at-threshold"] == 1.0  # (0.9 - 0.4) / 0.1 > 1 >= |U(0.3, 0.5) - 0.4| / 0.1
    assert metrics["volumes"] == 4 and metrics["n-scored-subjects"] == 4


def test_one_healthy_subject_fixes_the_threshold_and_is_not_scored():
    """The phantom demo's training sites: validation subjects are one healthy subject and patients."""
    cfg = load_config(None, ["model.width=8", "model.latent_dim=8", "data.image_size=16", "evaluation.median_filter_px=0"])
    model = build_model(cfg).eval()
    p = _patients_only()
    data = SiteSlices("P", p.images, p.brain, p.lesion, p.labels, np.repeat(["p0", "p1", "h0", "p3"], 2), p.slice_index)
    data.lesion[4:6], data.labels[4:6] = False, HEALTHY  # h0: no lesion slice
    calib, scored = split_for_threshold(data, cfg.seed)
    assert calib.tolist() == [False] * 4 + [True] * 2 + [False] * 2 and (scored == ~calib).all()
    metrics, _, _ = anomaly_metrics(model, data, cfg)
    assert metrics["threshold-source"] == OWN_HEALTHY and np.isfinite(metrics["dice-at-threshold"])
    assert metrics["n-calibration-slices"] == 2 and metrics["n-scored-slices"] == 6 and metrics["n-scored-subjects"] == 3


# ------------------------------------------------------------------------------------ a federation
def _site(folder, contrast, lesion_subjects, healthy_subjects, seed):
    for i in range(lesion_subjects + healthy_subjects):
        image, mask = head(seed=seed + i, lesion_centre=(14, 24, 20) if i < lesion_subjects else None, lesion_radius=6)
        save(folder / f"case{i:02d}_{contrast}.nii.gz", image)
        if i < lesion_subjects:
            save(folder / f"case{i:02d}_{contrast}_mask.nii.gz", mask)


def test_patients_only_heldout_site_and_an_untrained_lesion_class(tmp_path):
    """Training sites A, B hold only healthy T1 subjects; held-out site C only FLAIR patients. C's
    Dice uses the training sites' pooled threshold, named; nothing lesion-class is generated or
    measured; C's page is warned about its contrast."""
    _site(tmp_path / "data" / "A", "T1", 0, 5, seed=0)
    _site(tmp_path / "data" / "B", "T1", 0, 5, seed=10)
    _site(tmp_path / "data" / "C", "FLAIR", 3, 0, seed=20)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", *FAST_DATA,
                             "sites.train=[A,B]", "sites.heldout=[C]", "federation.rounds=1", "train.local_steps=2",
                             "train.batch_size=8", "model.width=8", "model.latent_dim=8", "data.image_size=32",
                             "federation.samples_per_class=2", "evaluation.max_samples=8", "train.val_fraction=0.4",
                             "evaluation.membership_inference=false"])
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    federate(cfg, run.path)
    records = run.records()
    c = next(r for r in records if r["phase"] == "evaluate" and r["site"] == "C")
    trainers = [r for r in records if r["phase"] == "evaluate" and r["site"] in ("A", "B")]
    assert c["threshold-source"] == TRAINING_SITES and np.isfinite(c["dice-at-threshold"])
    pixels = [r["calibration-pixels"] for r in trainers]
    assert c["threshold"] == pytest.approx(
        sum(r[THRESHOLD_PREFIX] * n for r, n in zip(trainers, pixels)) / sum(pixels))
    assert "reference-outlier-pixel-auroc" in c and c["volumes"] == 3
    assert not [k for r in trainers + [c] for k in r if k.endswith("-lesion")]  # no lesion-class distances
    assert "radfd-healthy" in c and c["n-real-healthy"] > 0
    assert any("contrast flair differs from the training sites' (t1)" in w for w in c["warnings"])
    assert any("class 'lesion' never trained" in w for w in c["warnings"])
    with Image.open(run.samples / "round-0001.png") as grid:  # one row: healthy only (2 px padding)
        assert grid.size[1] == 32 + 2 * 2
    # `medgen evaluate` on the checkpoint reads the same plan from the run's records
    again = evaluate_checkpoint(run.last_checkpoint(), tmp_path / "data" / "C", out=tmp_path / "again", log=lambda _: None)
    record = next(r for r in again.records() if r["phase"] == "evaluate")
    assert record["threshold-source"] == TRAINING_SITES and record["threshold"] == pytest.approx(c["threshold"])
    assert any("class 'lesion' never trained" in w for w in record["warnings"])
    # the pages say it: where C's threshold came from, the warnings (once per text), one sample row
    from medgen.evaluation.report import build_report

    index = build_report(run.path).read_text()
    page = (run.path / "report" / "site-C.html").read_text()
    assert "fixed on the training sites&#39; healthy validation slices" in page
    assert "contrast flair differs" in page and index.count("never trained") == 1
    assert "One row: healthy (the only class that trained)" in index
    assert "volume-dice-at-threshold" in page and "n=3 volumes" in page
