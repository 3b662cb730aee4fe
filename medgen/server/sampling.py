"""Which training sites a round asks to train (``federation.fraction_train``, as Flower's
``fraction_train``).

1 (the default): every site that has not refused, every round. Below 1: without central DP,
ceil(fraction x n) of them, drawn without replacement; with ``privacy.central.enabled``, each one
independently with probability ``fraction`` (Poisson sampling), which is what the central
accountant's amplification by subsampling assumes (Opacus' RDP accountant at sample rate
q = fraction; medgen/privacy/central.py). Drawn from (``seed``, round), so a resumed run asks the
same sites a run without the interruption would have.
"""

from __future__ import annotations

import math

import numpy as np

from medgen.config import Config

_STREAM = 0x5173  # keeps these draws apart from the other uses of (seed, round)


def sample_sites(willing: list[str], cfg: Config, round_: int) -> list[str]:
    """The sites of ``willing`` asked to train in ``round_``, in ``willing``'s order."""
    fraction = cfg.federation.fraction_train
    if fraction >= 1.0 or not willing:
        return list(willing)
    rng = np.random.default_rng([cfg.seed, round_, _STREAM])
    if cfg.privacy.central.enabled:
        return [site for site, u in zip(willing, rng.random(len(willing))) if u < fraction]
    picked = set(rng.choice(len(willing), size=max(1, math.ceil(fraction * len(willing))), replace=False).tolist())
    return [site for i, site in enumerate(willing) if i in picked]
