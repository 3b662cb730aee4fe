"""Mask-conditioned synthesis and its test: does the lesion appear where the mask is?

For each mask (S, S) bool, three samples from the same x_T (one generator seed per mask):

- ``lesion``: the lesion class given the mask (``sample_masked``), what `medgen synthesize` writes;
- ``healthy`` (the reference): the healthy class, whose mask is empty by definition;
- ``label-only``: the lesion class without the mask (the label alone: the lesion goes anywhere).

Intensity test, per sample, on the given mask: ``contrast`` = mean intensity of the ring of pixels
outside the mask (within ``RING_PX`` px of it, and inside the generated brain: pixels of the healthy
reference brighter than ``BRAIN_LEVEL``) minus the mean inside the mask. The phantom's and stroke's
lesions are dark on T1, so a lesion drawn where the mask says gives contrast > 0, well above the
healthy reference's (normal tissue varies either way). Also ``change-inside`` / ``change-ring``:
mean |lesion - healthy| inside the mask and in the ring (paired, same x_T): a change confined to the
mask has a ratio well above 1. With ``--from-site`` the site's real lesion slices give the same
contrast on their own masks (``real-lesion-contrast``): the size of a real lesion's effect, and
each arm's distances to the site's real slices of its class (:func:`class_distances`). Every
number comes with n (the masks or slices scored).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from medgen.evaluation.distances import kid, radfd, radiomics_features
from medgen.models import HEALTHY, LESION, GenerativeModel

RING_PX = 3
BRAIN_LEVEL = 0.05
ARMS = ("lesion", "healthy", "label-only")


def synthesize(model: GenerativeModel, masks: np.ndarray, seed: int, batch: int = 32) -> dict[str, np.ndarray]:
    """The three arms (module docstring) for masks (N, S, S) bool: {arm: (N, S, S) float32 in [0, 1]}.
    Mask i's samples are drawn with the generator seeded ``seed + i``: deterministic, and one
    mask's samples do not depend on the others or on ``batch``. MaskConditioningError (a
    ValueError) for a model without mask conditioning."""
    out = {arm: [] for arm in ARMS}
    model.eval()
    with torch.no_grad():
        for i, m in enumerate(masks):
            mask = torch.from_numpy(np.ascontiguousarray(m))[None, None]
            for arm in ARMS:
                g = torch.Generator().manual_seed(seed + i)
                label = torch.tensor([HEALTHY if arm == "healthy" else LESION])
                x = model.sample(label, g) if arm == "label-only" else model.sample_masked(label, mask, g)
                out[arm].append(x.cpu().numpy()[0, 0])
    return {arm: np.stack(v).astype(np.float32) for arm, v in out.items()}


def ring(mask: np.ndarray, width: int = RING_PX) -> np.ndarray:
    """The pixels within ``width`` px outside an (S, S) bool mask (square structuring element)."""
    return ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=width) & ~mask


def contrast(image: np.ndarray, mask: np.ndarray, brain: np.ndarray) -> float:
    """Mean of ``image`` (S, S) on the ring outside ``mask`` (within ``brain``) minus its mean inside
    the mask; NaN when either part is empty."""
    outside = ring(mask) & brain
    if not mask.any() or not outside.any():
        return float("nan")
    return float(image[outside].mean() - image[mask].mean())


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def mask_test(samples: dict[str, np.ndarray], masks: np.ndarray) -> dict:
    """The intensity test of the module docstring for ``synthesize``'s samples and their masks (N, S, S):
    {"contrast": {arm: {mean, std, n}}, "contrast-gain": lesion - healthy per mask {mean, std, n},
    "gain-positive-share", "change-inside", "change-ring", "change-ratio", "n"}."""
    brains = samples["healthy"] > BRAIN_LEVEL
    per_arm = {arm: [contrast(x, m, b) for x, m, b in zip(samples[arm], masks, brains)] for arm in ARMS}
    gain = np.asarray(per_arm["lesion"]) - np.asarray(per_arm["healthy"])
    finite = gain[np.isfinite(gain)]
    diff = np.abs(samples["lesion"] - samples["healthy"])
    inside = [float(d[m].mean()) for d, m in zip(diff, masks) if m.any()]
    around = [float(d[ring(m)].mean()) for d, m in zip(diff, masks) if ring(m).any()]
    change_in, change_ring = _summary(inside), _summary(around)
    ratio = (change_in["mean"] / change_ring["mean"]
             if change_in["mean"] is not None and change_ring["mean"] else None)
    return {
        "n": int(len(masks)),
        "ring-px": RING_PX,
        "contrast": {arm: _summary(v) for arm, v in per_arm.items()},
        "contrast-gain": _summary(list(gain)),
        "gain-positive-share": float((finite > 0).mean()) if len(finite) else None,
        "change-inside": change_in,
        "change-ring": change_ring,
        "change-ratio": ratio,
    }


def real_contrast(images: np.ndarray, lesion: np.ndarray, brain: np.ndarray, labels: np.ndarray) -> dict:
    """The same contrast on a site's real lesion slices (labels 1) and their own masks: what a lesion
    looks like in the data (brain: the slices' brain masks). {mean, std, n}."""
    keep = labels == LESION
    return _summary([contrast(x, m, b) for x, m, b in zip(images[keep], lesion[keep], brain[keep])])


def class_distances(samples: dict[str, np.ndarray], real_images: np.ndarray, real_labels: np.ndarray,
                    seed: int = 0, max_real: int = 500, draws: int = 20) -> dict:
    """KID and RadFD-20 (``medgen.evaluation.distances``, radiomics features, brain = image > 0.02 on
    both sides) of each arm against the real slices of its class (``lesion`` and ``label-only``:
    the real lesion slices; ``healthy``: the healthy ones), at most ``max_real`` of them drawn at
    random; beside each, the same distance of n real slices of that class (n = the samples) held out
    from those, against the rest, averaged over ``draws`` random hold-outs (``*-real-vs-real``: what
    n slices of the real distribution itself score, the floor the arm is read against; both are
    z-scored on the larger set, as :func:`~medgen.evaluation.distances.radfd` does, so they compare). An arm whose class has fewer than 2 x n
    real slices is left out. ``real_images`` (N, S, S) in [0, 1], ``real_labels`` (N,)."""
    rng = np.random.default_rng(seed)
    out, floors = {}, {}
    for arm, cls in (("lesion", LESION), ("label-only", LESION), ("healthy", HEALTHY)):
        fake, real = samples[arm], real_images[real_labels == cls]
        n = len(fake)
        if n < 2 or len(real) < 2 * n:
            continue
        if cls not in floors:
            feats = radiomics_features(real[rng.permutation(len(real))[:max(max_real, 2 * n)]])
            splits = [rng.permutation(len(feats)) for _ in range(draws)]  # n held out, against the rest
            floors[cls] = feats, {
                "kid-real-vs-real": float(np.mean([kid(feats[p[n:]], feats[p[:n]], subsets=50, subset_size=n,
                                                       seed=seed)[0] for p in splits])),
                "radfd-20-real-vs-real": float(np.mean([radfd(feats[p[n:]], feats[p[:n]]) for p in splits]))}
        real_f, floor = floors[cls]
        fake_f = radiomics_features(fake)
        out[arm] = {"kid": kid(real_f, fake_f, subsets=50, subset_size=n, seed=seed)[0], "radfd-20": radfd(real_f, fake_f),
                    **floor, "n-real": len(real_f), "n-generated": n, "real-vs-real-draws": draws}
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of an (S, S) bool mask (the mask minus its erosion)."""
    return mask & ~ndimage.binary_erosion(mask)


def save_outlined_grid(path, rows: list[np.ndarray], masks: np.ndarray, scale: int = 2, pad: int = 2) -> None:
    """An RGB PNG: one row per entry of ``rows`` ((N, S, S) in [0, 1] each), column i the samples of
    mask i with the mask's outline in red; pixels enlarged ``scale`` times."""
    n, s, _ = masks.shape
    side = s * scale
    canvas = np.ones((len(rows) * (side + pad) + pad, n * (side + pad) + pad, 3), np.float32)
    for r, images in enumerate(rows):
        for c in range(n):
            tile = np.repeat(np.clip(images[c], 0, 1)[..., None], 3, axis=2)
            tile[outline(masks[c])] = (1.0, 0.15, 0.15)
            tile = tile.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + r * (side + pad), pad + c * (side + pad)
            canvas[y: y + side, x: x + side] = tile
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)
