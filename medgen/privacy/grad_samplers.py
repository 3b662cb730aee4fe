"""Per-sample gradients for DP-SGD: Opacus' hooks, with a faster Conv2d path where it pays.

Opacus computes a Conv2d's per-sample weight gradients by unfolding the input (im2col: nine times
the activation memory for a 3x3 kernel) and one batched einsum; for stride-1 convolutions at high
resolution that is memory-bound, several times the layer's plain weight gradient. medgen computes
the same numbers with the layer's own weight-gradient kernel (``aten.convolution_backward``, oneDNN
on a CPU), in one of two ways:

- **grouped** (the default where both channel counts are >= ``MIN_GROUPED_CHANNELS``, the kernel is
  larger than 1x1 and the output has >= ``MIN_GROUPED_POSITIONS`` positions): the batch is folded
  into the channels, (B, C, H, W) -> (1, B*C, H, W), and one convolution with ``groups=B`` gives the
  B per-sample gradients in one kernel call (the trick of Rochette et al. 2019). Measured here
  (batch 32, one thread, per layer, 2026-12-04): 32->16 channels at 32x32, Opacus 11.9 ms -> 4.8 ms,
  the layer's summed weight gradient 5.0 ms; 16->32 stride 2 from 32x32, 3.7 -> 1.3 ms; 128->64 at
  8x8, 9.7 -> 7.9 ms. Not for 64->128 stride 2 at 4x4 output (3.4 vs 4.9 ms) or 1x1 kernels (a
  batched matmul either way);
- **per sample** (stride 1, output >= ``MIN_POSITIONS`` positions, fewer channels — a 16->1 head at
  64x64: Opacus 50 ms, grouped 17 ms, per sample 11 ms): the kernel once per sample.

**Linear layers: book-keeping clipping** (Bu et al. 2023; the norm trick of Goodfellow 2015). A Linear
layer with (B, in) inputs has per-sample weight gradients g_i a_iᵀ (a_i its input, g_i its output
gradient), whose norm is ``||a_i|| ||g_i||`` and whose clipped sum is ``(c * g)ᵀ a``, one matmul: the
B x out x in per-sample gradients need never exist. :func:`linear_grad_sample` keeps a large weight's
(>= ``MIN_FACTORED_WEIGHT`` entries) per-sample gradients as those factors, and the DP optimiser
(``FactoredDPOptimizer``, ``medgen._compat.opacus``: Opacus' ``DPOptimizer`` with the factored norm
and sum in its clipping step) clips them with every other parameter's, in the same backward pass (no
second pass, unlike Opacus' ghost clipping). The VAE's 2048 -> 128 and 80 -> 2048 layers: 68 % of its
parameters, 55 MB of per-sample gradients per batch of 32 (``benchmarks/dp_linear.py``).

Every other layer (and every other layer type) keeps Opacus' own grad sampler.

**No summed weight gradient.** Autograd would also compute each Conv2d's summed weight (and bias)
gradient, which DP-SGD discards: the DP optimiser sets ``p.grad`` to the clipped per-sample sum plus
noise. While the per-sample hooks run (hooks on, training, grad mode, a parameter that requires
grad — the conditions under which Opacus records the layer's activations), a wrapped network's
zero-padded Conv2d layers run through :class:`_ConvInputGradOnly`, whose backward computes the
input gradient only; the layer's ``.grad`` stays ``None`` until the optimiser sets it. In the
VAE's step at the default config that is ~26 ms of weight-gradient kernels (of ~110 ms plain).
With the hooks off the layers are ordinary convolutions again (a GAN's generator step, the ceVAE's
input gradient); unwrapping restores the class's ``forward``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from medgen._compat.opacus import FactoredDPOptimizer, grad_samplers, keep_factors, opacus_grad_sampler

MIN_POSITIONS = 256  # output positions (16 x 16) from which the per-sample kernel beats im2col + einsum
MIN_GROUPED_CHANNELS = 8  # input and output channels from which the grouped kernel is the fastest
MIN_GROUPED_POSITIONS = 64  # output positions (8 x 8) from which the grouped kernel beats im2col + einsum
MIN_FACTORED_WEIGHT = 16_384  # Linear weights (out x in) from which the per-sample gradients are kept as factors


def _zero_padded(layer: nn.Conv2d) -> bool:
    return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _path(layer: nn.Conv2d, out_positions: int) -> str:
    """``grouped``, ``per-sample`` or ``opacus``: the fastest measured way for this layer (module doc)."""
    if not _zero_padded(layer):
        return "opacus"
    if (min(layer.in_channels, layer.out_channels) >= MIN_GROUPED_CHANNELS and layer.kernel_size != (1, 1)
            and out_positions >= MIN_GROUPED_POSITIONS):
        return "grouped"
    if layer.stride == (1, 1) and out_positions >= MIN_POSITIONS:
        return "per-sample"
    return "opacus"


compute_linear_grad_sample = opacus_grad_sampler(nn.Linear)


def linear_grad_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """A Linear layer with (B, in) inputs: its weight's per-sample gradients kept as the factors
    (activations, output gradients) for :class:`~medgen._compat.opacus.FactoredDPOptimizer`
    (book-keeping: norms ``||a_i|| ||g_i||``, clipped sum ``(c * g)ᵀ a``); the bias's as Opacus'
    (B, out). Small weights (below ``MIN_FACTORED_WEIGHT``: B x |W| is no buffer worth saving) and
    inputs with more dimensions (a sequence: T x T Gram matrices) go to Opacus' sampler."""
    x = activations[0]
    if x.dim() != 2 or not layer.weight.requires_grad or layer.weight.numel() < MIN_FACTORED_WEIGHT:
        return compute_linear_grad_sample(layer, activations, backprops)
    if not keep_factors(layer, x.to(backprops.dtype), backprops):
        return compute_linear_grad_sample(layer, activations, backprops)
    # the bias's own copy: Opacus adds a later pass into it in place, and g stays in the weight's factors
    return {layer.bias: backprops.clone()} if layer.bias is not None and layer.bias.requires_grad else {}


