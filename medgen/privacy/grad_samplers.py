"""Per-sample gradients for DP-SGD: Opacus' hooks, with a faster Conv2d weight gradient where it pays.

Opacus computes a Conv2d's per-sample weight gradients by unfolding the input (im2col: nine times
the activation memory for a 3x3 kernel) and one batched einsum. For stride-1 convolutions at high
resolution that is memory-bound, several times the layer's plain weight gradient. The same numbers
come out of the layer's own weight-gradient kernel (``aten.convolution_backward``, oneDNN on a CPU)
run once per sample. Measured here (batch 32, one thread, per layer): 16->16 channels at 64x64,
107 ms -> 20 ms; 32->32 at 32x32, 57 -> 23 ms; 64->64 at 16x16, 27 -> 22 ms; at 8x8 and for
stride 2 Opacus' einsum is as fast or faster. So the per-sample kernel is used for stride-1,
ungrouped, zero-padded convolutions whose output has at least ``MIN_POSITIONS`` positions; every
other layer (and every other layer type) keeps Opacus' own grad sampler.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from medgen._compat.opacus import grad_samplers

MIN_POSITIONS = 256  # output positions (16 x 16) from which the per-sample kernel beats im2col + einsum


def _per_sample_kernel(layer: nn.Conv2d, out_positions: int) -> bool:
    return (layer.stride == (1, 1) and layer.groups == 1 and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and out_positions >= MIN_POSITIONS)


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a Conv2d's weight (and bias): {parameter: (B, *parameter.shape)}."""
    x = activations[0].to(backprops.dtype)
    n = len(x)
    if n == 0 or not _per_sample_kernel(layer, backprops.shape[-2] * backprops.shape[-1]):
        return compute_conv_grad_sample(layer, activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.stack([
            torch.ops.aten.convolution_backward(backprops[i: i + 1], x[i: i + 1], layer.weight, None, layer.stride,
                                                layer.padding, layer.dilation, False, (0, 0), 1,
                                                (False, True, False))[1]
            for i in range(n)])
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum((2, 3))
    return out


class FastGradSampleModule(GradSampleModule):
    """Opacus' GradSampleModule (hooks) with :func:`conv2d_grad_sample` for Conv2d and no copy of a
    layer's first per-sample gradients (``medgen._compat.opacus.keep_first``); Opacus' own grad
    samplers are left untouched for every other use in the process."""

    GRAD_SAMPLERS = grad_samplers({nn.Conv2d: conv2d_grad_sample})
