"""MAP reconstruction with a generator prior (BRGM, Marinescu et al. 2021).

For each observed slice y = f(x) + noise, with f a known operator (:mod:`.operators`) and G a
family's differentiable generator (``GenerativeModel.generator_prior()``):

    w* = argmin_w  data(y, f(G(w, c)))  +  lambda_feat * |phi(y) - phi(f(G(w, c)))|^2
                   + lambda_prior * (-log p(w))

with data = the mean squared error over the observed values, phi the fixed random feature net
(:mod:`.features`, mean over levels of the mean squared feature difference), -log p(w) the prior's
per-dimension negative log density (0.5 mean(w^2) for N(0, I)), c the slice's class label. The
reconstruction is G(w*, c). Each term is a per-pixel / per-dimension mean, so the weights do not
scale with the image or latent size. w starts at the lowest-loss candidate of: the family's
``initial`` latent of the operator's first baseline (a VAE's encoding of the bicubic / diffusion
image), the prior's mode w = 0, and ``starts - 1`` prior draws; then ``steps`` Adam steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medgen.models.base import GeneratorPrior
from medgen.reconstruction.features import RandomFeatures, feature_distance
from medgen.reconstruction.operators import Operator


@dataclass(frozen=True)
class Settings:
    """The solver's knobs (``medgen reconstruct`` flags)."""

    steps: int = 200
    lr: float = 0.05
    lambda_feat: float = 0.1
    lambda_prior: float = 1e-3
    starts: int = 8
    batch_size: int = 32


@dataclass
class Solution:
    """images: (N, 1, S, S) in [0, 1], G(w*); latents (N, *latent_shape); data_term: (steps + 1,)
    the mean over slices of the data term at the start and after each step; loss: same for the
    whole objective."""

    images: torch.Tensor
    latents: torch.Tensor
    data_term: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


def solve(prior: GeneratorPrior, op: Operator, observed: torch.Tensor, labels: torch.Tensor,
          settings: Settings = Settings(), seed: int = 0, device: str | torch.device = "cpu") -> Solution:
    """Reconstruct every observed slice (N, 1, ...) with class ``labels`` (N,) int64; batches of
    ``settings.batch_size`` are solved independently. Deterministic for ``seed``."""
    phi = RandomFeatures().to(device)
    g = torch.Generator().manual_seed(seed)
    parts, latents, data_hist, loss_hist = [], [], [], []
    for start in range(0, len(observed), settings.batch_size):
        index = slice(start, start + settings.batch_size)
        part = _solve_batch(prior, op.subset(index), observed[index].to(device), labels[index].to(device),
                            settings, phi, g)
        parts.append(part.images.cpu())
        latents.append(part.latents.cpu())
        weight = len(part.images) / len(observed)
        data_hist.append([weight * v for v in part.data_term])
        loss_hist.append([weight * v for v in part.loss])
    return Solution(torch.cat(parts), torch.cat(latents), [sum(v) for v in zip(*data_hist)],
                    [sum(v) for v in zip(*loss_hist)])


def _solve_batch(prior: GeneratorPrior, op: Operator, y: torch.Tensor, labels: torch.Tensor, settings: Settings,
                 phi: RandomFeatures, g: torch.Generator) -> Solution:
    with torch.no_grad():
        y_features = phi(y)

    def terms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,) data term, (B,) objective
        fx = op(prior.decode(w, labels))
        data = op.data_term(y, fx)
        loss = data + settings.lambda_prior * prior.neg_log_prior(w)
        if settings.lambda_feat:
            loss = loss + settings.lambda_feat * feature_distance(phi, y_features, fx)
        return data, loss

    candidates = [torch.zeros(len(y), *prior.latent_shape, device=y.device)]
    candidates += [prior.sample(len(y), g).to(y.device) for _ in range(settings.starts - 1)]
    if prior.initial is not None:
        first_guess = next(iter(op.baselines(y).values()))
        candidates.insert(0, prior.initial(first_guess, labels).detach().to(y.device))
    with torch.no_grad():
        losses = torch.stack([terms(w)[1] for w in candidates])  # (candidates, B)
    w = torch.stack(candidates)[losses.argmin(0), torch.arange(len(y), device=y.device)].clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=settings.lr)
    data_hist, loss_hist = [], []
    for _ in range(settings.steps):
        data, loss = terms(w)
        data_hist.append(float(data.detach().mean()))
        loss_hist.append(float(loss.detach().mean()))
        w.grad, = torch.autograd.grad(loss.sum(), w)  # the latent only: no parameter .grad is touched
        opt.step()
    with torch.no_grad():
        data, loss = terms(w)
        data_hist.append(float(data.mean()))
        loss_hist.append(float(loss.mean()))
        return Solution(prior.decode(w, labels).clamp(0, 1), w.detach(), data_hist, loss_hist)
