"""Mixed precision of a site's training steps (``train.amp``), in one object every family uses.

``train_local`` runs each ``train_step`` inside :meth:`Precision.autocast`; a family's step calls
:meth:`Precision.backward` and :meth:`Precision.step` where it would call ``loss.backward()`` and
``optimizer.step()``. With ``amp="none"`` these are exactly those two calls (no autocast, no
scaler): training is bitwise what it was before mixed precision existed.

- ``bf16``: forward ops autocast to bfloat16 (CUDA, or CPU autocast); same exponent range as
  float32, so no loss scaling.
- ``fp16``: forward ops autocast to float16 (CUDA only) with a ``torch.amp.GradScaler``: losses are
  scaled before backward, gradients unscaled (and steps with Inf/NaN skipped) at the step, the scale
  updated once per training step (:meth:`update`).

Backward and the optimiser step run with autocast switched off, as PyTorch recommends (backward ops
take the dtypes of their forward ops anyway). Weights, optimiser state and the exchanged state dict
stay float32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``amp``: none | bf16 | fp16; ``device``: where the steps run (cpu, cuda, cuda:N)."""

    def __init__(self, amp: str = "none", device: str | torch.device = "cpu"):
        self.amp = amp
        self.device_type = torch.device(device).type
        self.dtype = DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device_type) if amp == "fp16" else None

    def autocast(self):
        """Context for a training step's forward passes (a no-op for ``none``)."""
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def _plain(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss under fp16."""
        with self._plain():
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 unscaled first, and skipped when a gradient is Inf/NaN."""
        with self._plain():
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)

    def update(self) -> None:
        """End of a training step: the fp16 loss scale follows the steps skipped (else nothing)."""
        if self.scaler is not None:
            self.scaler.update()


NONE = Precision()
