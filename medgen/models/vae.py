"""Conditional convolutional VAE (family ``"vae"``).

Images (B, 1, S, S) in [0, 1], S a multiple of 8; labels (B,) int64 (0 healthy, 1 lesion).
The encoder halves the resolution with stride-2 conv blocks (the first one reads the image)
down to 4x4 (or the first odd size), widths doubling from ``model.width`` up to 8x width; the
decoder mirrors it with nearest-upsample + conv blocks and ends in a sigmoid. The label is added
to the encoder's first features and concatenated to z for the decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from medgen.config import Config
from medgen.models.base import HEALTHY, GenerativeModel, GeneratorPrior, standard_normal_prior
from medgen.models.layers import (Down, Up, group_count, label_embedding, level_channels, level_sizes,
                                  smooth_score)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image: (B, latent_dim) each -> (B,), >= 0."""
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)


class VAENet(nn.Module):
    """Encoder + decoder. ``forward(x, y)`` -> (reconstruction in [0, 1], mu, logvar); in train
    mode z is sampled from the posterior, in eval mode z = mu."""

    def __init__(self, image_size: int, width: int, latent_dim: int, groups: int):
        super().__init__()
        sizes = level_sizes(image_size)
        chans = level_channels(width, len(sizes) - 1)  # one stride-2 conv per level, none at full size
        self.bottom = (chans[-1], sizes[-1], sizes[-1])
        flat = chans[-1] * sizes[-1] ** 2
        label_dim = max(8, latent_dim // 4)
        self.enc_label = label_embedding(chans[0])
        self.stem = nn.Conv2d(1, chans[0], 3, stride=2, padding=1)
        self.stem_act = nn.Sequential(nn.GroupNorm(group_count(groups, chans[0]), chans[0]), nn.SiLU())
        self.down = nn.Sequential(*[Down(a, b, groups) for a, b in zip(chans, chans[1:])])
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.dec_label = label_embedding(label_dim)
        self.from_z = nn.Linear(latent_dim + label_dim, flat)
        self.from_z_act = nn.Sequential(nn.GroupNorm(group_count(groups, chans[-1]), chans[-1]), nn.SiLU())
        self.up = nn.Sequential(*[Up(a, b, groups) for a, b in zip(chans[:0:-1], chans[-2::-1])])
        self.head = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[0], 1, 3, padding=1))

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, S, S), (B,) -> posterior mu, logvar, each (B, latent_dim)."""
        h = self.stem(x) + self.enc_label(y)[:, :, None, None]
        h = self.down(self.stem_act(h))
        return self.to_stats(h.flatten(1)).chunk(2, dim=1)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim), (B,) -> images (B, 1, S, S) in [0, 1]."""
        h = self.from_z(torch.cat([z, self.dec_label(y)], dim=1)).view(-1, *self.bottom)
        return torch.sigmoid(self.head(self.up(self.from_z_act(h))))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z, y), mu, logvar


class ConditionalVAE(GenerativeModel):
    """Label-conditional VAE; anomaly maps are pseudo-healthy reconstruction errors."""

    family = "vae"
    private_networks = ("vae",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.networks = {"vae": VAENet(cfg.data.image_size, m.width, m.latent_dim, m.norm_groups)}

    @property
    def _net(self) -> VAENet:
        """The bare network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks["vae"]
        return getattr(net, "_module", net)

    @property
    def _device(self) -> torch.device:
        return next(self._net.parameters()).device

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(self.networks["vae"].parameters(), lr=self.cfg.train.lr)}

    def _recon_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction error (same shape as x), >= 0."""
        return (x_hat - x).abs() if self.cfg.model.recon_loss == "l1" else (x_hat - x) ** 2

    def _losses(self, images, labels, beta: float) -> dict[str, torch.Tensor]:
        x_hat, mu, logvar = self.networks["vae"](images, labels)
        recon = self._recon_error(images, x_hat).flatten(1).sum(1).mean()
        kl = kl_divergence(mu, logvar).mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    def _beta(self, step: int | None) -> float:
        m = self.cfg.model
        if step is None or m.kl_warmup_steps == 0:
            return m.beta
        return m.beta * min(1.0, step / m.kl_warmup_steps)

    def train_step(self, images, labels, optimizers, step, extra_loss=None, masks=None) -> dict[str, float]:
        """One Adam step on a batch (B, 1, S, S) in [0, 1] with labels (B,). Returns floats
        ``recon`` and ``kl`` (per image, summed over pixels / latents) and ``loss`` = recon +
        warmed-up beta * kl (+ extra_loss)."""
        self.train()
        opt = optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        terms = self._losses(images, labels, self._beta(step))
        loss = terms["loss"] + extra_loss() if extra_loss is not None else terms["loss"]
        self.precision.backward(loss)
        self.precision.step(opt)
        return {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}

    def evaluate(self, images, labels, masks=None) -> dict[str, float]:
        """Same keys as ``train_step`` with the full beta and z = posterior mean (deterministic)."""
        with self._eval_mode():
            return {k: float(v) for k, v in self._losses(images, labels, self.cfg.model.beta).items()}

    def sample(self, labels, generator=None) -> torch.Tensor:
        """z ~ N(0, I) (drawn on CPU from ``generator``) decoded with ``labels`` (n,):
        (n, 1, S, S) in [0, 1]."""
        z = torch.randn(len(labels), self.cfg.model.latent_dim, generator=generator)
        with self._eval_mode():
            return self._net.decode(z.to(self._device), labels.to(self._device))

    def generator_prior(self) -> GeneratorPrior:
        """The decoder D(z, y), z ~ N(0, I) of size ``model.latent_dim`` (the prior the KL term
        pulls the posterior to). The start is the encoder's posterior mean of a first guess
        (the solver passes a baseline's reconstruction of the observation)."""
        net = self._net.eval()

        def initial(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net.encode(images, labels.to(images.device))[0]

        return standard_normal_prior(self.cfg.model.latent_dim, lambda z, y: net.decode(z, y.to(z.device)), initial)

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """Pseudo-healthy reconstruction error: posterior mean with the label forced to healthy,
        per-pixel |x - x_hat| (l1) or (x - x_hat)^2 (mse), Gaussian-smoothed (sigma 1 px),
        zeroed outside ``brain``. Same shape as ``images`` (B, 1, S, S), >= 0."""
        with self._eval_mode():
            x = images.to(self._device)
            healthy = torch.full((len(x),), HEALTHY, dtype=torch.long, device=x.device)
            mu, _ = self._net.encode(x, healthy)
            score = self._recon_error(x, self._net.decode(mu, healthy))
            return smooth_score(score, None if brain is None else brain.to(x.device))
