"""The Opacus internals medgen relies on: how ``GradSampleModule`` (hooks mode) stores the
per-sample gradients of a layer while a backward pass runs. Written against opacus 1.6; importing
this module with another opacus installed raises :class:`medgen._compat.IncompatibleVersion` naming
both versions (``pyproject.toml`` bounds opacus the same way; ``constraints.txt`` pins the tested one).

Opacus 1.6 calls ``GRAD_SAMPLERS[type(layer)](layer, activations, backprops)`` in its backward
hook and copies each returned per-sample gradient into ``param._current_grad_sample``, a buffer of
``layer.max_batch_len`` rows it zeroes first (``create_or_accumulate_grad_sample``); after the
last pass of the batch it promotes that buffer to ``param.grad_sample``. :func:`keep_first` hands
a layer's first per-sample gradients of a batch to the parameter as that buffer directly, which
saves the fill and the copy; :func:`grad_samplers` builds a ``GRAD_SAMPLERS`` table for a
``GradSampleModule`` subclass (``medgen/privacy/grad_samplers.py``).

Book-keeping clipping of Linear layers (Bu et al. 2023) rests on the same buffer: :func:`keep_factors`
puts a :class:`FactoredGradSample` — the layer's activations a and output gradients g, the per-sample
gradient g_i a_iᵀ never formed — where the buffer would be, Opacus promotes it to ``param.grad_sample``
as it would the buffer, and :class:`FactoredDPOptimizer` (Opacus' ``DPOptimizer`` with its
``clip_and_accumulate`` and the two ``grad_sample`` readers that check its type overridden) takes the
per-sample norms from the factors (``||a_i|| ||g_i||``, Goodfellow 2015) and the clipped sum as one
matmul, ``(c * g)ᵀ a``; noise, scaling and the step stay Opacus'.
"""

from __future__ import annotations

import opacus
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from medgen._compat import check_version

MINIMUM, BELOW = "1.6", "1.7"
check_version("opacus", opacus.__version__, MINIMUM, BELOW,
              "medgen's DP-SGD speed-ups use Opacus internals: medgen/_compat/opacus.py")


def keep_first(sampler):
    """``sampler`` that hands a layer's first per-sample gradients of a batch straight to the
    parameter. Opacus would copy them into a freshly zeroed buffer of the same size (a fill and a
    copy of B x |param| floats per parameter per step); later passes over the same parameters (a
    GAN's discriminator sees real and fake) still accumulate through Opacus."""

    def wrapped(layer, activations, backprops) -> dict:
        out = {}
        for param, grad_sample in sampler(layer, activations, backprops).items():
            fresh = grad_sample._base is None and grad_sample.is_contiguous()
            if (param.requires_grad and fresh and not hasattr(param, "_current_grad_sample")
                    and grad_sample.shape[0] == layer.max_batch_len):
                param._current_grad_sample = grad_sample
            else:
                out[param] = grad_sample
        return out

    return wrapped


def opacus_grad_sampler(kind: type):
    """Opacus' own registered grad sampler for a layer type (``GradSampleModule.GRAD_SAMPLERS``)."""
    return GradSampleModule.GRAD_SAMPLERS[kind]


def grad_samplers(overrides: dict) -> dict:
    """Opacus' registered grad samplers (``GradSampleModule.GRAD_SAMPLERS``: layer type -> function)
    with ``overrides`` in their place, every one wrapped by :func:`keep_first`: the table for a
    ``GradSampleModule`` subclass, which leaves Opacus' own table untouched."""
    return {kind: keep_first(fn) for kind, fn in {**GradSampleModule.GRAD_SAMPLERS, **overrides}.items()}


