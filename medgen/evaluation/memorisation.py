"""Memorisation audit of a generator at one training site, run where the data is.

Distance: pixel L2 between whole slices (S x S, intensities in [0, 1], 0 outside the brain), given
as the RMS difference per pixel. No feature network: a copied scan is a copy pixel for pixel, and
at 64 x 64 the exact nearest neighbours of a few hundred samples take well under a second on a CPU.

For every generated sample g: d_train(g), the distance to the nearest of the site's training slices,
and d_heldout(g), to the nearest of its held-out (validation) slices. A sample is flagged when
d_train / d_heldout < ``evaluation.memorisation_ratio`` (0.5 by default: at most half as far from
a training slice as from any held-out slice). ``memorisation-fraction`` is the share flagged.

The baseline — what a generator that does not memorise would score — is the same statistic for real
slices that neither reference set holds: each training subject's slices in turn, against the
training slices of the other subjects and the held-out slices (leave one subject out). It is
``memorisation-baseline``; on the phantom cohort its ratios sit around 0.7-1.2, so 0 of them fall
under 0.5, while an exact copy scores 0.

Optionally a loss-based membership-inference attack: the model's per-example loss (``loss`` from
``model.evaluate`` on one slice at a time) on training vs held-out slices; ``mia-auc`` is the
probability that a training slice has the lower loss (0.5: no signal, 1: every member told apart).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from medgen.data.dataset import SiteSlices
from medgen.models import GenerativeModel

PAIRS = 4  # closest pairs kept for the report


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float64).reshape(len(images), -1)


def nearest(queries: np.ndarray, reference: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each query image (n, S, S): the RMS pixel distance to its nearest reference image (m, S, S)
    and that image's index. Exact (float64), in chunks of queries."""
    if len(reference) == 0:
        raise ValueError("nearest neighbours need at least one reference image")
    q, r = _flat(queries), _flat(reference)
    r2 = (r * r).sum(1)
    dist, index = np.empty(len(q)), np.empty(len(q), np.int64)
    for at in range(0, len(q), chunk):
        block = q[at: at + chunk]
        d2 = (block * block).sum(1)[:, None] + r2[None] - 2.0 * block @ r.T
        index[at: at + chunk] = d2.argmin(1)
        dist[at: at + chunk] = np.maximum(d2[np.arange(len(block)), index[at: at + chunk]], 0.0)
    return np.sqrt(dist / q.shape[1]), index


def _ratio(d_train: np.ndarray, d_heldout: np.ndarray) -> np.ndarray:
    return d_train / np.maximum(d_heldout, 1e-12)


def baseline_ratios(train: SiteSlices, heldout: SiteSlices) -> np.ndarray:
    """d_train / d_heldout of real slices held by neither reference set: each training subject's slices
    against the other training subjects' slices and the held-out slices. Empty with one subject."""
    out = []
    for subject in sorted(set(train.subjects.tolist())):
        mine = train.subjects == subject
        if mine.all():
            continue
        d_train, _ = nearest(train.images[mine], train.images[~mine])
        d_heldout, _ = nearest(train.images[mine], heldout.images)
        out.append(_ratio(d_train, d_heldout))
    return np.concatenate(out) if out else np.zeros(0)


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney)."""
    members, others = np.asarray(members, np.float64), np.asarray(others, np.float64)
    if len(members) == 0 or len(others) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([members, others]))
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(others)))


def per_example_loss(model: GenerativeModel, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``loss`` of ``model.evaluate`` on each slice alone: (n,)."""
    x, y = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), torch.from_numpy(labels)
    return np.array([model.evaluate(x[i: i + 1], y[i: i + 1])["loss"] for i in range(len(x))])


def membership_auc(model: GenerativeModel, train: SiteSlices, heldout: SiteSlices, n: int, seed: int) -> float:
    """Loss-threshold membership inference on up to ``n`` training and ``n`` held-out slices."""
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.permutation(len(s))[:n]) for s in (train, heldout)]
    losses = [per_example_loss(model, s.images[i], s.labels[i]) for s, i in zip((train, heldout), picks)]
    return auc(-losses[0], -losses[1])


def audit(generated: np.ndarray, train: SiteSlices, heldout: SiteSlices, ratio: float,
          share_images: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metrics, arrays) of the nearest-neighbour audit of ``generated`` (n, S, S).

    Arrays (for the report): every sample's ratio and the baseline's, the distances of the PAIRS
    samples with the lowest ratio, and — only with ``share_images`` — those samples beside their
    nearest training and held-out slices."""
    if len(generated) == 0 or len(train) == 0 or len(heldout) == 0:
        raise ValueError("the memorisation audit needs generated samples, training slices and held-out slices")
    d_train, i_train = nearest(generated, train.images)
    d_heldout, i_heldout = nearest(generated, heldout.images)
    ratios = _ratio(d_train, d_heldout)
    base = baseline_ratios(train, heldout)
    metrics = {"memorisation-fraction": float((ratios < ratio).mean()),
               "memorisation-baseline": float((base < ratio).mean()) if len(base) else float("nan"),
               "memorisation-ratio-median": float(np.median(ratios)),
               "memorisation-baseline-median": float(np.median(base)) if len(base) else float("nan"),
               "nn-train-rms": float(np.median(d_train)), "nn-heldout-rms": float(np.median(d_heldout)),
               "memorisation-samples": float(len(generated))}
    closest = np.argsort(ratios, kind="stable")[:PAIRS]
    arrays = {"memorisation-ratios": ratios, "memorisation-baseline-ratios": base,
              "memorisation-threshold": np.array([ratio]),
              "memorisation-pair-d-train": d_train[closest], "memorisation-pair-d-heldout": d_heldout[closest]}
    if share_images:
        arrays.update({"memorisation-generated": generated[closest],
                       "memorisation-train": train.images[i_train[closest]],
                       "memorisation-heldout": heldout.images[i_heldout[closest]]})
    return metrics, arrays
