"""Conditional VQ-VAE with a PixelCNN prior over its codes (family ``"vqvae"``; van den Oord et al.
2017, "Neural Discrete Representation Learning"; anomaly maps after Pinaya et al. 2022 and Marimont &
Tarroni 2021).

Images (B, 1, S, S) in [0, 1], S a multiple of 8; labels (B,) int64 (0 healthy, 1 lesion). The
encoder maps an image to a (B, code_dim, S/4, S/4) grid; each vector is replaced by its nearest of
``model.codebook_size`` codes (cosine distance: vectors and codes l2-normalised, Yu et al. 2022,
which keeps more codes in use than the Euclidean lookup); the decoder maps the grid back to an image
in [0, 1]. The label is added to the encoder's first features and to the decoder's first features.

Quantiser: the loss form, not EMA. The codebook is the weight of an ``nn.Embedding`` (a trainable
parameter with an Opacus per-sample-gradient rule), learned by the codebook loss ||sg[z] - e||^2;
the encoder gets ``model.commitment`` * ||z - sg[e]||^2 and the decoder's gradient through the
straight-through estimator. EMA codebook updates would be buffers computed from the data outside
DP-SGD, so they are not used.

The prior (``code_prior.py``) is trained in the same step on the detached code indices. It sees codes
of real images, so it lives inside the same network (``networks["vqvae"]``): one per-sample gradient
over autoencoder and prior, clipped together, one DP-SGD release per step, as the ledger accounts.

Dead codes: with ``model.restart_every`` > 0 and no DP-SGD, every that many local steps the codes
unused on the current batch are re-initialised to a used code plus noise (no encoder output is
copied in). Which codes are unused is a fact about the site's data, so under DP-SGD (the network
wrapped by Opacus) there is no restart.

Federation: the codebook is averaged like every other weight. Averaging is only meaningful if code k
means the same at every site; it does, since all sites start each round from the same global weights
(and the first round from the same seeded initialisation), so local steps only move codes a little.
``tests/test_vqvae.py::test_averaged_sites_keep_codebook_usage`` checks that codebook usage and code
assignments survive a plain mean of two sites' weights over rounds (and that a relabelled codebook
would not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import Config
from medgen.models.base import HEALTHY, GenerativeModel
from medgen.models.code_prior import CodePrior
from medgen.models.layers import ConvBlock, Down, Up, group_count, label_embedding, smooth_score

DOWNSAMPLING = 4  # image side / code grid side
PRIOR_LAYERS = 4
RESTART_NOISE = 0.1  # re-initialised code = used code + this * std(codebook) * N(0, I)
SCORES = ("recon", "restored")


def usage(codes: torch.Tensor, n_codes: int) -> dict[str, float]:
    """Codebook use of a batch of code grids (any shape, int64): ``perplexity`` = exp(entropy of the
    code histogram), in [1, n_codes], and ``codes_used`` = the number of distinct codes."""
    p = torch.bincount(codes.flatten(), minlength=n_codes).double() / codes.numel()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": float((p > 0).sum())}


class Quantiser(nn.Module):
    """Nearest-code lookup on the unit sphere; the codebook is ``self.codebook.weight`` (K, D)."""

    def __init__(self, n_codes: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(n_codes, dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int64 -> unit vectors (B, D, h, w)."""
        return F.normalize(self.codebook(codes), dim=-1).permute(0, 3, 1, 2).contiguous()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, D, h, w) -> code indices (B, h, w) (no gradient)."""
        with torch.no_grad():
            z = F.normalize(z, dim=1)
            return torch.einsum("bdhw,kd->bkhw", z, F.normalize(self.codebook.weight, dim=1)).argmax(1)

    def forward(self, z: torch.Tensor):
        """(B, D, h, w) -> (straight-through quantised (B, D, h, w), codes (B, h, w), codebook loss (B,),
        commitment loss (B,)); the losses are per-image sums of squared distances."""
        codes = self.nearest(z)
        z = F.normalize(z, dim=1)
        q = self.lookup(codes)
        codebook = ((q - z.detach()) ** 2).flatten(1).sum(1)
        commit = ((z - q.detach()) ** 2).flatten(1).sum(1)
        return z + (q - z).detach(), codes, codebook, commit


class VQVAENet(nn.Module):
    """Encoder, quantiser, decoder and the code prior. ``forward(x, y)`` -> (reconstruction (B, 1, S, S)
    in [0, 1], codes (B, S/4, S/4), codebook loss (B,), commitment loss (B,), prior NLL of the detached
    codes (B,))."""

    def __init__(self, width: int, groups: int, n_codes: int, code_dim: int):
        super().__init__()
        c = [width, 2 * width]
        self.enc_label = label_embedding(c[0])
        self.stem = nn.Conv2d(1, c[0], 3, stride=2, padding=1)
        self.encoder = nn.Sequential(nn.GroupNorm(group_count(groups, c[0]), c[0]), nn.SiLU(), Down(c[0], c[1], groups),
                                     ConvBlock(c[1], c[1], groups), nn.Conv2d(c[1], code_dim, 1))
        self.quantiser = Quantiser(n_codes, code_dim)
        self.dec_label = label_embedding(c[1])
        self.dec_in = nn.Conv2d(code_dim, c[1], 3, padding=1)
        self.decoder = nn.Sequential(nn.GroupNorm(group_count(groups, c[1]), c[1]), nn.SiLU(),
                                     ConvBlock(c[1], c[1], groups), Up(c[1], c[0], groups),
                                     nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c[0], 1, 3, padding=1))
        self.prior = CodePrior(n_codes, 2 * width, PRIOR_LAYERS)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S), (B,) -> encoder output (B, code_dim, S/4, S/4), before quantisation."""
        return self.encoder(self.stem(x) + self.enc_label(y)[:, :, None, None])

    def decode(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Quantised grid (B, code_dim, S/4, S/4), (B,) -> images (B, 1, S, S) in [0, 1]."""
        return torch.sigmoid(self.decoder(self.dec_in(q) + self.dec_label(y)[:, :, None, None]))

    def decode_codes(self, codes: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Code indices (B, S/4, S/4), (B,) -> images (B, 1, S, S) in [0, 1]."""
        return self.decode(self.quantiser.lookup(codes), y)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        q, codes, codebook, commit = self.quantiser(self.encode(x, y))
        return self.decode(q, y), codes, codebook, commit, self.prior.nll(codes, y)


class VQVAE(GenerativeModel):
    """Label-conditional VQ-VAE + PixelCNN prior; anomaly maps are healthy reconstruction errors,
    optionally after restoring the codes the prior finds unlikely."""

    family = "vqvae"
    private_networks = ("vqvae",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.networks = {"vqvae": VQVAENet(m.width, m.norm_groups, m.codebook_size, m.code_dim)}

    @property
    def _net(self) -> VQVAENet:
        """The bare network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks["vqvae"]
        return getattr(net, "_module", net)

    @property
    def _device(self) -> torch.device:
        return next(self._net.parameters()).device

    @property
    def _grid(self) -> tuple[int, int]:
        side = self.cfg.data.image_size // DOWNSAMPLING
        return side, side

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vqvae": torch.optim.Adam(self.networks["vqvae"].parameters(), lr=self.cfg.train.lr)}

    def _recon_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return (x_hat - x).abs() if self.cfg.model.recon_loss == "l1" else (x_hat - x) ** 2

    def _losses(self, images, labels) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms (per-image sums, batch means) and the batch's codes (B, S/4, S/4)."""
        x_hat, codes, codebook, commit, prior = self.networks["vqvae"](images, labels)
        recon = self._recon_error(images, x_hat).flatten(1).sum(1).mean()
        loss = recon + codebook.mean() + self.cfg.model.commitment * commit.mean() + prior.mean()
        return {"loss": loss, "recon": recon, "vq": codebook.mean(), "prior": prior.mean()}, codes

    def _floats(self, terms: dict[str, torch.Tensor], codes: torch.Tensor) -> dict[str, float]:
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["prior_bits_per_code"] = out["prior"] / (codes[0].numel() * math.log(2))
        return {**out, **usage(codes, self.cfg.model.codebook_size)}

    def train_step(self, images, labels, optimizers, step, extra_loss=None, masks=None) -> dict[str, float]:
        """One Adam step on a batch (B, 1, S, S) in [0, 1] with labels (B,) for autoencoder and prior
        together. Returns floats ``recon``, ``vq`` (squared distance of the encoder's unit vectors to
        their codes: the codebook and the commitment loss, equal in value) and ``prior`` (NLL in nats),
        each per image, summed over pixels / grid positions; ``loss`` = recon + (1 + commitment) vq +
        prior (+ extra_loss); ``prior_bits_per_code``; the batch's ``perplexity`` and ``codes_used``."""
        self.train()
        opt = optimizers["vqvae"]
        opt.zero_grad(set_to_none=True)
        terms, codes = self._losses(images, labels)
        loss = terms["loss"] + extra_loss() if extra_loss is not None else terms["loss"]
        self.precision.backward(loss)
        self.precision.step(opt)
        every = self.cfg.model.restart_every
        if every and (step + 1) % every == 0 and self.networks["vqvae"] is self._net:
            self._restart_dead_codes(codes)
        return {**self._floats(terms, codes), "loss": float(loss.detach())}

    @torch.no_grad()
    def _restart_dead_codes(self, codes: torch.Tensor) -> None:
        """Codes absent from ``codes`` become a random used code + noise (torch's global generator)."""
        weight = self._net.quantiser.codebook.weight
        counts = torch.bincount(codes.flatten(), minlength=len(weight))
        dead, used = (counts == 0).nonzero().flatten(), (counts > 0).nonzero().flatten()
        if len(dead) == 0:
            return
        source = used[torch.randint(len(used), (len(dead),), device=used.device)]
        weight[dead] = weight[source] + RESTART_NOISE * weight.std() * torch.randn_like(weight[dead])

    def evaluate(self, images, labels, masks=None) -> dict[str, float]:
        """``train_step``'s keys on a batch without training (deterministic)."""
        with self._eval_mode():
            return self._floats(*self._losses(images, labels))

    def sample(self, labels, generator=None) -> torch.Tensor:
        """Codes drawn from the prior given ``labels`` (n,) (categorical draws on CPU from ``generator``),
        decoded with the same labels: (n, 1, S, S) in [0, 1]. One prior pass per grid position."""
        with self._eval_mode():
            y = labels.to(self._device)
            return self._net.decode_codes(self._net.prior.sample(y, self._grid, generator), y)

    def restore(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) with every code whose probability under the prior (given the codes before it)
        is below ``model.restore_threshold`` replaced by the prior's most likely code there (one pass,
        all positions at once)."""
        logits = self._net.prior(codes, labels)
        p = logits.softmax(1).gather(1, codes[:, None])[:, 0]
        return torch.where(p < self.cfg.model.restore_threshold, logits.argmax(1), codes)

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """Healthy reconstruction error |x - x_hat| (label forced to healthy), Gaussian-smoothed
        (sigma 1 px), zeroed outside ``brain``: same shape as ``images`` (B, 1, S, S), >= 0.
        ``score="recon"`` (default) decodes the image's own codes; ``score="restored"`` decodes them
        after :meth:`restore` (the "VQ-VAE + prior" map)."""
        unknown = set(setting) - {"score"}
        score = setting.get("score", SCORES[0])
        if unknown or score not in SCORES:
            raise TypeError(f"vqvae anomaly_map: settings {setting} (known: score in {SCORES})")
        with self._eval_mode():
            x = images.to(self._device)
            healthy = torch.full((len(x),), HEALTHY, dtype=torch.long, device=x.device)
            codes = self._net.quantiser.nearest(self._net.encode(x, healthy))
            if score == "restored":
                codes = self.restore(codes, healthy)
            error = (self._net.decode_codes(codes, healthy) - x).abs()
            return smooth_score(error, None if brain is None else brain.to(x.device))

    def anomaly_sweep(self) -> list[dict]:
        """The reconstruction error of the image's own codes first, then after restoring unlikely codes."""
        return [{"score": s} for s in SCORES]