def _weight_grad(layer: nn.Conv2d, grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 groups: int) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(grad_output, x, weight, None, layer.stride, layer.padding,
                                               layer.dilation, False, (0, 0), groups, (False, True, False))[1]


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a Conv2d's weight (and bias): {parameter: (B, *parameter.shape)}."""
    x = activations[0].to(backprops.dtype)
    n = len(x)
    path = _path(layer, backprops.shape[-2] * backprops.shape[-1]) if n else "opacus"
    if path == "opacus":
        return compute_conv_grad_sample(layer, activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        if path == "grouped":  # the batch folded into the channels: one convolution with B groups
            cout, cin = layer.weight.shape[:2]
            shape = (n * cout, cin, *layer.kernel_size)  # the grouped weight: only its shape is read
            grads = _weight_grad(layer, backprops.reshape(1, n * cout, *backprops.shape[2:]),
                                 x.reshape(1, n * cin, *x.shape[2:]),
                                 layer.weight.new_empty(()).expand(shape), n)
            out[layer.weight] = grads.view(n, *layer.weight.shape)
        else:
            out[layer.weight] = torch.stack([_weight_grad(layer, backprops[i: i + 1], x[i: i + 1], layer.weight, 1)
                                             for i in range(n)])
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum((2, 3))
    return out


class _ConvInputGradOnly(torch.autograd.Function):
    """``F.conv2d`` whose backward computes the input gradient only (none for weight and bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = None
        if ctx.needs_input_grad[0]:
            x, weight = ctx.saved_tensors
            layer = ctx.layer
            grad_x = torch.ops.aten.convolution_backward(grad_output, x, weight, None, layer.stride, layer.padding,
                                                         layer.dilation, False, (0, 0), layer.groups,
                                                         (True, False, False))[0]
        return grad_x, None, None, None


def _forward_without_weight_grad(module: GradSampleModule, layer: nn.Conv2d):
    wrapper = weakref.ref(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        owner = wrapper()
        if (owner is not None and owner.hooks_enabled and layer.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in layer.parameters(recurse=False))):
            return _ConvInputGradOnly.apply(x, layer.weight, layer.bias, layer)
        return type(layer).forward(layer, x)

    return forward


class FastGradSampleModule(GradSampleModule):
    """Opacus' GradSampleModule (hooks) with :func:`conv2d_grad_sample` for Conv2d,
    :func:`linear_grad_sample` for Linear (clipped by its ``DP_OPTIMIZER``), no summed Conv2d
    weight gradients while the hooks run, and no copy of a layer's first per-sample gradients
    (``medgen._compat.opacus.keep_first``); Opacus' own grad samplers are left untouched for every
    other use in the process."""

    GRAD_SAMPLERS = grad_samplers({nn.Conv2d: conv2d_grad_sample, nn.Linear: linear_grad_sample})
    DP_OPTIMIZER = FactoredDPOptimizer  # takes the Linear weights' factored per-sample gradients

    def add_hooks(self, **kwargs) -> None:
        super().add_hooks(**kwargs)
        self._input_grad_only = [layer for layer in self.iterate_submodules(self._module)
                                 if type(layer) is nn.Conv2d and _zero_padded(layer)]
        for layer in self._input_grad_only:
            layer.forward = _forward_without_weight_grad(self, layer)

    def remove_hooks(self) -> None:
        for layer in getattr(self, "_input_grad_only", ()):
            if "forward" in vars(layer):
                del layer.forward
        self._input_grad_only = []
        super().remove_hooks()