class FactoredGradSample:
    """The per-sample gradients of a Linear layer's weight for one batch, kept as factors: the passes
    (a_j, g_j) of the batch through the layer, a_j (n_j, in) its inputs and g_j (n_j, out) the output
    gradients (Opacus' backprops, already scaled for the loss reduction). Row i of every pass belongs to
    example i of a batch of ``rows`` (Opacus' ``max_batch_len``), so example i's gradient is
    sum_j g_j[i] a_j[i]ᵀ, as Opacus sums the passes' per-sample gradients row by row."""

    def __init__(self, rows: int):
        self.rows = rows
        self.passes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return self.rows

    def norms(self) -> torch.Tensor:
        """(rows,) Frobenius norms of the per-sample gradients: ||a_i|| ||g_i|| for one pass, and
        sqrt(sum_jk (a_j[i] . a_k[i]) (g_j[i] . g_k[i])) for several."""
        if len(self.passes) == 1 and len(self.passes[0][0]) == self.rows:
            a, g = self.passes[0]
            return torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(g, dim=1)
        a0, g0 = self.passes[0]
        squared = g0.new_zeros(self.rows)
        for j, (a, g) in enumerate(self.passes):
            for k, (b, h) in enumerate(self.passes[j:], start=j):
                m = min(len(a), len(b))
                term = (a[:m] * b[:m]).sum(1) * (g[:m] * h[:m]).sum(1)
                squared[:m] += term if k == j else 2 * term
        return squared.clamp_min(0).sqrt()

    def materialise(self) -> torch.Tensor:
        """The per-sample gradients themselves, (rows, out, in), as Opacus would hold them."""
        a0, g0 = self.passes[0]
        out = g0.new_zeros(self.rows, g0.shape[1], a0.shape[1])
        for a, g in self.passes:
            out[:len(g)] += torch.einsum("ni,nj->nij", g, a)
        return out

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """sum_i factors[i] * (example i's gradient), (out, in): one matmul per pass."""
        total = None
        for a, g in self.passes:
            part = (g * factors[:len(g), None].to(g.dtype)).t() @ a
            total = part if total is None else total + part
        return total


def keep_factors(layer: torch.nn.Linear, activations: torch.Tensor, backprops: torch.Tensor) -> bool:
    """Record one pass of ``layer`` for its weight as factors, where Opacus keeps the batch's per-sample
    gradient buffer (``weight._current_grad_sample``, of ``layer.max_batch_len`` rows). False (nothing
    recorded) when that buffer already holds a materialised gradient: then the caller returns the
    per-sample gradient for Opacus to add."""
    param = layer.weight
    current = getattr(param, "_current_grad_sample", None)
    if current is None:
        current = param._current_grad_sample = FactoredGradSample(layer.max_batch_len)
    elif not isinstance(current, FactoredGradSample):
        return False
    current.passes.append((activations, backprops))
    return True


class FactoredDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` that also takes a parameter's per-sample gradients as a
    :class:`FactoredGradSample`: the same per-sample norms, clip factors and clipped sum (Opacus'
    ``clip_and_accumulate`` with the factored norm and sum in place of the materialised ones), then
    Opacus' own noise, scaling and step. With no factored parameter it is ``DPOptimizer``."""

    def _get_flat_grad_sample(self, p: torch.Tensor):
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, FactoredGradSample):
            return sample
        if isinstance(sample, list) and any(isinstance(s, FactoredGradSample) for s in sample):
            raise ValueError("factored per-sample gradients of several backward passes: call the optimiser's "
                             "step after every backward pass (Poisson sampling allows no accumulation)")
        return super()._get_flat_grad_sample(p)

    @property
    def accumulated_iterations(self) -> int:
        if any(isinstance(getattr(p, "grad_sample", None), FactoredGradSample) for p in self.params):
            return 1  # _get_flat_grad_sample refuses factored passes accumulated over several backward passes
        return super().accumulated_iterations

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        if len(samples[0]) == 0:  # empty batch
            factor = torch.zeros((0,), device=samples[0].device if isinstance(samples[0], torch.Tensor)
                                 else self.params[0].device)
        else:
            norms = [g.norms() if isinstance(g, FactoredGradSample) else g.reshape(len(g), -1).norm(2, dim=-1)
                     for g in samples]
            target = norms[0].device
            per_sample = torch.stack([n.to(target) for n in norms], dim=1).norm(2, dim=1)
            factor = (self.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
        for p, sample in zip(self.params, samples):
            _check_processed_flag(p.grad_sample)
            if isinstance(sample, FactoredGradSample):
                grad = sample.clipped_sum(factor.to(p.device)).to(p.dtype)
                _processed(sample)
            else:
                sample = sample.to(p.dtype)
                grad = torch.einsum("i,i...", factor.to(sample.device).to(p.dtype), sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


def _processed(sample: FactoredGradSample) -> None:
    if getattr(sample, "_processed", False):
        raise ValueError("Gradients haven't been cleared since the last optimizer step. In order to obtain "
                         "privacy guarantees you must call optimizer.zero_grad() on each step")
    sample._processed = True


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of the DP-SGD steps in ``history`` [(noise multiplier, sample rate, steps)]:
    Opacus' RDP accountant given that history (its ``history`` attribute is how it keeps one)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))
