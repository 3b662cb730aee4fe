"""Model families behind one interface (:class:`~medgen.models.base.GenerativeModel`)."""

from __future__ import annotations

import torch

from medgen.config import Config
from medgen.models.base import HEALTHY, LESION, GenerativeModel


def build_model(cfg: Config, seed: int | None = None) -> GenerativeModel:
    """The family named by ``cfg.model.family``, initialised from ``seed`` (default ``cfg.seed``)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    family = cfg.model.family
    if family == "vae":
        from medgen.models.vae import ConditionalVAE

        return ConditionalVAE(cfg)
    if family == "cevae":
        from medgen.models.cevae import ContextEncodingVAE

        return ContextEncodingVAE(cfg)
    if family == "vqvae":
        from medgen.models.vqvae import VQVAE

        return VQVAE(cfg)
    if family == "gan":
        from medgen.models.gan import ConditionalGAN

        return ConditionalGAN(cfg)
    if family == "ddpm":
        from medgen.models.ddpm import DDPM

        return DDPM(cfg)
    if family == "flow":
        from medgen.models.flow import NormalisingFlow

        return NormalisingFlow(cfg)
    raise NotImplementedError(f"model.family={family!r} is not implemented yet (available: vae, cevae, vqvae, gan, ddpm, flow)")


__all__ = ["HEALTHY", "LESION", "GenerativeModel", "build_model"]
