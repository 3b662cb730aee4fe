"""Lesion-detection scores: exact against scikit-learn, by hand, and on detectors of known quality."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from medgen.evaluation import anomaly as A


def disc_brain(n=8, s=32):
    yy, xx = np.mgrid[:s, :s]
    return np.broadcast_to(((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (0.4 * s) ** 2, (n, s, s)).copy()


def lesion_set(n=8, s=32, seed=0):
    """Brains, lesions (a square in every other slice), labels."""
    rng = np.random.default_rng(seed)
    brain = disc_brain(n, s)
    lesion = np.zeros_like(brain)
    for i in range(0, n, 2):
        r, c = rng.integers(s // 3, s // 2, 2)
        lesion[i, r:r + 5, c:c + 5] = True
    return brain, lesion & brain, lesion.any((1, 2)).astype(int)


@pytest.mark.parametrize("levels", [None, 5])  # continuous scores, and scores with many ties
def test_pixel_auroc_auprc_equal_sklearn(levels):
    metrics = pytest.importorskip("sklearn.metrics")
    brain, lesion, _ = lesion_set()
    rng = np.random.default_rng(1)
    scores = rng.random(brain.shape) + 0.3 * lesion
    if levels:
        scores = np.round(scores * levels) / levels
    y, s = lesion[brain], scores[brain]
    assert A.pixel_auroc(scores, lesion, brain) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert A.pixel_auprc(scores, lesion, brain) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)


def test_pixels_outside_the_brain_are_ignored():
    brain, lesion, _ = lesion_set()
    scores = lesion.astype(float)
    scores[~brain] = 10.0  # would ruin both scores if counted
    lesion_out = lesion | ~brain
    assert A.pixel_auroc(scores, lesion_out, brain) == 1.0
    assert A.pixel_auprc(scores, lesion, brain) == 1.0


def test_dice_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    target = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert A.dice(pred, target) == pytest.approx(2 * 2 / (3 + 3))
    assert A.dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert A.dice(np.ones(4, bool), np.zeros(4, bool)) == 0.0
    # global Dice pools slices: (2*1) / (2 + 1) + nothing from the second slice's miss
    scores = np.array([[[0.9, 0.8], [0.1, 0.0]], [[0.0, 0.2], [0.3, 0.1]]])
    lesion = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], bool)
    brain = np.ones_like(lesion)
    assert A.dice_at_threshold(scores, lesion, brain, 0.5) == pytest.approx(2 * 1 / (2 + 2))


def test_perfect_detector():
    brain, lesion, labels = lesion_set()
    scores = lesion * 2.0 + 0.01 * np.random.default_rng(0).random(lesion.shape)  # torch input too
    report = A.anomaly_report(torch.from_numpy(scores), torch.from_numpy(lesion), brain, labels, 1.0)
    assert set(report) == {"pixel_auroc", "pixel_auprc", "dice_at_threshold", "best_dice_upper_bound",
                           "slice_auroc", "threshold"}
    assert report["pixel_auroc"] == 1.0 and report["pixel_auprc"] == 1.0
    assert report["best_dice_upper_bound"] == 1.0 and report["dice_at_threshold"] == 1.0
    assert report["slice_auroc"] == 1.0 and report["threshold"] == 1.0


def test_random_detector_is_at_chance():
    brain, lesion, labels = lesion_set(n=40, s=64, seed=3)
    scores = np.random.default_rng(4).random(brain.shape)
    assert A.pixel_auroc(scores, lesion, brain) == pytest.approx(0.5, abs=0.05)
    chance = lesion[brain].mean()
    assert A.pixel_auprc(scores, lesion, brain) == pytest.approx(chance, abs=0.02)


def test_threshold_from_healthy_gives_5_percent_false_positives():
    assert "lesion" not in " ".join(inspect.signature(A.threshold_from_healthy).parameters)
    assert list(inspect.signature(A.threshold_from_healthy).parameters) == \
        ["scores_healthy", "brain_healthy", "quantile"]
    brain = disc_brain(30, 32)
    rng = np.random.default_rng(0)
    threshold = A.threshold_from_healthy(rng.gamma(2.0, size=brain.shape), brain, 0.95)
    fresh = rng.gamma(2.0, size=brain.shape)
    assert (fresh[brain] > threshold).mean() == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="no brain"):
        A.threshold_from_healthy(fresh, np.zeros_like(brain))


def test_best_dice_bounds_every_threshold():
    brain, lesion, _ = lesion_set(n=6, s=32, seed=5)
    rng = np.random.default_rng(6)
    scores = rng.random(brain.shape) + 0.6 * lesion
    best = A.best_dice(scores, lesion, brain)
    at = [A.dice_at_threshold(scores, lesion, brain, t) for t in np.linspace(-0.1, 1.7, 91)]
    assert best >= max(at) - 1e-12 and best > 0.5
    assert best >= A.best_dice(scores, lesion, brain, n_thresholds=50)
    # the exact maximum is reached at some threshold
    values = np.unique(scores[brain])
    assert max(A.dice_at_threshold(scores, lesion, brain, t) for t in values[::-1][:400]) == pytest.approx(best)


def test_slice_auroc():
    brain, lesion, labels = lesion_set(n=10)
    rng = np.random.default_rng(7)
    scores = rng.random(brain.shape) * 0.5
    scores[labels == 1] += 0.6  # every lesion slice scores higher
    for reduce in A.REDUCTIONS:
        assert A.slice_auroc(scores, brain, labels, reduce) == 1.0
    hot = np.zeros_like(scores)
    hot[:, 16, 16] = 1.0
    hot[0, :4, 10:30] = 5.0  # ... but outside the brain
    assert np.allclose(A.slice_scores(hot, brain, "max"), 1.0)
    top = np.ceil(0.01 * brain[0].sum())
    assert np.allclose(A.slice_scores(hot, brain), 1.0 / top)
    assert np.isnan(A.slice_auroc(scores, brain, np.zeros(10)))


def test_curves_and_undefined_cases():
    brain, lesion, _ = lesion_set(n=20, s=64)
    scores = np.random.default_rng(8).random(brain.shape) + lesion
    fpr, tpr = A.roc_curve(scores, lesion, brain)
    recall, precision = A.pr_curve(scores, lesion, brain)
    for curve in (fpr, tpr, recall, precision):
        assert 2 <= len(curve) <= 200 and np.isfinite(curve).all()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(recall) >= 0) and recall[-1] == 1
    # a rare lesion: the first half of recall lies in the first ~1 % of thresholds; evenly by index, the
    # curve drawn would jump from recall 0 to past 0.5 in one segment
    rng = np.random.default_rng(9)
    rare = rng.random((4, 128, 128)) < 0.005
    recall, precision = A.pr_curve(rng.random(rare.shape) + 0.9 * rare, rare, np.ones_like(rare), max_points=50)
    assert len(recall) <= 50 and recall[0] == 0 and recall[-1] == 1
    assert np.hypot(np.diff(recall), np.diff(precision)).max() < 0.1
    none = np.zeros_like(lesion)
    report = A.anomaly_report(scores, none, brain, np.zeros(20), 0.5)
    assert all(np.isnan(report[k]) for k in report if k != "threshold")
    assert len(A.roc_curve(scores, none, brain)[0]) == 0
    with pytest.raises(ValueError, match="shape"):
        A.pixel_auroc(scores, lesion[:, :10], brain)


def test_references_are_the_no_model_scores_on_the_same_pixels():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.45, 0.55, (6, 16, 16)).astype(np.float32)
    brain = np.zeros((6, 16, 16), bool)
    brain[:, 2:14, 2:14] = True
    lesion = np.zeros_like(brain)
    lesion[3:, 6:9, 6:9] = True
    images[lesion] = 0.95  # bright lesions: exactly what an intensity threshold finds
    labels = np.array([0, 0, 0, 1, 1, 1])
    calib = rng.uniform(0.4, 0.6, (4, 16, 16)).astype(np.float32)
    outlier = A.outlier_calibration(calib, brain[:4], quantile=0.99)
    assert outlier[0] == pytest.approx(np.median(calib[brain[:4]]))
    refs = A.references(images, lesion, brain, labels, outlier)
    p = lesion.sum() / brain.sum()
    assert refs["prevalence"] == pytest.approx(p)
    assert refs["all_brain_dice"] == pytest.approx(2 * p / (1 + p))
    assert refs["brain_area_slice_auroc"] == 0.5  # every slice has the same brain area
    assert refs["outlier_pixel_auroc"] == 1.0 and refs["outlier_dice_at_threshold"] == 1.0
    assert refs["outlier_best_dice_upper_bound"] == 1.0  # the upper bound has a no-model upper bound beside it
    assert refs["outlier_threshold"] == 1.0 and refs["outlier_bright_threshold"] == outlier.bright  # two-sided
    assert refs["outlier_bright_reach"] == pytest.approx((0.95 - outlier.level) / outlier.bright, rel=1e-5)
    assert refs["outlier_dark_reach"] == pytest.approx((outlier.level - images[brain].min()) / outlier.dark, rel=1e-5)
    # a map that says nothing (constant) has one threshold, calling the whole brain lesion: its best
    # Dice is the all-brain Dice 2p/(1+p), the reference the report puts beside best-dice-upper-bound
    assert A.best_dice(np.ones_like(images), lesion, brain) == pytest.approx(2 * p / (1 + p))
    assert A.outlier_calibration(calib[:0], brain[:0], 0.99) is None
    assert "outlier_pixel_auroc" not in A.references(images, lesion, brain, labels, None)
    lesion[0, 0, 0] = True  # a lesion pixel outside the brain is not scored
    assert A.counts(lesion, brain, labels) == {"scored_slices": 6, "scored_lesion_slices": 3,
                                               "scored_pixels": 6 * 12 * 12, "scored_lesion_pixels": 3 * 3 * 3}


def test_brain_area_slice_auroc_by_hand():
    """The no-model slice score is the slice's brain area: areas 10, 20, 30, 40 pixels, slices 2
    and 4 with lesion. Of the 4 (lesion, healthy) pairs, 20 > 10, 40 > 10, 40 > 30 are ranked right
    and 20 < 30 wrong: AUROC 3/4; prevalence 2 / 100 and all-brain Dice 2p/(1+p) = 0.04/1.02."""
    brain = np.zeros((4, 8, 8), bool)
    for i, area in enumerate((10, 20, 30, 40)):
        brain[i].flat[:area] = True
    lesion = np.zeros_like(brain)
    lesion[1].flat[0] = lesion[3].flat[0] = True
    refs = A.references(np.full(brain.shape, 0.5, np.float32), lesion, brain, np.array([0, 1, 0, 1]), None)
    assert refs == pytest.approx({"prevalence": 0.02, "all_brain_dice": 0.04 / 1.02, "brain_area_slice_auroc": 0.75})


def test_outlier_reference_cannot_call_what_lies_within_its_reach():
    """Intensities clipped into [0, 1] and a median of 0.6: |x - 0.6| is at most 0.4 on the bright
    side. With a threshold of 0.45 (set by dark, CSF-like healthy pixels) a bright lesion is never
    called, whatever its contrast: Dice 0 at the threshold, while the ranking (AUROC) still sees it."""
    brain = np.ones((2, 8, 8), bool)
    images = np.full((2, 8, 8), 0.6, np.float32)
    images[0, :2] = 0.0  # 16 dark healthy pixels, score 0.6
    lesion = np.zeros_like(brain)
    lesion[1, 2:4, 2:4] = True
    images[lesion] = 1.0  # 4 bright lesion pixels, score 0.4
    refs = A.references(images, lesion, brain, np.array([0, 1]), (0.6, 0.45))
    assert refs["outlier_bright_reach"] == pytest.approx(0.4) and refs["outlier_dark_reach"] == pytest.approx(0.6)
    assert refs["outlier_dice_at_threshold"] == 0.0
    # lesion pixels (0.4) above the 108 healthy pixels at 0, below the 16 dark ones (0.6)
    assert refs["outlier_pixel_auroc"] == pytest.approx(108 / 124)


# 11 healthy calibration pixels (sorted): median 0.6, a long dark tail (CSF-like), a short bright one
CALIB = np.array([0.0, 0.05, 0.1, 0.55, 0.6, 0.6, 0.6, 0.65, 0.7, 0.8, 0.85], np.float32).reshape(1, 1, 11)


def test_two_sided_outlier_calibration_by_hand():
    """quantile 0.8: numpy's linear quantile of 11 values at p is the value at index 10 p.
    |x - 0.6| sorted: 0 0 0 .05 .05 .1 .2 .25 .5 .55 .6 -> index 8: 0.5 (the symmetric threshold);
    dark max(0.6 - x, 0): seven 0, .05, .5, .55, .6 -> at (1 + 0.8) / 2 = 0.9, index 9: 0.55;
    bright max(x - 0.6, 0): seven 0, .05, .1, .2, .25 -> index 9: 0.2."""
    out = A.outlier_calibration(CALIB, np.ones_like(CALIB, bool), quantile=0.8)
    assert out.two_sided and A.outlier_threshold(out) == 1.0
    assert out == pytest.approx(A.Outlier(0.6, 0.5, 0.55, 0.2), abs=1e-6)
    # the map: each side's deviation over its healthy quantile; 1.0 (dev 0.4) -> 2, 0.0 (dev 0.6) -> 12/11
    m = A.outlier_map(np.array([[[1.0, 0.0, 0.6, 0.7]]], np.float32), np.ones((1, 1, 4), bool), out)
    assert m[0, 0] == pytest.approx([2.0, 0.6 / 0.55, 0.0, 0.5], abs=1e-5)
    # what the healthy calibration pixels themselves get called at threshold 1: 0.0 (0.6 > 0.55) and
    # 0.85 (0.25 > 0.2): 2 of 11, within the 1 - 0.8 budget
    calib_map = A.outlier_map(CALIB, np.ones_like(CALIB, bool), out)
    assert int((calib_map > 1).sum()) == 2


def _scored(kind: str):
    """Two all-brain 4 x 4 slices at the healthy median 0.6: slice 0 healthy with a 0.7 and a 0.1
    (within each side's healthy quantile), slice 1 with one healthy 0.85 (bright deviation 0.25 >
    0.2: a false positive of the two-sided score) and lesion pixels at 1.0 (bright) or 0.0 (dark)."""
    images = np.full((2, 4, 4), 0.6, np.float32)
    images[0, 0, :2], images[0, 1, 0] = 0.7, 0.1
    images[1, 3, 3] = 0.85
    lesion = np.zeros(images.shape, bool)
    if kind in ("bright", "both"):
        lesion[1, 0, :2] = True
        images[1, 0, :2] = 1.0
    if kind in ("dark", "both"):
        lesion[1, 2, :2] = True
        images[1, 2, :2] = 0.0
    return images, lesion, np.ones(images.shape, bool), np.array([0, 1])


@pytest.mark.parametrize("kind, two_sided, symmetric", [
    # bright: 2 lesion pixels + the 0.85 called -> 2*2 / (3 + 2); the symmetric score's threshold 0.5
    # is above the 0.4 a pixel at 1.0 can reach: none called, Dice 0
    ("bright", 0.8, 0.0),
    # dark: 2 lesion pixels + the 0.85 -> 0.8; symmetric: |0 - 0.6| = 0.6 > 0.5, 0.25 < 0.5 -> 1.0
    ("dark", 0.8, 1.0),
    # both: 4 + 1 called -> 8/9; symmetric: only the 2 dark -> 2*2 / (2 + 4)
    ("both", 8 / 9, 2 / 3)])
def test_two_sided_outlier_calls_bright_and_dark_lesions_by_hand(kind, two_sided, symmetric):
    images, lesion, brain, labels = _scored(kind)
    out = A.outlier_calibration(CALIB, np.ones_like(CALIB, bool), quantile=0.8)
    refs = A.references(images, lesion, brain, labels, out)
    assert refs["outlier_dice_at_threshold"] == pytest.approx(two_sided)
    assert refs["outlier_dark_threshold"] == pytest.approx(0.55) and refs["outlier_bright_threshold"] == pytest.approx(0.2)
    old = A.references(images, lesion, brain, labels, (out.level, out.threshold))  # a record without the sides
    assert old["outlier_dice_at_threshold"] == pytest.approx(symmetric)
    assert old["outlier_threshold"] == pytest.approx(0.5) and "outlier_bright_threshold" not in old
    if kind == "bright":  # reach in map units: (1.0 - 0.6) / 0.2 = 2 > 1; the symmetric score: 0.4 < 0.5
        assert refs["outlier_bright_reach"] == pytest.approx(2.0) and old["outlier_bright_reach"] == pytest.approx(0.4)


def test_slice_auroc_and_curves_equal_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    brain, lesion, labels = lesion_set(n=24, s=32, seed=5)
    rng = np.random.default_rng(9)
    scores = np.round(rng.random(brain.shape) * 8) / 8 + 0.4 * lesion  # ties, as in real maps
    per_slice = A.slice_scores(scores, brain)
    assert A.slice_auroc(scores, brain, labels) == pytest.approx(metrics.roc_auc_score(labels, per_slice), abs=1e-12)
    y, s = lesion[brain], scores[brain]
    fpr, tpr = A.roc_curve(scores, lesion, brain, max_points=10**6)
    sk_fpr, sk_tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    recall, precision = A.pr_curve(scores, lesion, brain, max_points=10**6)
    sk_precision, sk_recall, _ = metrics.precision_recall_curve(y, s, drop_intermediate=False)
    # scikit-learn lists them from the lowest threshold up and ends at (recall 0, precision 1)
    np.testing.assert_allclose(recall, sk_recall[::-1], atol=1e-12)
    np.testing.assert_allclose(precision, sk_precision[::-1], atol=1e-12)
