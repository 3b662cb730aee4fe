"""Context-encoding VAE (family ``"cevae"``; Zimmerer et al. 2019, "Context-encoding Variational
Autoencoder for Unsupervised Anomaly Detection").

The network and the ELBO are the conditional VAE's (``vae.py``). Training adds a context-encoding
term: the same encoder and decoder reconstruct each image from a copy in which one random
rectangle is replaced by noise, L = recon(x) + beta KL + ``model.ce_weight`` * recon(x | masked x),
each a per-image sum over pixels averaged over the batch, so that under DP-SGD every image's
gradient depends on that image (and its own rectangle) only.

Anomaly map (the paper's "combi" score): the pseudo-healthy reconstruction error (as the VAE's)
times the magnitude of the gradient of the negative ELBO with respect to the input pixel.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from medgen.models.base import HEALTHY
from medgen.models.layers import smooth_score
from medgen.models.vae import ConditionalVAE, kl_divergence

PATCH_SIDES = (1 / 8, 1 / 2)  # a masked rectangle's height and width, as fractions of the image's
SCORES = ("combi", "recon")


def mask_patches(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``images`` (B, 1, H, W) in [0, 1] with one rectangle per image replaced by uniform
    noise in [0, 1]. Height and width are drawn independently, uniform over the integers between
    ``PATCH_SIDES`` of the image's, the position uniform over the places where the rectangle fits;
    everything drawn on CPU from ``generator`` (None: torch's global generator), per image."""
    b, _, h, w = images.shape
    u = torch.rand(b, 4, generator=generator)
    noise = torch.rand(images.shape, generator=generator)

    def span(size: int, side_u: torch.Tensor, start_u: torch.Tensor) -> torch.Tensor:
        """(b, size) bool: the positions covered along one axis."""
        lo, hi = max(1, round(PATCH_SIDES[0] * size)), max(1, round(PATCH_SIDES[1] * size))
        side = lo + (side_u * (hi - lo + 1)).long().clamp(max=hi - lo)
        start = (start_u * (size - side + 1)).long().clamp(max=size - side)
        pos = torch.arange(size)
        return (pos >= start[:, None]) & (pos < (start + side)[:, None])

    box = span(h, u[:, 0], u[:, 2])[:, :, None] & span(w, u[:, 1], u[:, 3])[:, None, :]
    return torch.where(box[:, None].to(images.device), noise.to(images), images)


class ContextEncodingVAE(ConditionalVAE):
    """The conditional VAE trained also as a context encoder; anomaly maps combine the
    reconstruction error with the ELBO's input gradient."""

    family = "cevae"

    def _losses(self, images, labels, beta: float) -> dict[str, torch.Tensor]:
        """The VAE's terms plus ``ce``: the reconstruction error of the images from their masked
        copies (per image, summed over pixels). In train mode the rectangles come from torch's global
        generator (like the posterior noise), in eval mode from one seeded with ``cfg.seed``, so
        that ``evaluate`` is deterministic."""
        terms = super()._losses(images, labels, beta)
        net = self.networks["vae"]
        generator = None if net.training else torch.Generator().manual_seed(self.cfg.seed)
        x_hat, _, _ = net(mask_patches(images, generator), labels)
        ce = self._recon_error(images, x_hat).flatten(1).sum(1).mean()
        return {**terms, "loss": terms["loss"] + self.cfg.model.ce_weight * ce, "ce": ce}

    @contextmanager
    def _no_per_sample_hooks(self):
        """Opacus' per-sample-gradient hooks off (while wrapped for DP-SGD): the input gradient
        of an anomaly map is no training step, and their backward hook, finding no activations
        from the eval-mode forward, would raise IndexError."""
        net = self.networks["vae"]
        if not hasattr(net, "disable_hooks"):
            yield
            return
        net.disable_hooks()
        try:
            yield
        finally:
            net.enable_hooks()

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """``score="combi"`` (default): |x - x_hat|^2 (mse; |x - x_hat| for l1) of the pseudo-healthy
        reconstruction (posterior mean, label forced to healthy) times |d(-ELBO)/dx|, the gradient
        Gaussian-smoothed (sigma 1 px), with -ELBO = the image's summed reconstruction error + beta
        KL; ``score="recon"``: the VAE's map. Smoothed (sigma 1 px) and zeroed outside ``brain``.
        Same shape as ``images`` (B, 1, S, S), >= 0, deterministic; works under ``torch.no_grad()``
        and leaves every parameter's ``.grad`` as it was."""
        unknown = set(setting) - {"score"}
        score = setting.get("score", SCORES[0])
        if unknown or score not in SCORES:
            raise TypeError(f"cevae anomaly_map: settings {setting} (known: score in {SCORES})")
        if score == "recon":
            return super().anomaly_map(images, brain)
        with self._eval_mode(), torch.enable_grad(), self._no_per_sample_hooks():
            x = images.to(self._device).detach().requires_grad_(True)
            healthy = torch.full((len(x),), HEALTHY, dtype=torch.long, device=x.device)
            mu, logvar = self._net.encode(x, healthy)
            error = self._recon_error(x, self._net.decode(mu, healthy))
            neg_elbo = error.flatten(1).sum(1) + self.cfg.model.beta * kl_divergence(mu, logvar)
            (grad,) = torch.autograd.grad(neg_elbo.sum(), x)
            combi = error.detach() * smooth_score(grad.abs())
            return smooth_score(combi, None if brain is None else brain.to(x.device))

    def anomaly_sweep(self) -> list[dict]:
        """The combined score first, then the reconstruction error alone (what the VAE maps)."""
        return [{"score": s} for s in SCORES]
