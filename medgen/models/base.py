"""The one model interface. Client, server, privacy and evaluation use only this; nothing outside
``medgen/models`` branches on the family.

A family holds named torch networks. Images are (B, 1, S, S) float32 in [0, 1]; labels are (B,)
int64, 0 = healthy, 1 = lesion; lesion masks (B, 1, S, S) bool, given to every family's training
and evaluation and used by a mask-conditioned one (``model.mask_conditioning``: the DDPM, the GAN).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from medgen.config import Config
from medgen.models.mask_conditioning import MaskConditioningError
from medgen.models.precision import NONE, Precision

HEALTHY, LESION = 0, 1
GENERATOR_PRIOR_FAMILIES = ("cevae", "gan", "vae")  # the families with a ``generator_prior`` (a test keeps it in step)


class NoGeneratorPrior(NotImplementedError):
    """The family has no differentiable generator to reconstruct images with (``generator_prior``)."""


@dataclass(frozen=True)
class GeneratorPrior:
    """What MAP reconstruction with a trained generator needs from a family (``medgen reconstruct``).

    - ``latent_shape``: the shape of one latent w (e.g. ``(latent_dim,)``).
    - ``decode(w, labels)``: (B, *latent_shape), (B,) int64 -> images (B, 1, S, S) in [0, 1];
      differentiable in w (the networks are in eval mode; call it under grad for w only, e.g.
      ``torch.autograd.grad(loss, w)``, so no parameter ``.grad`` is touched).
    - ``neg_log_prior(w)``: (B, *latent_shape) -> (B,) the latent's negative log prior density up
      to a constant, per latent dimension (for N(0, I): ``0.5 * mean(w^2)``), so its weight does
      not depend on the latent size.
    - ``sample(n, generator)``: n latents drawn from the prior (on CPU, from ``generator``).
    - ``initial(images, labels)``: optional, a starting latent (B, *latent_shape) for images
      (B, 1, S, S) in [0, 1] (e.g. a VAE's posterior mean of a first guess); None: start from the
      prior's mode and draws only.
    """

    latent_shape: tuple[int, ...]
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    neg_log_prior: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int, torch.Generator | None], torch.Tensor]
    initial: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def standard_normal_prior(latent_dim: int, decode, initial=None) -> GeneratorPrior:
    """A :class:`GeneratorPrior` over w ~ N(0, I) of size ``latent_dim``."""
    return GeneratorPrior((latent_dim,), decode, lambda w: 0.5 * (w ** 2).flatten(1).mean(1),
                          lambda n, generator=None: torch.randn(n, latent_dim, generator=generator), initial)


class GenerativeModel(ABC):
    """A generative model family.

    ``networks`` maps names to the torch modules of the family (e.g. ``{"vae": ...}`` or
    ``{"generator": ..., "discriminator": ...}``); their parameters and buffers are what sites
    and server exchange. ``private_networks`` names the networks that see real images: those
    get DP-SGD (a GAN's generator never sees real data). ``precision`` (``train.amp``) is how a
    ``train_step`` calls backward and the optimiser step (:mod:`medgen.models.precision`).
    """

    family: str
    private_networks: tuple[str, ...]
    precision: Precision = NONE
    mask_conditioned: bool = False  # samples given lesion masks (sample_masked): model.mask_conditioning

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.networks: dict[str, nn.Module] = {}
        self.precision = Precision(cfg.train.amp, cfg.train.device)

    # ---------------------------------------------------------------- training
    @abstractmethod
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per trained network, keyed like ``networks``."""

    @abstractmethod
    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   optimizers: dict[str, torch.optim.Optimizer], step: int,
                   extra_loss=None, masks: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step on a batch; returns the loss terms as floats.

        ``step`` counts local steps (for warm-ups). ``extra_loss``, when given, is a callable
        returning a scalar tensor added to each network's loss before backward (FedProx's
        proximal term). ``masks``: the batch's lesion masks (B, 1, S, S) bool, or None (unknown);
        only a mask-conditioned model uses them."""

    @abstractmethod
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor,
                 masks: torch.Tensor | None = None) -> dict[str, float]:
        """Loss terms on a batch without training (same names as ``train_step``; ``masks`` as there)."""

    # ---------------------------------------------------------------- generation
    @abstractmethod
    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One image per label: (len(labels), 1, S, S) in [0, 1]."""

    def sample_masked(self, labels: torch.Tensor, masks: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """One image per label with its lesion where ``masks`` (len(labels), 1, S, S) bool says:
        (len(labels), 1, S, S) in [0, 1]. Only a mask-conditioned model can
        (``mask_conditioned``); the others raise MaskConditioningError."""
        raise MaskConditioningError(self.family)

    @abstractmethod
    def anomaly_map(self, images: torch.Tensor, brain: torch.Tensor | None = None, **setting) -> torch.Tensor:
        """Per-pixel anomaly score, same shape as ``images``, >= 0, 0 outside ``brain`` when given.
        ``setting`` is one entry of ``anomaly_sweep()`` (empty: the configured default)."""

    def anomaly_sweep(self) -> list[dict]:
        """Settings of ``anomaly_map`` worth comparing (e.g. the DDPM's noise level t); evaluation
        scores each without knowing what they mean. The first is the configured one: its scores are
        also the headline ones (``pixel-auroc`` without a suffix) and its maps are the overlays."""
        return [{}]

    # ---------------------------------------------------------------- reconstruction
    def generator_prior(self) -> GeneratorPrior:
        """The differentiable generator and latent prior for MAP reconstruction (super-resolution,
        inpainting: ``medgen reconstruct``). Puts the networks in eval mode. A family opts in by
        overriding this; the default raises :class:`NoGeneratorPrior` naming ``model.family``."""
        raise NoGeneratorPrior(f"model.family={self.family!r} has no generator prior for reconstruction "
                               f"(families that have one: {', '.join(GENERATOR_PRIOR_FAMILIES)})")

    # ---------------------------------------------------------------- weights
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All exchanged tensors, keys ``<network>.<parameter>``, detached CPU copies."""
        return {f"{name}.{k}": v.detach().cpu().clone()
                for name, net in self.networks.items() for k, v in net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by ``state_dict``; raises KeyError / RuntimeError on a mismatch."""
        for name, net in self.networks.items():
            prefix = f"{name}."
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        unknown = [k for k in state if k.split(".", 1)[0] not in self.networks]
        if unknown:
            raise KeyError(f"unknown weights for family {self.family!r}: {unknown[:5]}")

    def norm_keys(self) -> list[str]:
        """Keys of normalisation parameters (GroupNorm / LayerNorm / InstanceNorm weight and
        bias): what FedBN keeps local to each site."""
        kinds = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
        return [f"{name}.{mod_name}.{p}" for name, net in self.networks.items()
                for mod_name, mod in net.named_modules() if isinstance(mod, kinds)
                for p, _ in mod.named_parameters(recurse=False)]

    def to(self, device: str | torch.device) -> GenerativeModel:
        for net in self.networks.values():
            net.to(device)
        return self

    def train(self, mode: bool = True) -> GenerativeModel:
        for net in self.networks.values():
            net.train(mode)
        return self

    def eval(self) -> GenerativeModel:
        return self.train(False)

    @contextmanager
    def _eval_mode(self):
        """Eval mode + no_grad; the previous train/eval modes are restored afterwards."""
        modes = {name: net.training for name, net in self.networks.items()}
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for name, net in self.networks.items():
                net.train(modes[name])

    def parameters(self):
        for net in self.networks.values():
            yield from net.parameters()
