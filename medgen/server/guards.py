"""Guards against numbers that mean nothing, from what the sites said when they connected (their
query summaries: slice counts, contrasts, brain-intensity histograms):

- a class no training site held never trained: no samples and no distances for it;
- a site whose contrast, or whose intensity distribution, is far from the training sites' is
  scored by a model of something else: its page and ``metrics.json`` say so.
"""

from __future__ import annotations

import numpy as np

from medgen.data.dataset import HEALTHY, LESION
from medgen.evaluation.samples import CLASS_NAMES


def trained_classes(summaries: dict[str, dict], train_sites: list[str]) -> tuple[int, ...]:
    """The classes some connected training site holds training slices of. A summary without the
    counts (an older site) counts as holding both."""
    held = set()
    for site in train_sites:
        s = summaries.get(site)
        if s is None:
            continue
        lesion = s.get("train-lesion-slices")
        if not isinstance(lesion, (int, float)):
            return HEALTHY, LESION
        held |= {HEALTHY} if s.get("train-examples", 0) > lesion else set()
        held |= {LESION} if lesion > 0 else set()
    return tuple(sorted(held)) or (HEALTHY, LESION)


def untrained_note(classes: tuple[int, ...]) -> list[str]:
    return [f"class {CLASS_NAMES[c]!r} never trained (no training site holds a {CLASS_NAMES[c]} slice): no "
            f"{CLASS_NAMES[c]} samples and no {CLASS_NAMES[c]} distances" for c in (HEALTHY, LESION) if c not in classes]


def contrast_key(name: str) -> str:
    """"T1w", "t1", "T1" -> "t1"; "FLAIR" -> "flair"; "" for unknown."""
    key = name.strip().lower()
    if key in ("", "unknown"):
        return ""
    return key[:-1] if key in ("t1w", "t2w", "pdw", "t2starw") else key


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint) of two histograms (normalised here)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    p, q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))
    return 0.5 * kl(p) + 0.5 * kl(q)


def shift_warnings(summaries: dict[str, dict], train_sites: list[str], sites: list[str],
                   max_shift: float) -> dict[str, list[str]]:
    """Per site of ``sites`` not in ``train_sites``: a warning when its scans' contrasts are not the
    training sites' (by BIDS suffix or name), and when its brain-intensity histogram is further
    than ``max_shift`` (Jensen-Shannon, bits) from the training sites' pooled one."""
    trained = [summaries[s] for s in train_sites if s in summaries]
    train_contrasts = {contrast_key(c) for s in trained for c in s.get("contrasts", [])} - {""}
    hists = [(np.asarray(s["intensity-hist"]), s.get("train-examples", 0) + s.get("eval-examples", 0))
             for s in trained if len(s.get("intensity-hist", [])) > 0]
    pooled = sum(h * max(n, 1) for h, n in hists) if hists else None
    out: dict[str, list[str]] = {}
    for site in sites:
        s = summaries.get(site)
        if site in train_sites or s is None:
            continue
        found = []
        mine = {contrast_key(c) for c in s.get("contrasts", [])} - {""}
        if mine and train_contrasts and not mine & train_contrasts:
            found.append(f"contrast {', '.join(sorted(mine))} differs from the training sites' "
                         f"({', '.join(sorted(train_contrasts))}): the model learnt another contrast, its scores "
                         f"here are not comparable")
        hist = s.get("intensity-hist")
        if pooled is not None and hist is not None and len(hist) == len(pooled):
            shift = js_divergence(hist, pooled)
            if shift > max_shift:
                found.append(f"brain-intensity histogram {shift:.3f} bits (Jensen-Shannon) from the training sites' "
                             f"> evaluation.max_intensity_shift={max_shift:g}: another contrast or scanner?")
        if found:
            out[site] = found
    return out
