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

The randomness the guarantee rests on — which units a batch samples, and the noise — is drawn
from a seed the server cannot know: an HMAC of (seed, site, round) under the site's secret
(:func:`site_secret`, 32 bytes from ``os.urandom`` in the site's state folder), so a resumed round
draws the same batches and noise at the site, and nobody else can draw them. The noise is summed
from several draws (Opacus' ``secure_mode``), which defeats the floating-point attacks on Gaussian
sampling. An empty Poisson batch still takes its step: noise only, as the accountant assumes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medgen.config import Config
from medgen.data.dataset import SiteSlices
from medgen.models import GenerativeModel
from medgen.client.allocator import keep_large_allocations

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


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
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415  (Opacus only when DP is on)

    p = cfg.privacy
    n_subjects = len(set(data.subjects.tolist()))
    units = n_subjects if p.unit == "subject" else len(data)
    rate = min(1.0, cfg.train.batch_size / units)
    delta = p.delta if p.delta is not None else 1.0 / (10 * n_subjects)
    noise = p.noise_multiplier or get_noise_multiplier(
        target_epsilon=p.target_epsilon, target_delta=delta, sample_rate=rate,
        steps=steps * cfg.federation.rounds, accountant="rdp")
    return DPPlan(float(noise), rate, steps, delta, p.max_grad_norm, p.unit, units)


SECRET_FILE = "dp-secret"


def site_secret(state_dir: str | Path) -> bytes:
    """The site's 32-byte secret (``<state_dir>/dp-secret``, mode 0600), made on first use."""
    path = Path(state_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) != 32:
            raise ValueError(f"{path}: not a site secret (expected 32 bytes, found {len(secret)})") from None
        return secret
    secret = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


def secret_seed(secret: bytes, seed: int, site: str, round_: int) -> int:
    """A 64-bit seed for (run seed, site, round) that only the holder of ``secret`` can compute."""
    digest = hmac.new(secret, f"{seed}/{site}/{round_}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


def noise_seed(seed: int, network: str) -> int:
    """The 64-bit seed of one private network's DP noise: HMAC-SHA256 of the network's name under the
    round's (secret) ``seed``. Each network's noise is independent of every other's and of the batch
    sampling and model noise drawn from ``seed`` itself, and is as unknown to the server as ``seed``."""
    digest = hmac.new(str(seed).encode(), f"dp-noise/{network}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


def poisson_batches(data: SiteSlices, dp: DPPlan, generator: torch.Generator):
    """``dp.steps`` index batches by Poisson sampling of the protected units (see module doc).
    A batch may be empty (then :func:`noise_only_step`)."""
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
            wrapper=None):
    """Inside the block, the family's private networks compute per-sample gradients (``wrapper``:
    default: Opacus' hooks with our faster Conv2d and Linear samplers, ``grad_samplers.py``) and their optimisers
    (the wrapper's ``DP_OPTIMIZER``, else Opacus' ``DPOptimizer``) clip and add noise drawn from
    ``seed`` (pass a :func:`secret_seed`; each network draws its own stream, :func:`noise_seed`). On
    exit the networks are unwrapped, so ``state_dict`` keys carry no ``_module.`` prefix. The process
    keeps DP-SGD's large per-step buffers in its heap from then on (``allocator.py``)."""
    from opacus.optimizers import DPOptimizer  # noqa: PLC0415  (Opacus only when DP is on)

    from medgen.privacy.grad_samplers import FastGradSampleModule  # noqa: PLC0415

    wrapper = wrapper or FastGradSampleModule
    keep_large_allocations()
    inner = {}
    for name in model.private_networks:
        inner[name] = model.networks[name]
        noise = torch.Generator(device=next(inner[name].parameters()).device).manual_seed(noise_seed(seed, name))
        model.networks[name] = wrapper(inner[name], loss_reduction="mean")
        optimizer = getattr(wrapper, "DP_OPTIMIZER", DPOptimizer)  # the wrapper's: Opacus' DPOptimizer or a subclass
        optimizers[name] = optimizer(optimizers[name], noise_multiplier=dp.noise_multiplier,
                                     max_grad_norm=dp.max_grad_norm, expected_batch_size=dp.expected_batch_size,
                                     loss_reduction="mean", generator=noise, secure_mode=True)
    try:
        yield optimizers
    finally:
        for name, net in inner.items():
            model.networks[name].to_standard_module()  # removes the hooks from the inner network
            model.networks[name] = net


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The step of an empty Poisson batch: no example, so the clipped sum is zero and the update is
    the noise alone (what the RDP accountant assumes every step releases). Opacus takes this step
    for its own empty batches the same way: per-sample gradients with zero rows."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()
