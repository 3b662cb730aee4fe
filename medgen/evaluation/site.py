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
  training vs held-out slices, and a loss-based membership-inference AUC.
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.config import Config
from medgen.data.dataset import HEALTHY, LESION, SiteSlices
from medgen.evaluation import anomaly, distances, fid, memorisation
from medgen.evaluation.samples import CLASS_NAMES
from medgen.models import GenerativeModel


def _suffix(setting: dict) -> str:
    return "".join(f"@{k}={v}" for k, v in sorted(setting.items()))


def generated(model: GenerativeModel, label: int, n: int, seed: int) -> np.ndarray:
    """(n, S, S) samples of one class from a fixed seed, in batches."""
    generator = torch.Generator().manual_seed(seed + label)
    out = []
    for at in range(0, n, 64):
        labels = torch.full((min(64, n - at),), label, dtype=torch.long)
        out.append(model.sample(labels, generator=generator).cpu().numpy()[:, 0])
    return np.concatenate(out)


def distance_metrics(model: GenerativeModel, data: SiteSlices, cfg: Config,
                     fakes: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """The distances per class c (healthy, lesion) with at least 4 real slices: ``radfd-c``,
    ``kid-c``, ``precision-c``, ``recall-c`` (from more than ``distances.PR_K`` = 5 slices on),
    ``ms-ssim-c`` (generated set), ``ms-ssim-real-c``
    (the real slices, same procedure), ``fid-c`` (with the InceptionV3 weights), and the sample
    sizes ``n-real-c``, ``n-generated-c`` (floats; at most ``evaluation.max_samples`` each). The
    generated sets are left in ``fakes`` (by label) when given."""
    metrics: dict[str, float] = {}
    weights = fid.find_weights(cfg.evaluation.inception_weights)
    for label in (HEALTHY, LESION):
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


def split_for_threshold(data: SiteSlices, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N,) masks: slices of half of the healthy subjects (subjects with no lesion slice),
    which fix the threshold, and the slices scored (every other subject). Chosen by subject
    without looking at any mask."""
    healthy = sorted(set(data.subjects.tolist()) - set(data.lesion_subjects))
    rng = np.random.default_rng(seed)
    calib = [healthy[i] for i in rng.permutation(len(healthy))[: len(healthy) // 2]]
    in_calib = np.isin(data.subjects, calib)
    return in_calib, ~in_calib


def _maps(model: GenerativeModel, data: SiteSlices, index: np.ndarray, setting: dict, cfg: Config) -> np.ndarray:
    """The model's anomaly maps of slices ``index``, post-processed (``evaluation.median_filter_px``,
    ``evaluation.erode_brain_px``): (len(index), S, S) float32 >= 0."""
    out = []
    for at in range(0, len(index), 32):
        idx = index[at: at + 32]
        images = torch.from_numpy(data.images[idx]).unsqueeze(1)
        brain = torch.from_numpy(data.brain[idx]).unsqueeze(1)
        out.append(model.anomaly_map(images, brain, **setting).cpu().numpy()[:, 0])
    if not out:
        return np.zeros((0, *data.images.shape[1:]), np.float32)
    ev = cfg.evaluation
    return anomaly.postprocess(np.concatenate(out), data.brain[index], ev.median_filter_px, ev.erode_brain_px)


def anomaly_metrics(model: GenerativeModel, data: SiteSlices, cfg: Config):
    """(metrics, curves, overlays) for every anomaly setting; empty when the site has no lesion."""
    if not data.lesion.any():
        return {}, {}, {}
    calib, scored = split_for_threshold(data, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.evaluation.max_anomaly_slices
    calib_idx = np.sort(rng.permutation(np.flatnonzero(calib))[:n])
    scored_idx = np.sort(rng.permutation(np.flatnonzero(scored))[:n])
    metrics, curves, overlays = {}, {}, {}
    for i, setting in enumerate(model.anomaly_sweep()):
        tag = _suffix(setting)
        maps = _maps(model, data, scored_idx, setting, cfg)
        calib_maps = _maps(model, data, calib_idx, setting, cfg)
        threshold = anomaly.threshold_from_healthy(calib_maps, data.brain[calib_idx], cfg.evaluation.healthy_quantile) \
            if len(calib_idx) else float("nan")
        report = anomaly.anomaly_report(maps, data.lesion[scored_idx], data.brain[scored_idx],
                                        data.labels[scored_idx], threshold)
        fpr, tpr = anomaly.roc_curve(maps, data.lesion[scored_idx], data.brain[scored_idx])
        rec, prec = anomaly.pr_curve(maps, data.lesion[scored_idx], data.brain[scored_idx])
        for suffix in {tag, ""} if i == 0 else {tag}:  # the configured setting is also the headline
            metrics.update({k.replace('_', '-') + suffix: float(v) for k, v in report.items()})
            curves.update({f"roc-fpr{suffix}": fpr, f"roc-tpr{suffix}": tpr, f"pr-recall{suffix}": rec,
                           f"pr-precision{suffix}": prec})
        if cfg.evaluation.share_images and not overlays:
            pick = scored_idx[np.argsort(-data.lesion[scored_idx].sum((1, 2)))[:4]]
            overlays = {"overlay-images": data.images[pick], "overlay-lesion": data.lesion[pick].astype(np.uint8),
                        "overlay-maps": maps[np.searchsorted(scored_idx, pick)], "overlay-threshold": np.array([threshold])}
    ev = cfg.evaluation
    refs = anomaly.references(data.images[scored_idx], data.lesion[scored_idx], data.brain[scored_idx],
                              data.labels[scored_idx], data.images[calib_idx], data.brain[calib_idx],
                              ev.healthy_quantile, ev.median_filter_px, ev.erode_brain_px)
    metrics.update({"reference-" + k.replace("_", "-"): float(v) for k, v in refs.items()})
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
                  heldout: SiteSlices | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All full-evaluation numbers of one site, and the arrays the report draws (curves; overlays
    only with ``evaluation.share_images``). With the site's ``train`` slices (a training site), the
    memorisation audit too, against ``heldout`` slices (default ``data``: the validation subjects)."""
    model.eval()
    fakes: dict[int, np.ndarray] = {}
    with torch.no_grad():
        metrics = distance_metrics(model, data, cfg, fakes)
    scores, curves, overlays = anomaly_metrics(model, data, cfg)
    metrics.update(scores)
    heldout = data if heldout is None else heldout
    audit: dict[str, np.ndarray] = {}
    if train is not None and len(train) and len(heldout):
        with torch.no_grad():
            found, audit = memorisation_metrics(model, fakes, train, heldout, cfg)
        metrics.update(found)
    return metrics, {**curves, **overlays, **audit}
