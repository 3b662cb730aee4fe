"""The full evaluation of a model on one site's slices, run where the data is.

Only numbers leave the site (and, with ``evaluation.share_images``, a few overlays for the report):

- per class (healthy / lesion): generated images vs the site's real slices of that class — RadFD-20,
  KID and precision/recall on radiomics features, MS-SSIM diversity of the generated set beside the
  same number for the real slices, the standard FID when the InceptionV3 weights are present at the
  site, and the numbers of real and generated images behind them (``n-real-*``, ``n-generated-*``);
- unsupervised lesion detection on the site's lesion subjects: pixel AUROC / AUPRC inside the
  brain, Dice at a threshold fixed on held-apart healthy subjects' slices, the best Dice over
  thresholds (an upper bound: it looks at the masks), slice-level AUROC — for every setting of the
  family's ``anomaly_sweep()`` (e.g. the DDPM's noise level t, as ``pixel-auroc@t=800``), the
  first (configured) one also without a suffix;
- at a training site, the memorisation audit (``memorisation.py``): generated samples' nearest
  training vs held-out slices, and a loss-based membership-inference AUC;
- with ``evaluation.utility``, the synthetic-data utility test (``utility.py``): AUROCs of a slice
  classifier trained on the site's real slices, on samples and on both.
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.config import Config
from medgen.data.dataset import HEALTHY, LESION, SiteSlices
from medgen.evaluation import anomaly, distances, fid, memorisation, utility
from medgen.evaluation.plan import (OUTLIER_BRIGHT, OUTLIER_DARK, OUTLIER_LEVEL, OUTLIER_THRESHOLD, OUTSIDE_LESIONS, OWN_HEALTHY,
                                   THRESHOLD_PREFIX, TRAINING_SITES, EvaluationPlan)
from medgen.evaluation.samples import CLASS_NAMES
from medgen.models import GenerativeModel
from medgen.progress import track


def _suffix(setting: dict) -> str:
    return "".join(f"@{k}={v}" for k, v in sorted(setting.items()))


def generated(model: GenerativeModel, label: int, n: int, seed: int) -> np.ndarray:
    """(n, S, S) samples of one class from a fixed seed, in batches."""
    generator = torch.Generator().manual_seed(seed + label)
    out = []
    for at in track(range(0, n, 64), f"sampling {n} images", unit="batches"):
        labels = torch.full((min(64, n - at),), label, dtype=torch.long)
        out.append(model.sample(labels, generator=generator).cpu().numpy()[:, 0])
    return np.concatenate(out)


def distance_metrics(model: GenerativeModel, data: SiteSlices, cfg: Config,
                     fakes: dict[int, np.ndarray] | None = None,
                     classes: tuple[int, ...] = (HEALTHY, LESION)) -> dict[str, float]:
    """The distances per class c of ``classes`` (those some training site held: samples of a class
    that never trained mean nothing) with at least 4 real slices: ``radfd-c``, ``kid-c``,
    ``precision-c``, ``recall-c`` (from more than ``distances.PR_K`` = 5 slices on), ``ms-ssim-c``
    (generated set), ``ms-ssim-real-c`` (the real slices, same procedure), ``fid-c`` (with the
    InceptionV3 weights), and the sample sizes ``n-real-c``, ``n-generated-c`` (floats; at most
    ``evaluation.max_samples`` each). The generated sets are left in ``fakes`` (by label) when given."""
    metrics: dict[str, float] = {}
    weights = fid.find_weights(cfg.evaluation.inception_weights)
    for label in classes:
        real = data.images[data.labels == label]
        if len(real) < 4:
            continue
        name = CLASS_NAMES[label]
        rng = np.random.default_rng(cfg.seed)
        real = real[rng.permutation(len(real))[: cfg.evaluation.max_samples]]
        fake = generated(model, label, len(real), cfg.seed)
        if fakes is not None:
            fakes[label] = fake
        real_f, fake_f = distances.radiomics_features(real), distances.radiomics_features(fake)
        metrics[f"n-real-{name}"], metrics[f"n-generated-{name}"] = float(len(real)), float(len(fake))
        metrics[f"radfd-{name}"] = distances.radfd(real_f, fake_f)
        metrics[f"kid-{name}"], _ = distances.kid(real_f, fake_f)
        if len(real) > distances.PR_K:  # k-NN balls need k other samples
            metrics[f"precision-{name}"], metrics[f"recall-{name}"] = distances.precision_recall(real_f, fake_f)
        metrics[f"ms-ssim-{name}"] = distances.ms_ssim_diversity(fake)
        metrics[f"ms-ssim-real-{name}"] = distances.ms_ssim_diversity(real)
        if weights is not None:
            metrics[f"fid-{name}"] = fid.fid(real[:, None], fake[:, None], weights)
    return metrics


def _healthy_subjects(data: SiteSlices) -> list[str]:
    return sorted(set(data.subjects.tolist()) - set(data.lesion_subjects))


def split_for_threshold(data: SiteSlices, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N,) masks: slices of half of the healthy subjects (subjects with no lesion slice; at
    least one when there is one), which fix the threshold, and the slices scored (every other
    subject). Chosen by subject without looking at any mask."""
    healthy = _healthy_subjects(data)
    rng = np.random.default_rng(seed)
    calib = [healthy[i] for i in rng.permutation(len(healthy))[: max(1, len(healthy) // 2)]] if healthy else []
    in_calib = np.isin(data.subjects, calib)
    return in_calib, ~in_calib


def _maps(model: GenerativeModel, data: SiteSlices, index: np.ndarray, setting: dict, cfg: Config) -> np.ndarray:
    """The model's anomaly maps of slices ``index``, post-processed (``evaluation.median_filter_px``,
    ``evaluation.erode_brain_px``): (len(index), S, S) float32 >= 0."""
    out = []
    for at in track(range(0, len(index), 32), f"anomaly maps of {len(index)} slices", unit="batches"):
        idx = index[at: at + 32]
        images = torch.from_numpy(data.images[idx]).unsqueeze(1)
        brain = torch.from_numpy(data.brain[idx]).unsqueeze(1)
        out.append(model.anomaly_map(images, brain, **setting).cpu().numpy()[:, 0])
    if not out:
        return np.zeros((0, *data.images.shape[1:]), np.float32)
    ev = cfg.evaluation
    return anomaly.postprocess(np.concatenate(out), data.brain[index], ev.median_filter_px, ev.erode_brain_px)


def _pick(mask: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` of the indices where ``mask`` holds, at random, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(np.flatnonzero(mask))[:n])


def calibration_metrics(model: GenerativeModel, data: SiteSlices, cfg: Config) -> dict[str, float]:
    """A training site's share of the federation's threshold, from its healthy subjects' validation
    slices (no model trained on them): per anomaly setting the ``evaluation.healthy_quantile`` of
    their brain pixels' scores (``calibration-threshold<setting>``), the intensity-outlier
    reference's level, threshold and per-side quantiles, and the number of pixels (``calibration-pixels``). Numbers
    only; empty without a healthy subject."""
    ev = cfg.evaluation
    idx = _pick(np.isin(data.subjects, _healthy_subjects(data)), ev.max_anomaly_slices, cfg.seed)
    if not len(idx):
        return {}
    brain = data.brain[idx]
    out = {"calibration-pixels": float(brain.sum()), "calibration-slices": float(len(idx))}
    for setting in model.anomaly_sweep():
        maps = _maps(model, data, idx, setting, cfg)
        out[THRESHOLD_PREFIX + _suffix(setting)] = anomaly.threshold_from_healthy(maps, brain, ev.healthy_quantile)
    outlier = anomaly.outlier_calibration(data.images[idx], brain, ev.healthy_quantile,
                                          ev.median_filter_px, ev.erode_brain_px)
    out.update({THRESHOLD_PREFIX + key: value for key, value in zip(
        (OUTLIER_LEVEL, OUTLIER_THRESHOLD, OUTLIER_DARK, OUTLIER_BRIGHT), outlier)})
    return out


def _threshold_source(mode: str, own: bool, federated: bool) -> int:
    if mode == "outside-lesions":
        return OUTSIDE_LESIONS
    if mode in ("auto", "healthy-subjects") and own:
        return OWN_HEALTHY
    if mode in ("auto", "training-sites") and federated:
        return TRAINING_SITES
    return 0


def anomaly_metrics(model: GenerativeModel, data: SiteSlices, cfg: Config, plan: EvaluationPlan | None = None):
    """(metrics, curves, overlays) for every anomaly setting; empty when the site has no lesion.

    The threshold of ``dice-at-threshold`` comes from ``evaluation.calibration`` (``auto``: the
    site's own healthy subjects when it has one or more, else the training sites' threshold in
    ``plan``); ``threshold-source`` names which (:data:`~medgen.evaluation.plan.THRESHOLD_SOURCES`).
    Slices held apart for it are not scored."""
    if not data.lesion.any():
        return {}, {}, {}
    ev, plan = cfg.evaluation, plan or EvaluationPlan()
    calib, scored = split_for_threshold(data, cfg.seed)
    source = _threshold_source(ev.calibration, calib.any(), bool(plan.thresholds))
    if source != OWN_HEALTHY:  # no slice is held apart
        calib, scored = np.zeros(len(data), bool), np.ones(len(data), bool)
    calib_idx, scored_idx = _pick(calib, ev.max_anomaly_slices, cfg.seed), _pick(scored, ev.max_anomaly_slices, cfg.seed)
    brain, lesion = data.brain[scored_idx], data.lesion[scored_idx]
    outside = brain & ~lesion  # evaluation.calibration=outside-lesions only
    metrics = {"threshold-source": float(source), "n-scored-subjects": float(len(set(data.subjects[scored_idx].tolist())))}
    if source == OWN_HEALTHY:
        metrics["n-calibration-slices"] = float(len(calib_idx))
    curves, overlays = {}, {}
    for i, setting in enumerate(model.anomaly_sweep()):
        tag = _suffix(setting)
        maps = _maps(model, data, scored_idx, setting, cfg)
        if source == OWN_HEALTHY:
            threshold = anomaly.threshold_from_healthy(_maps(model, data, calib_idx, setting, cfg),
                                                       data.brain[calib_idx], ev.healthy_quantile)
        elif source == OUTSIDE_LESIONS:
            threshold = anomaly.threshold_from_healthy(maps, outside, ev.healthy_quantile)
        else:
            threshold = plan.thresholds.get(tag, float("nan"))
        report = anomaly.anomaly_report(maps, lesion, brain, data.labels[scored_idx], threshold)
        volume = anomaly.per_volume(maps, lesion, brain, data.subjects[scored_idx], threshold)
        report.update({k: volume[k] for k in ("volume_dice_at_threshold", "volume_pixel_auprc", "volumes")})
        fpr, tpr = anomaly.roc_curve(maps, lesion, brain)
        rec, prec = anomaly.pr_curve(maps, lesion, brain)
        for suffix in {tag, ""} if i == 0 else {tag}:  # the configured setting is also the headline
            metrics.update({k.replace('_', '-') + suffix: float(v) for k, v in report.items()})
            curves.update({f"roc-fpr{suffix}": fpr, f"roc-tpr{suffix}": tpr, f"pr-recall{suffix}": rec,
                           f"pr-precision{suffix}": prec})
        if ev.share_images and not overlays:
            pick = scored_idx[np.argsort(-data.lesion[scored_idx].sum((1, 2)))[:4]]
            overlays = {"overlay-images": data.images[pick], "overlay-lesion": data.lesion[pick].astype(np.uint8),
                        "overlay-maps": maps[np.searchsorted(scored_idx, pick)], "overlay-threshold": np.array([threshold])}
    if source == OWN_HEALTHY:
        outlier = anomaly.outlier_calibration(data.images[calib_idx], data.brain[calib_idx], ev.healthy_quantile,
                                              ev.median_filter_px, ev.erode_brain_px)
    elif source == OUTSIDE_LESIONS:
        outlier = anomaly.outlier_calibration(data.images[scored_idx], outside, ev.healthy_quantile,
                                              ev.median_filter_px, ev.erode_brain_px)
    else:
        found = (plan.thresholds.get(OUTLIER_LEVEL), plan.thresholds.get(OUTLIER_THRESHOLD))
        sides = (plan.thresholds.get(OUTLIER_DARK), plan.thresholds.get(OUTLIER_BRIGHT))
        # the per-side quantiles make it two-sided; a record without them keeps the symmetric score
        outlier = None if None in found else anomaly.Outlier(*found, *(sides if None not in sides else (None, None)))
    refs = anomaly.references(data.images[scored_idx], lesion, brain, data.labels[scored_idx], outlier,
                              ev.median_filter_px, ev.erode_brain_px, data.subjects[scored_idx])
    refs.update({k: volume[k] for k in ("volume_prevalence", "volume_all_brain_dice")})  # the same for every map
    metrics.update({"reference-" + k.replace("_", "-"): float(v) for k, v in refs.items()})
    counted = anomaly.counts(data.lesion[scored_idx], data.brain[scored_idx], data.labels[scored_idx])
    metrics.update({"n-" + k.replace("_", "-"): int(v) for k, v in counted.items()})  # n for the report
    return metrics, curves, overlays


def memorisation_metrics(model: GenerativeModel, fakes: dict[int, np.ndarray], train: SiteSlices,
                         heldout: SiteSlices, cfg: Config) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The audit of the samples in ``fakes`` (or fresh ones when the distances made none) against the
    site's training slices, held-out slices being ``heldout``; plus ``mia-auc`` when enabled."""
    ev = cfg.evaluation
    if not fakes:
        fakes = {int(label): generated(model, int(label), min(ev.max_samples, int((train.labels == label).sum())),
                                       cfg.seed) for label in np.unique(train.labels)}
    metrics, arrays = memorisation.audit(np.concatenate(list(fakes.values())), train, heldout,
                                         ev.memorisation_ratio, ev.share_images)
    if ev.membership_inference:
        metrics["mia-auc"] = memorisation.membership_auc(model, train, heldout, ev.max_samples, cfg.seed)
    return metrics, arrays


def evaluate_site(model: GenerativeModel, data: SiteSlices, cfg: Config, train: SiteSlices | None = None,
                  heldout: SiteSlices | None = None, plan: EvaluationPlan | None = None
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All full-evaluation numbers of one site, and the arrays the report draws (curves; overlays
    only with ``evaluation.share_images``). With the site's ``train`` slices (a training site), the
    memorisation audit too, against ``heldout`` slices (default ``data``: the validation subjects).
    ``plan``: what the server said (classes that trained, the training sites' threshold, whether
    to send this site's calibration quantiles)."""
    model.eval()
    plan = plan or EvaluationPlan()
    fakes: dict[int, np.ndarray] = {}
    with torch.no_grad():
        metrics = distance_metrics(model, data, cfg, fakes, plan.classes)
        if plan.send_calibration:
            metrics.update(calibration_metrics(model, data, cfg))
    scores, curves, overlays = anomaly_metrics(model, data, cfg, plan)
    metrics.update(scores)
    if cfg.evaluation.utility and LESION in plan.classes:
        metrics.update(utility.site_metrics(model, data, cfg))
    heldout = data if heldout is None else heldout
    audit: dict[str, np.ndarray] = {}
    if train is not None and len(train) and len(heldout):
        with torch.no_grad():
            found, audit = memorisation_metrics(model, fakes, train, heldout, cfg)
        metrics.update(found)
    return metrics, {**curves, **overlays, **audit}
