"""DP-SGD at a site with Opacus, switched on in one place (:func:`private`).

Only the networks a family marks as seeing real images (``GenerativeModel.private_networks``) are
wrapped: per-sample gradients, clipping to ``privacy.max_grad_norm`` and Gaussian noise. Batches
are drawn by Poisson sampling, as the RDP accountant assumes.

The protected unit (``privacy.unit``):
- ``subject`` (default): each step samples subjects with probability q and takes ONE random slice
  of each, so one subject changes at most one example of any batch: the guarantee covers a whole
  subject (all of its slices), which is what an ethics board means by "a patient".
- ``slice``: each step samples slices with probability q. Slices of one subject are not
  independent, so this protects a single slice only — weaker than it sounds.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from medgen.config import Config
from medgen.data.dataset import SiteSlices
from medgen.models import GenerativeModel
from medgen.privacy.grad_samplers import FastGradSampleModule


@dataclass(frozen=True)
class DPPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int          # this round
    delta: float
    max_grad_norm: float
    unit: str
    units: int          # subjects or slices at the site

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.units))

    def metrics(self) -> dict[str, float]:
        return {"noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate,
                "dp-steps": self.steps, "delta": self.delta, "max-grad-norm": self.max_grad_norm}

    def as_dict(self) -> dict:
        return asdict(self)


def plan(cfg: Config, data: SiteSlices, steps: int) -> DPPlan:
    """The round's DP parameters at a site: q = batch_size / units; δ defaults to 1/(10 n_subjects);
    the noise multiplier is fixed or solved so that all planned rounds together reach
    ``privacy.target_epsilon``."""
    p = cfg.privacy
    n_subjects = len(set(data.subjects.tolist()))
    units = n_subjects if p.unit == "subject" else len(data)
    rate = min(1.0, cfg.train.batch_size / units)
    delta = p.delta if p.delta is not None else 1.0 / (10 * n_subjects)
    noise = p.noise_multiplier or get_noise_multiplier(
        target_epsilon=p.target_epsilon, target_delta=delta, sample_rate=rate,
        steps=steps * cfg.federation.rounds, accountant="rdp")
    return DPPlan(float(noise), rate, steps, delta, p.max_grad_norm, p.unit, units)


def poisson_batches(data: SiteSlices, dp: DPPlan, generator: torch.Generator):
    """``dp.steps`` index batches by Poisson sampling of the protected units (see module doc).
    A batch may be empty (the step is then skipped; it still counts in the ledger)."""
    if dp.unit == "slice":
        for _ in range(dp.steps):
            yield torch.nonzero(torch.rand(len(data), generator=generator) < dp.sample_rate).flatten()
        return
    _, owner = np.unique(data.subjects, return_inverse=True)
    slices_of = [torch.from_numpy(np.flatnonzero(owner == s)) for s in range(owner.max() + 1)]
    for _ in range(dp.steps):
        chosen = torch.nonzero(torch.rand(len(slices_of), generator=generator) < dp.sample_rate).flatten()
        yield torch.stack([slices_of[s][torch.randint(len(slices_of[s]), (1,), generator=generator)[0]]
                           for s in chosen.tolist()]) if len(chosen) else torch.zeros(0, dtype=torch.long)


@contextmanager
def private(model: GenerativeModel, optimizers: dict[str, torch.optim.Optimizer], dp: DPPlan, seed: int,
            wrapper=FastGradSampleModule):
    """Inside the block, the family's private networks compute per-sample gradients (``wrapper``:
    Opacus' hooks with our faster Conv2d sampler, ``grad_samplers.py``) and their optimisers clip and
    add noise (seeded: a resumed round draws the same noise). On exit the networks are unwrapped, so
    ``state_dict`` keys carry no ``_module.`` prefix."""
    inner = {}
    for name in model.private_networks:
        inner[name] = model.networks[name]
        noise = torch.Generator(device=next(inner[name].parameters()).device).manual_seed(seed)
        model.networks[name] = wrapper(inner[name], loss_reduction="mean")
        optimizers[name] = DPOptimizer(optimizers[name], noise_multiplier=dp.noise_multiplier,
                                       max_grad_norm=dp.max_grad_norm, expected_batch_size=dp.expected_batch_size,
                                       loss_reduction="mean", generator=noise)
    try:
        yield optimizers
    finally:
        for name, net in inner.items():
            model.networks[name]._close()  # removes the hooks from the inner network
            model.networks[name] = net
