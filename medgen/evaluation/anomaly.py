"""Scores of unsupervised lesion detection: anomaly maps against lesion masks.

Inputs, numpy or torch, (N, S, S) or (N, 1, S, S): anomaly ``scores`` ≥ 0 (higher = more
abnormal), ``lesion`` masks (bool), ``brain`` masks (bool); slice ``labels`` (N,) 0 = healthy,
1 = lesion. Pixel-level scores count brain pixels only (lesion pixels outside the brain mask are
ignored), pooled over all slices. Every score is computed exactly (sort-based, ties handled as
scikit-learn does) with numpy, and is NaN where it is undefined (e.g. no lesion pixel), never an
exception in the middle of a report.

The threshold that turns a map into a segmentation is fixed on healthy validation slices
(:func:`threshold_from_healthy`) and never sees a lesion mask; :func:`best_dice` does look at the
masks and is reported as an upper bound only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

MAX_CURVE_POINTS = 200


def _arr(x, name: str, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name}: expected (N, S, S) or (N, 1, S, S), got shape {x.shape}")
    return x


def _maps(scores, lesion=None, brain=None) -> tuple[np.ndarray, ...]:
    out = [_arr(scores, "scores", np.float64)]
    for mask, name in ((lesion, "lesion"), (brain, "brain")):
        if mask is not None:
            m = _arr(mask, name).astype(bool)
            if m.shape != out[0].shape:
                raise ValueError(f"{name} shape {m.shape} differs from scores shape {out[0].shape}")
            out.append(m)
    if not np.isfinite(out[0]).all():
        raise ValueError("scores contain NaN or inf")
    return tuple(out)


def _brain_pixels(scores, lesion, brain) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is-lesion) of the brain pixels, flattened over all slices."""
    s, les, br = _maps(scores, lesion, brain)
    return s[br], les[br]


def _clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive counts when predicting ``s >= t`` for every distinct score ``t``,
    from the highest score down (tied scores enter together): (fps, tps, thresholds)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    return fps, tps, s[last]


def _roc(y, s):
    fps, tps, thr = _clf_curve(y, s)
    fpr = np.r_[0.0, fps / fps[-1]] if fps[-1] > 0 else np.full(len(fps) + 1, np.nan)
    tpr = np.r_[0.0, tps / tps[-1]] if tps[-1] > 0 else np.full(len(tps) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def _pr(y, s):
    """Precision and recall at each distinct threshold, highest first, plus the (recall 0, precision 1) start."""
    fps, tps, thr = _clf_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.full(len(tps), np.nan)
    return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thr]


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    if len(y) == 0 or y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = _roc(y, s)
    return float(np.trapezoid(tpr, fpr))


def auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` (N,) for binary ``labels`` (N,): 0.5 = chance; NaN
    with one class only."""
    return _auroc(np.asarray(labels, bool), np.asarray(scores, np.float64))


def average_precision(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, as scikit-learn's
    ``average_precision_score``) of ``scores`` (N,) for binary ``labels`` (N,): chance = the positive
    fraction; NaN without a positive."""
    y, s = np.asarray(labels, bool), np.asarray(scores, np.float64)
    if not y.any():
        return float("nan")
    precision, recall, _ = _pr(y, s)
    return float(np.sum(np.diff(recall) * precision[1:]))


def pixel_auroc(scores, lesion, brain) -> float:
    """Pixel-level area under the ROC curve in [0, 1] (0.5 = chance): the probability that a lesion
    pixel scores higher than a healthy-tissue pixel (ties count one half), over the brain pixels of
    all slices pooled; equals scikit-learn's ``roc_auc_score`` on those pixels. NaN when the brain
    pixels hold no lesion pixel or only lesion pixels."""
    s, y = _brain_pixels(scores, lesion, brain)
    return _auroc(y, s)


def pixel_auprc(scores, lesion, brain) -> float:
    """Pixel-level area under the precision-recall curve in [0, 1] as average precision,
    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation), over the
    brain pixels of all slices pooled — the definition of scikit-learn's
    ``average_precision_score``. Chance level is the lesion fraction of brain pixels, so unlike the
    AUROC it reflects how small lesions are. NaN when there is no lesion pixel."""
    s, y = _brain_pixels(scores, lesion, brain)
    return average_precision(y, s)


def postprocess(scores, brain, median_px: int = 0, erode_px: int = 0) -> np.ndarray:
    """The usual post-processing of unsupervised anomaly maps (Baur et al., 2021): a per-slice
    ``median_px`` x ``median_px`` median filter (0: none; odd), then 0 within ``erode_px`` pixels of
    the brain-mask edge (0: none), where reconstructions err on every subject. ``scores`` and
    ``brain`` (N, S, S); returns (N, S, S) float32 >= 0. Applied alike to the healthy slices that
    fix the threshold and to the slices scored."""
    s, br = _maps(scores, brain=brain)
    if median_px > 1:
        s = ndimage.median_filter(s, size=(1, median_px, median_px), mode="nearest")
    if erode_px > 0:
        inner = ndimage.binary_erosion(br, structure=np.ones((1, 3, 3), bool), iterations=erode_px)
        s = np.where(inner, s, 0.0)
    return s.astype(np.float32)


def threshold_from_healthy(scores_healthy, brain_healthy, quantile: float = 0.95) -> float:
    """The anomaly threshold fixed on HEALTHY validation slices: the ``quantile`` of their brain
    pixels' scores, so that about 1 - ``quantile`` (5%) of healthy brain pixels of that distribution
    score above it (false positives). Pixels are called lesion when ``score > threshold``. It takes
    no lesion mask by construction: the threshold cannot have seen the masks it will be scored on.
    ``scores_healthy`` (N, S, S), ``brain_healthy`` (N, S, S) bool."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    s, brain = _maps(scores_healthy, brain_healthy)
    values = s[brain]
    if values.size == 0:
        raise ValueError("no brain pixel in the healthy slices: cannot fix a threshold")
    return float(np.quantile(values, quantile))


def dice(pred, target) -> float:
    """Dice coefficient 2|P ∩ T| / (|P| + |T|) in [0, 1] of two boolean arrays of any (equal)
    shape, pooled over all elements; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2 * (p & t).sum() / total)


def dice_at_threshold(scores, lesion, brain, threshold: float) -> float:
    """Global Dice of the segmentation ``score > threshold`` (inside the brain) against the lesion
    masks (inside the brain), with all slices pooled into one volume — the standard "Dice" of
    unsupervised anomaly segmentation. NaN when no brain pixel is a lesion pixel or the threshold
    is NaN."""
    s, les, br = _maps(scores, lesion, brain)
    if not (les & br).any() or np.isnan(threshold):
        return float("nan")
    return dice((s > threshold) & br, les & br)


def best_dice(scores, lesion, brain, n_thresholds: int | None = None) -> float:
    """The best global Dice over thresholds, in [0, 1] — an UPPER BOUND, not a result: choosing the
    threshold looks at the lesion masks being scored. ``n_thresholds=None`` (default) tries every
    distinct score (exact, one sort); an int tries that many evenly spaced quantiles of the brain
    pixels' scores instead (the coarse search of several papers; never higher than the exact
    value). NaN when no brain pixel is a lesion pixel."""
    s, y = _brain_pixels(scores, lesion, brain)
    if not y.any():
        return float("nan")
    if n_thresholds is None:
        fps, tps, _ = _clf_curve(y, s)  # predicting s >= t for each distinct t
        return float(np.max(2 * tps / (tps + fps + y.sum())))
    thresholds = np.unique(np.quantile(s, np.linspace(0, 1, n_thresholds)))
    return max(dice(s >= t, y) for t in thresholds)


REDUCTIONS = ("mean_top1pct", "max", "mean")


def slice_scores(scores, brain, reduce: str = "mean_top1pct") -> np.ndarray:
    """(N,) one score per slice from its brain pixels: ``"mean_top1pct"`` the mean of the highest
    1% of its brain pixels (at least one pixel: robust to a single hot pixel yet sensitive to small
    lesions), ``"max"`` the highest, ``"mean"`` the mean. 0 for a slice without brain."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    s, br = _maps(scores, None, brain)
    flat = np.where(br, s, -np.inf).reshape(len(s), -1)
    count = br.reshape(len(s), -1).sum(1)
    if reduce == "mean":
        return np.where(count > 0, np.where(br, s, 0).reshape(len(s), -1).sum(1) / np.maximum(count, 1), 0.0)
    top = np.maximum(np.ceil(0.01 * count).astype(int), 1) if reduce == "mean_top1pct" else np.ones_like(count)
    ordered = -np.sort(-flat, axis=1)  # descending; non-brain (-inf) last
    ranks = np.arange(flat.shape[1])[None, :]
    picked = np.where(ranks < top[:, None], ordered, 0.0)
    return np.where(count > 0, picked.sum(1) / top, 0.0)


def slice_auroc(scores, brain, labels, reduce: str = "mean_top1pct") -> float:
    """Slice-level AUROC in [0, 1]: how well one score per slice (:func:`slice_scores`, by default
    the mean of its top 1% brain pixels) separates lesion slices (label 1) from healthy ones
    (label 0). NaN when only one class is present."""
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(bool).ravel()
    per_slice = slice_scores(scores, brain, reduce)
    if len(y) != len(per_slice):
        raise ValueError(f"{len(y)} labels for {len(per_slice)} slices")
    return _auroc(y, per_slice)


def intensity_outlier(images, brain, level: float) -> np.ndarray:
    """The symmetric no-model score |x - ``level``| inside ``brain`` (0 outside), ``level`` being the
    median brain intensity of healthy slices. (N, S, S) float32 >= 0. The reference before
    2026-12-03 (and for records that carry no per-side threshold): with intensities clipped into
    [0, 1] and a median near 0.6, the bright side reaches at most ~0.4, below a threshold set by the
    dark side, so it could call no bright pixel. :func:`outlier_map` is the two-sided one."""
    x, br = _maps(images, brain=brain)
    return np.where(br, np.abs(x - level), 0.0).astype(np.float32)


class Outlier(NamedTuple):
    """The calibration of the intensity-outlier reference, fixed on healthy brain pixels (numbers only):
    ``level`` the median intensity, ``threshold`` the ``quantile`` of the symmetric score
    :func:`intensity_outlier`, and per side the ``(1 + quantile) / 2`` quantile of the post-processed
    darker-than-median (``dark``) and brighter-than-median (``bright``) deviation. Without ``dark`` /
    ``bright`` (a record from before 2026-12-03) the symmetric score is used."""
    level: float
    threshold: float
    dark: float | None = None
    bright: float | None = None

    @property
    def two_sided(self) -> bool:
        return self.dark is not None and self.bright is not None


def outlier_sides(images, brain, level: float, median_px: int = 0, erode_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(dark, bright): max(``level`` - x, 0) and max(x - ``level``, 0) inside ``brain``, each
    post-processed (:func:`postprocess`). (N, S, S) float32 >= 0 each."""
    x, br = _maps(images, brain=brain)
    return (postprocess(np.where(br, np.maximum(level - x, 0.0), 0.0), br, median_px, erode_px),
            postprocess(np.where(br, np.maximum(x - level, 0.0), 0.0), br, median_px, erode_px))


def outlier_map(images, brain, outlier: Outlier, median_px: int = 0, erode_px: int = 0) -> np.ndarray:
    """The intensity-outlier reference's post-processed map. Two-sided (``outlier.dark`` and
    ``bright`` set): max(dark / ``outlier.dark``, bright / ``outlier.bright``) of
    :func:`outlier_sides`, so that a pixel is called (map > 1, :func:`outlier_threshold`) when its
    deviation on either side exceeds that side's healthy quantile: each side gets half the healthy
    false-positive budget, 1 - quantile in all at most, and a bright lesion is called as readily as a
    dark one. Otherwise the symmetric :func:`intensity_outlier`, post-processed. (N, S, S) float32."""
    if not outlier.two_sided:
        return postprocess(intensity_outlier(images, brain, outlier.level), brain, median_px, erode_px)
    dark, bright = outlier_sides(images, brain, outlier.level, median_px, erode_px)
    tiny = np.finfo(np.float32).tiny  # a side whose healthy quantile is 0: any deviation there is called
    return np.maximum(dark / max(outlier.dark, tiny), bright / max(outlier.bright, tiny)).astype(np.float32)


def outlier_threshold(outlier: Outlier) -> float:
    """The threshold of :func:`outlier_map`: 1 for the two-sided map, ``outlier.threshold`` otherwise."""
    return 1.0 if outlier.two_sided else float(outlier.threshold)


def outlier_calibration(images, brain, quantile: float, median_px: int = 0,
                        erode_px: int = 0) -> Outlier | None:
    """The :class:`Outlier` calibration fixed on healthy calibration pixels ``images`` inside ``brain``
    (N, S, S), post-processed like the model's maps: the median ``level``, the ``quantile`` of the
    symmetric score (``threshold``) and the ``(1 + quantile) / 2`` quantile of each side's deviation
    (``dark``, ``bright``). None without a calibration pixel."""
    x, br = _maps(images, brain=brain)
    if not br.any():
        return None
    level = float(np.median(x[br]))
    calib = postprocess(intensity_outlier(x, br, level), br, median_px, erode_px)
    dark, bright = outlier_sides(x, br, level, median_px, erode_px)
    side_q = (1.0 + quantile) / 2.0
    return Outlier(level, threshold_from_healthy(calib, br, quantile), threshold_from_healthy(dark, br, side_q),
                   threshold_from_healthy(bright, br, side_q))


def references(images, lesion, brain, labels, outlier: Outlier | tuple | None,
               median_px: int = 0, erode_px: int = 0, subjects=None) -> dict[str, float]:
    """The trivial references of lesion detection, on the scored slices themselves (``images``,
    ``lesion``, ``brain`` (N, S, S), ``labels`` (N,)): ``prevalence`` (the AUPRC of a random score),
    ``all_brain_dice`` (the Dice of calling the whole brain lesion, 2p/(1+p)),
    ``brain_area_slice_auroc`` (a slice scored by its brain area alone), and the intensity-outlier
    score (:func:`outlier_map`: two-sided with a calibration from :func:`outlier_calibration`, the
    symmetric |x - level| with an old (level, threshold) pair) as ``outlier_*`` (its best Dice too: the
    upper bound of a model is compared with the outlier score's upper bound), post-processed like the
    model's maps (None: left out). With the slices' ``subjects`` (N,), also the outlier score's
    :func:`per_volume` Dice and AUPRC. With ``outlier``, also its ``outlier_threshold`` (1 for the
    two-sided map; ``outlier_dark_threshold`` / ``outlier_bright_threshold`` then give each side's
    healthy quantile) and how far the map reaches on each side of the level on these brain pixels
    before post-processing (``outlier_bright_reach``, ``outlier_dark_reach``, in the map's units; the
    median filter cannot raise them): a side whose reach is below the threshold is one the score can
    never call."""
    _, les, br = _maps(images, lesion, brain)
    y = np.asarray(labels).astype(bool).ravel()
    out = {"prevalence": float((les & br).sum() / max(int(br.sum()), 1)),
           "all_brain_dice": dice(br, les & br) if (les & br).any() else float("nan"),
           "brain_area_slice_auroc": _auroc(y, br.reshape(len(br), -1).sum(1).astype(np.float64))}
    if outlier is None:
        return out
    outlier = Outlier(*outlier)
    threshold = outlier_threshold(outlier)
    x = _arr(images, "images", np.float64)[br]
    bright, dark = float(x.max(initial=outlier.level) - outlier.level), float(outlier.level - x.min(initial=outlier.level))
    if outlier.two_sided:  # in the map's units: each side divided by its healthy quantile
        tiny = np.finfo(np.float32).tiny
        bright, dark = bright / max(outlier.bright, tiny), dark / max(outlier.dark, tiny)
        out.update({"outlier_dark_threshold": float(outlier.dark), "outlier_bright_threshold": float(outlier.bright)})
    out.update({"outlier_threshold": threshold, "outlier_bright_reach": bright, "outlier_dark_reach": dark})
    maps = outlier_map(images, brain, outlier, median_px, erode_px)
    report = anomaly_report(maps, lesion, brain, labels, threshold)
    if subjects is not None:
        volume = per_volume(maps, lesion, brain, subjects, threshold)
        report.update({k: volume[k] for k in ("volume_dice_at_threshold", "volume_pixel_auprc")})
    out.update({f"outlier_{k}": v for k, v in report.items() if k != "threshold"})
    return out


def per_volume(scores, lesion, brain, subjects, threshold: float) -> dict[str, float]:
    """Per-volume scores as the UAD literature reports them (Baur et al., 2021): for each subject
    with a lesion pixel among these slices (``subjects`` (N,) names the subject of each slice), the
    Dice at ``threshold`` and the AUPRC over its own slices, averaged over subjects
    (``volume_dice_at_threshold``, ``volume_pixel_auprc``), with the same subject-averaged
    references (``volume_prevalence`` = random AUPRC, ``volume_all_brain_dice``) and ``volumes`` =
    the number of subjects. NaN (and 0 volumes) without a lesion."""
    s, les, br = _maps(scores, lesion, brain)
    subjects = np.asarray(subjects)
    rows = []
    for subject in np.unique(subjects):
        at = subjects == subject
        if not (les[at] & br[at]).any():
            continue
        p = float((les[at] & br[at]).sum() / br[at].sum())
        rows.append((dice_at_threshold(s[at], les[at], br[at], threshold), pixel_auprc(s[at], les[at], br[at]),
                     p, 2 * p / (1 + p)))
    names = ("volume_dice_at_threshold", "volume_pixel_auprc", "volume_prevalence", "volume_all_brain_dice")
    means = np.mean(rows, axis=0) if rows else np.full(4, np.nan)
    return {**{k: float(v) for k, v in zip(names, means)}, "volumes": float(len(rows))}


def counts(lesion, brain, labels) -> dict[str, int]:
    """What the lesion scores of a set of slices stand on: ``scored_slices`` (of them
    ``scored_lesion_slices``, label 1) for slice AUROC, ``scored_pixels`` (brain pixels; of them
    ``scored_lesion_pixels``) for the pixel scores and Dice."""
    les, br = _arr(lesion, "lesion").astype(bool), _arr(brain, "brain").astype(bool)
    y = np.asarray(labels).astype(bool).ravel()
    return {"scored_slices": len(br), "scored_lesion_slices": int(y.sum()), "scored_pixels": int(br.sum()),
            "scored_lesion_pixels": int((les & br).sum())}


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of the polyline (x, y), both in [0, 1], spaced evenly along its length
    (first and last kept). Evenly by index would not do: a PR curve's first quarter of recall can sit
    in its first 0.5 % of thresholds, and would be drawn as one straight segment."""
    n = len(x)
    if n <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    keep = np.searchsorted(length, np.linspace(0.0, length[-1], max_points - 1), side="left")
    keep = np.unique(np.clip(np.concatenate([[0], keep, [n - 1]]), 0, n - 1))
    return x[keep], y[keep]


def roc_curve(scores, lesion, brain, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level ROC curve over brain pixels for plots: (false positive rate, true positive rate),
    each (≤ ``max_points``,) from (0, 0) to (1, 1), points kept evenly along the exact curve's
    length (first and last always). Empty arrays when a class is missing."""
    s, y = _brain_pixels(scores, lesion, brain)
    if len(y) == 0 or y.all() or not y.any():
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = _roc(y, s)
    return _downsample(fpr, tpr, max_points=max_points)


def pr_curve(scores, lesion, brain, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level precision-recall curve over brain pixels for plots: (recall, precision), each
    (≤ ``max_points``,), recall rising from 0 to 1, downsampled like :func:`roc_curve`. Empty arrays
    when there is no lesion pixel."""
    s, y = _brain_pixels(scores, lesion, brain)
    if not y.any():
        return np.zeros(0), np.zeros(0)
    precision, recall, _ = _pr(y, s)
    return _downsample(recall, precision, max_points=max_points)


def anomaly_report(scores, lesion, brain, labels, threshold: float) -> dict[str, float]:
    """Every lesion-detection score of one set of maps: ``pixel_auroc``, ``pixel_auprc``,
    ``dice_at_threshold`` (at ``threshold``, from :func:`threshold_from_healthy`),
    ``best_dice_upper_bound`` (:func:`best_dice`: looks at the masks), ``slice_auroc`` and the
    ``threshold`` itself; NaN for what is undefined on these slices."""
    return {
        "pixel_auroc": pixel_auroc(scores, lesion, brain),
        "pixel_auprc": pixel_auprc(scores, lesion, brain),
        "dice_at_threshold": dice_at_threshold(scores, lesion, brain, threshold),
        "best_dice_upper_bound": best_dice(scores, lesion, brain),
        "slice_auroc": slice_auroc(scores, brain, labels),
        "threshold": float(threshold),
    }
