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
"""

from __future__ import annotations

import opacus
from opacus import GradSampleModule

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


def grad_samplers(overrides: dict) -> dict:
    """Opacus' registered grad samplers (``GradSampleModule.GRAD_SAMPLERS``: layer type -> function)
    with ``overrides`` in their place, every one wrapped by :func:`keep_first`: the table for a
    ``GradSampleModule`` subclass, which leaves Opacus' own table untouched."""
    return {kind: keep_first(fn) for kind, fn in {**GradSampleModule.GRAD_SAMPLERS, **overrides}.items()}
