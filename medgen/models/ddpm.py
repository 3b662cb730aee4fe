"""Conditional denoising diffusion model (family ``"ddpm"``; Ho et al. 2020, with the cosine
schedule of Nichol & Dhariwal 2021, DDIM sampling of Song et al. 2021 and classifier-free
guidance of Ho & Salimans 2022).

Images (B, 1, S, S) in [0, 1] are scaled to [-1, 1] (or encoded: latent space, below) into the
clean data x_0; the model predicts the noise eps of x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
for t in 1..T (abar_0 = 1 is clean data) and trains on the eps-MSE. Labels 0 healthy / 1 lesion
are replaced by 2 ("no label") with probability ``model.cond_drop`` so the same network also
predicts unconditionally (guidance).

``model.preconditioning="edm"`` (default) wraps the U-Net (``unet.py``) F as in Karras et al. 2022
(EDM), written for the eps of this chain: eps_hat = c_skip x_t + c_out F(c_in x_t, t). With
v = Var(x_t) = 1 - abar + abar sigma_data^2, c_in = 1 / sqrt(v) gives F unit-variance inputs,
c_skip x_t = sqrt(1 - abar) x_t / v is the best linear guess of eps (so at high noise, where eps is
almost x_t, the network no longer has to reproduce its input to within abar^1/2 to predict a
usable x_0), and c_out = sqrt(abar sigma_data^2 / v) (sigma_data: ``model.sigma_data`` for images,
1 for the standardised latents). The eps-MSE is weighted by 1 / c_out^2,
i.e. F is trained on a unit-variance target at every noise level (measured against the plain
loss in benchmarks/ddpm_training.py). ``"none"``: F predicts eps directly with the plain MSE of
Ho et al.

``model.space="latent"`` (default) diffuses the latents (B, 4, S/4, S/4) of an autoencoder
(``autoencoder.py``) instead of the images, as latent diffusion does (Rombach et al. 2022; for brain
MRI Pinaya et al. 2022): each step trains the autoencoder on its reconstruction MSE (the decoder
sees the latents with noise added, so it also decodes the slightly-off latents that sampling ends
in) and the U-Net (2 x ``model.width``, at S/4) on the detached latents; sampling decodes. Trained
together, not in two stages, so a federated round stays one step type. In a CPU budget it is the
cleaner generator: 5 x 100 federated steps give smooth brain slices, where pixel space gives
grainy ones (measurements: README, "Model families"). ``"pixel"``: the U-Net diffuses the images.

``model.mask_conditioning`` also conditions the U-Net on the slice's lesion mask: two extra input
channels (the mask and a "mask known" flag, ``mask_conditioning.py``) on the U-Net's grid, i.e.
area-averaged to the latents' S/4 x S/4 in latent space (the autoencoder never sees the mask).
Masks are dropped with the labels and alone with probability ``cond_drop``, so ``sample`` (label
only) still works and guidance's unconditional branch is "no label, no mask"; ``sample_masked``
places lesions where masks say (`medgen synthesize`); anomaly maps denoise with the healthy label
and an empty mask. The extra channels are part of the trained network: DP-SGD clips and noises
their per-sample gradients like the rest, and sites average them like any weight.

Networks: ``unet`` (pixel space) or ``ldm`` (latent space: autoencoder + U-Net in one module),
trained and seeing real images, so it is the one DP-SGD wraps, and ``unet_ema`` / ``ldm_ema`` (an
:class:`EMA` of it: exchanged, aggregated and checkpointed like any weights; sampling, evaluation
and anomaly maps use it). Anomaly maps follow AnoDDPM (Wyatt et al. 2022): noise the
image (or its latents) to step t with Gaussian or multi-octave simplex noise, denoise with the
healthy label (DDIM, deterministic; by default in one jump), decode, score the squared difference
to the image, averaged over several noise draws. The network is trained with Gaussian noise only
(AnoDDPM also trains on simplex noise); ``model.anomaly_t`` counts steps of this chain, so it must
not exceed ``model.timesteps`` (null: 0.8 T, where the phantom's large, dark lesions are healed
rather than reproduced; detection against t: README, "Model families").
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from medgen.config import Config
from medgen.models import mask_conditioning as mc
from medgen.models.autoencoder import DOWNSAMPLING, LATENT_CHANNELS, Autoencoder
from medgen.models.base import HEALTHY, GenerativeModel
from medgen.models.layers import smooth_score
from medgen.models.unet import UNet

NO_LABEL = 2  # the "unconditional" label of classifier-free guidance
# std of the noise added to the latents the decoder trains on: it learns to decode the slightly
# off latents that sampling ends in (RadFD-20 after 500 steps, README "Model families": 0.5 beat 0.3, 0.1)
DECODER_NOISE = 0.5
# weight of the autoencoder's reconstruction MSE in the latent space's loss. The two terms train
# disjoint parameters, and Adam normalises each parameter's steps, so it matters only under DP-SGD,
# which clips their joint per-sample gradient: at 10 the two parts' per-sample gradient norms are
# alike (measured after 200 steps on site A: 0.6 reconstruction, 1.6 diffusion; 0.06 at weight 1)
RECON_WEIGHT = 10.0


def alphas_cumprod(schedule: str, timesteps: int) -> torch.Tensor:
    """abar_t for t = 1..T: (T,) float64, strictly decreasing in (0, 1), abar_T ~ 0.

    ``cosine``: Nichol & Dhariwal (s = 0.008, betas clipped at 0.999). ``linear``: Ho et al.'s
    betas 1e-4 -> 0.02 for T = 1000, scaled by 1000 / T for other T (as improved-diffusion does)
    so that abar_T stays near 0."""
    if schedule == "cosine":
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    elif schedule == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"model.schedule={schedule!r}: expected 'cosine' or 'linear'")
    return torch.cumprod(1 - betas.clamp(max=0.999), 0)


def preconditioning(abar: torch.Tensor, kind: str, sigma_data: float) -> torch.Tensor:
    """Per-step scalings (len(abar), 4) float32: c_in, c_skip, c_out of eps_hat = c_skip x_t +
    c_out F(c_in x_t), and k_x0 of F's training target (eps - c_skip x_t) / c_out, which is
    c_out eps - k_x0 x_0. ``"edm"``: see the module docstring; ``"none"``: F is eps_hat."""
    if kind == "none":
        ones, zeros = torch.ones_like(abar), torch.zeros_like(abar)
        return torch.stack([ones, zeros, ones, zeros], dim=1).float()
    if kind != "edm":
        raise ValueError(f"model.preconditioning={kind!r}: expected 'edm' or 'none'")
    s2 = sigma_data ** 2
    var = 1 - abar + abar * s2  # Var(x_t) for images of variance sigma_data^2
    c_skip, c_out = (1 - abar).sqrt() / var, (abar * s2 / var).sqrt()
    # (eps - c_skip x_t) / c_out = eps (1 - c_skip sqrt(1 - abar)) / c_out - x_0 c_skip sqrt(abar) / c_out
    k_x0 = (1 - abar).sqrt() / (sigma_data * var.sqrt())
    return torch.stack([var.rsqrt(), c_skip, c_out, k_x0], dim=1).float()


_F2, _G2 = 0.5 * (math.sqrt(3) - 1), (3 - math.sqrt(3)) / 6


def _simplex2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """2-D simplex noise (Perlin 2001, in Gustavson's 2005 formulation) at coordinates x, y (same
    shape), lattice hashed with ``perm`` (256,) into gradient vectors ``grads`` (256, 2): about [-1, 1]."""
    s = (x + y) * _F2
    i, j = torch.floor(x + s), torch.floor(y + s)
    x0, y0 = x - i + (i + j) * _G2, y - j + (i + j) * _G2  # offset from the cell's first corner
    i, j = i.long(), j.long()
    i1 = (x0 > y0).long()  # which triangle of the skewed cell: second corner (1, 0) or (0, 1)
    out = torch.zeros_like(x)
    for oi, oj in ((0, 0), (i1, 1 - i1), (1, 1)):
        dx, dy = x0 - oi + (oi + oj) * _G2, y0 - oj + (oi + oj) * _G2
        g = grads[perm[(i + oi + perm[(j + oj) & 255]) & 255]]
        out = out + (0.5 - dx ** 2 - dy ** 2).clamp(min=0) ** 4 * (g[..., 0] * dx + g[..., 1] * dy)
    return 70 * out


def simplex_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                  persistence: float = 0.8) -> torch.Tensor:
    """Multi-octave ("fractal") 2-D simplex noise as in AnoDDPM: (B, C, H, W) float32, each image
    standardised to mean 0, std 1. Octave k has features about max(H, W) / 4 / 2^k pixels wide
    (down to 2 px, at most 6 octaves) and amplitude persistence^k; every image and octave gets
    its own random lattice offset, and each call a random permutation / gradient table (all from
    ``generator``). Unlike white noise it is spatially smooth: the denoiser must repair blob-sized
    structures, which is why AnoDDPM uses it for lesion-sized anomalies."""
    b, c, h, w = shape
    perm = torch.randperm(256, generator=generator)
    angle = 2 * math.pi * torch.rand(256, generator=generator, dtype=torch.float64)
    grads = torch.stack([angle.cos(), angle.sin()], dim=1)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    total, period, amp = torch.zeros(b, c, h, w, dtype=torch.float64), max(h, w) / 4, 1.0
    for _ in range(6):
        off = 256 * torch.rand(b, c, 2, 1, 1, generator=generator, dtype=torch.float64)
        total = total + amp * _simplex2d(xx / period + off[:, :, 0], yy / period + off[:, :, 1], perm, grads)
        period, amp = period / 2, amp * persistence
        if period < 2:
            break
    total = total - total.mean(dim=(2, 3), keepdim=True)
    return (total / total.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)).float()


class EMA(nn.Module):
    """Exponential moving average of a network's parameters (buffers copied). ``updates`` counts
    the updates as a float buffer, so it travels with the weights: FedAvg averages it (= local
    steps per site so far), checkpoints keep it, and the warm-up does not restart every round.
    (FedAdam / FedYogi move it by only ~server_lr per round: the decay then stays near 0.1 and the
    EMA follows the current weights, i.e. no averaging, but nothing breaks.)"""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net).requires_grad_(False)
        self.register_buffer("updates", torch.zeros(1))

    def forward(self, *args):
        return self.net(*args)

    @torch.no_grad()
    def update(self, net: nn.Module, decay: float) -> float:
        """ema <- d ema + (1 - d) net with d = min(decay, (1 + n) / (10 + n)) after n updates
        (the warm-up makes the EMA useful after a few steps). Returns d."""
        n = float(self.updates)
        d = min(decay, (1 + n) / (10 + n))
        for e, p in zip(self.net.parameters(), net.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.net.buffers(), net.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1
        return d


class LatentDenoiser(nn.Module):
    """The latent diffusion's network: an ``autoencoder`` and the ``unet`` that denoises its
    latents (``forward`` is the U-Net's). One module, so that DP-SGD clips the per-sample gradients
    of both parts together: one Gaussian mechanism per step, which is what the ledger accounts."""

    def __init__(self, autoencoder: Autoencoder, unet: UNet):
        super().__init__()
        self.autoencoder, self.unet = autoencoder, unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.unet(x, t, y, cond)


class DDPM(GenerativeModel):
    """Label-conditional diffusion model; see the module docstring."""

    family = "ddpm"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, size = cfg.model, cfg.data.image_size
        if m.anomaly_t is not None and m.anomaly_t > m.timesteps:
            raise ValueError(f"model.anomaly_t={m.anomaly_t} is beyond model.timesteps={m.timesteps}: "
                             "anomaly maps noise to step anomaly_t of the chain")
        self.latent = m.space == "latent"
        self.mask_conditioned = m.mask_conditioning
        cond = mc.MASK_CHANNELS if self.mask_conditioned else 0
        if self.latent:
            side = size // DOWNSAMPLING
            net = LatentDenoiser(Autoencoder(max(4, m.width // 2), m.norm_groups),
                                 UNet(side, 2 * m.width, m.norm_groups, m.attention, patch=1, channels=LATENT_CHANNELS,
                                      cond_channels=cond))
            self.shape, self._name, sigma_data = (LATENT_CHANNELS, side, side), "ldm", 1.0  # standardised latents
        else:
            net = UNet(size, m.width, m.norm_groups, m.attention, cond_channels=cond)
            self.shape, self._name, sigma_data = (1, size, size), "unet", m.sigma_data
        self.networks = {self._name: net, f"{self._name}_ema": EMA(net)}
        self.private_networks = (self._name,)
        self.T = m.timesteps
        self.abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod(m.schedule, self.T)])  # (T + 1,)
        self.scalings = preconditioning(self.abar, m.preconditioning, sigma_data)
        self.anomaly_t = m.anomaly_t or max(1, round(0.8 * self.T))

    @property
    def _net(self) -> nn.Module:
        """The bare trained network, also when privacy has wrapped it (Opacus keeps it as ``_module``)."""
        net = self.networks[self._name]
        return getattr(net, "_module", net)

    @property
    def _ema(self) -> EMA:
        return self.networks[f"{self._name}_ema"]

    @property
    def _device(self) -> torch.device:
        return next(self._net.parameters()).device

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {self._name: torch.optim.Adam(self.networks[self._name].parameters(), lr=self.cfg.train.lr)}

    def _to_x0(self, net: nn.Module, images: torch.Tensor, decoder_noise: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The diffusion's clean data for images (B, 1, S, S) in [0, 1], and the autoencoder's
        reconstruction MSE (None in pixel space). Pixel space: the images scaled to [-1, 1]. Latent
        space: ``net``'s (a LatentDenoiser's) latents, detached (the diffusion loss trains only the
        U-Net), and the MSE of decoding them with ``decoder_noise`` added."""
        if not self.latent:
            return 2 * images - 1, None
        z = net.autoencoder.encode(images)
        noisy = z + decoder_noise * torch.randn_like(z) if decoder_noise else z
        return z.detach(), F.mse_loss(net.autoencoder.decode(noisy), images)

    def _to_images(self, x_0: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_to_x0`` with the EMA network: (B, 1, S, S) in [0, 1]."""
        return self._ema.net.autoencoder.decode(x_0) if self.latent else ((x_0 + 1) / 2).clamp(0, 1)

    # ---------------------------------------------------------------- training
    def _times(self, u: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Stratified steps in 1..T for a batch of len(order): one per 1/B quantile from the
        uniform offset u, shuffled by ``order`` (each t still uniform, less noisy batch losses)."""
        n = len(order)
        return (((u + torch.arange(n) / n) % 1 * self.T).long() + 1)[order]

    def _scaling(self, t: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        """The columns of ``self.scalings`` at steps t (B,), each (B, 1, 1, 1) float32."""
        return self.scalings.to(device)[t].view(len(t), -1, 1, 1, 1).unbind(1)

    def _predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps_hat = c_skip x_t + c_out F(c_in x_t) of network F at steps t (B,) int64: (B, 1, S, S).
        ``cond``: the mask condition (B, 2, *grid) of a mask-conditioned model, else None."""
        c_in, c_skip, c_out, _ = self._scaling(t, x_t.device)
        return c_skip * x_t + c_out * net(c_in * x_t, t * (1000.0 / self.T), labels, *self._extra(cond))

    # ---------------------------------------------------------------- mask condition
    def _extra(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The network's extra argument: (cond,) for a mask-conditioned model, () otherwise."""
        return (cond,) if self.mask_conditioned else ()

    def _condition(self, labels: torch.Tensor, masks: torch.Tensor | None,
                   drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """The mask condition (B, 2, *grid) of labels (B,) and masks (B, 1, S, S) (None: unknown), the
        masks downsampled to the latent grid in latent space; with ``drop`` (the labels dropped, (B,)
        bool) training's mask dropout. None for a model without mask conditioning."""
        if not self.mask_conditioned:
            return None
        masks, known = mc.known_masks(labels, masks, len(labels), labels.device)
        if drop is not None:
            known = mc.dropped(known, drop, self.cfg.model.cond_drop)
        return mc.condition(masks, known, self.shape[-1]).to(labels.device)

    def _loss(self, net: nn.Module, x_0, labels, t, noise, cond=None) -> torch.Tensor:
        """eps-MSE of ``net`` on clean data x_0 (B, *self.shape) noised to steps t (B,) with ``noise``,
        weighted by 1 / c_out^2: the MSE of F against (eps - c_skip x_t) / c_out, written in x_0 and
        eps (at abar_T ~ 1e-9 the difference of two nearly equal float32 terms would be noise)."""
        abar = self.abar.to(x_0.device, torch.float32)[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x_0 + (1 - abar).sqrt() * noise
        c_in, _, c_out, k_x0 = self._scaling(t, x_0.device)
        return F.mse_loss(net(c_in * x_t, t * (1000.0 / self.T), labels, *self._extra(cond)),
                          c_out * noise - k_x0 * x_0)

    def _terms(self, diffusion: torch.Tensor, recon: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``loss`` = diffusion (+ recon: the latent space's autoencoder), and the parts of a sum."""
        if recon is None:
            return {"loss": diffusion}
        return {"loss": diffusion + RECON_WEIGHT * recon, "diffusion": diffusion, "recon": recon}

    def train_step(self, images, labels, optimizers, step, extra_loss=None, masks=None) -> dict[str, float]:
        """One Adam step of the eps-MSE (t uniform, labels dropped to "no label" with probability
        ``cond_drop``; in latent space plus the autoencoder's reconstruction loss), then one EMA
        update. Returns ``loss`` (+ extra_loss) and, in latent space, ``diffusion`` and ``recon``,
        like ``evaluate``. ``masks`` (B, 1, S, S) bool lesion masks: the condition of a
        mask-conditioned model (dropped with the labels, and alone with probability ``cond_drop``;
        None: unknown); ignored otherwise."""
        self.train()
        n, device = len(images), images.device
        opt = optimizers[self._name]
        opt.zero_grad(set_to_none=True)
        t = self._times(torch.rand(()), torch.randperm(n)).to(device)
        drop = (torch.rand(n) < self.cfg.model.cond_drop).to(device)
        cond = self._condition(labels, masks, drop)
        labels = torch.where(drop, NO_LABEL, labels)
        x_0, recon = self._to_x0(self._net, images, DECODER_NOISE)
        terms = self._terms(self._loss(self.networks[self._name], x_0, labels, t, torch.randn_like(x_0), cond), recon)
        loss = terms["loss"] + extra_loss() if extra_loss is not None else terms["loss"]
        self.precision.backward(loss)
        self.precision.step(opt)
        self._ema.update(self._net, self.cfg.model.ema_decay)
        return {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}

    def evaluate(self, images, labels, masks=None) -> dict[str, float]:
        """eps-MSE of the EMA network with the true labels (and masks, when mask-conditioned) at
        stratified steps and noise drawn from a fixed seed (deterministic for a given batch): ``loss``;
        in latent space also ``diffusion`` and ``recon`` (decoded without noise)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        t = self._times(torch.rand((), generator=g), torch.randperm(len(images), generator=g))
        noise = torch.randn((len(images), *self.shape), generator=g)
        with self._eval_mode():
            d = self._device
            x_0, recon = self._to_x0(self._ema.net, images.to(d))
            cond = self._condition(labels.to(d), masks)
            return {k: float(v) for k, v in self._terms(
                self._loss(self._ema, x_0, labels.to(d), t.to(d), noise.to(d), cond), recon).items()}

    # ---------------------------------------------------------------- generation
    def _eps(self, x: torch.Tensor, t: int, y: torch.Tensor, scale: float, cond: torch.Tensor | None = None
             ) -> torch.Tensor:
        """EMA noise prediction at step t with guidance: eps_u + scale (eps_y - eps_u) (unconditional:
        no label and, for a mask-conditioned model, no mask; ``cond`` the mask condition or None)."""
        tt = torch.full((len(x),), t, device=x.device)
        if scale == 1:
            return self._predict(self._ema, x, tt, y, cond)
        uncond = torch.full_like(y, NO_LABEL)
        free_cond = self._condition(uncond, None)
        if scale == 0:
            return self._predict(self._ema, x, tt, uncond, free_cond)
        both = torch.cat([cond, free_cond]) if cond is not None else None
        cond, free = self._predict(self._ema, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, uncond]),
                                   both).chunk(2)
        return free + scale * (cond - free)

    def _x0(self, x: torch.Tensor, t: int, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted clean data (an image: clipped to [-1, 1]; latents have no bounds), and the
        noise consistent with it."""
        a = float(self.abar[t])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x0 = x0 if self.latent else x0.clamp(-1, 1)
        return x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    def _ddim(self, x: torch.Tensor, y: torch.Tensor, t_from: int, steps: int, scale: float,
              eta: float = 0.0, generator: torch.Generator | None = None, cond: torch.Tensor | None = None
              ) -> torch.Tensor:
        """DDIM from step ``t_from`` to 0 in ``steps`` evenly spaced jumps t -> s. ``eta`` = 0:
        deterministic; eta = 1: each jump draws fresh noise with the DDPM posterior's variance
        sigma^2 = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s) (Song et al., eq. 16), i.e.
        ancestral sampling on the strided chain (noise drawn on CPU from ``generator``)."""
        times = torch.linspace(t_from, 0, steps + 1).round().long().unique_consecutive().tolist()
        for t, s in zip(times, times[1:]):
            x0, eps = self._x0(x, t, self._eps(x, t, y, scale, cond))
            a_t, a_s = float(self.abar[t]), float(self.abar[s])
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x = math.sqrt(a_s) * x0 + math.sqrt(max(0.0, 1 - a_s - sigma ** 2)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        return x

    def _ancestral(self, x: torch.Tensor, y: torch.Tensor, scale: float, generator, cond=None) -> torch.Tensor:
        """DDPM ancestral sampling through all T steps with the posterior variance beta~_t."""
        for t in range(self.T, 0, -1):
            x0, _ = self._x0(x, t, self._eps(x, t, y, scale, cond))
            a, a_prev = float(self.abar[t]), float(self.abar[t - 1])
            beta = 1 - a / a_prev
            x = (math.sqrt(a_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a)
            if t > 1:
                z = torch.randn(x.shape, generator=generator).to(x.device)
                x = x + math.sqrt(beta * (1 - a_prev) / (1 - a)) * z
        return x

    def sample(self, labels, generator=None) -> torch.Tensor:
        """x_T ~ N(0, I) (all noise drawn on CPU from ``generator``), denoised by the EMA network with
        ``model.sampler`` ("ddim": ``ddim_steps`` steps with noise ``ddim_eta``; "ddpm": ancestral, T steps)
        and guidance ``guidance_scale`` (in latent space, then decoded): (n, 1, S, S) in [0, 1]. A
        mask-conditioned model samples from the label alone (mask unknown)."""
        return self._sample(labels, None, generator)

    def sample_masked(self, labels, masks, generator=None) -> torch.Tensor:
        """Like ``sample``, given each slice's lesion mask (B, 1, S, S) bool too (healthy labels: the
        mask is cleared, an empty one is meant); the same draws of x_T as ``sample`` for one
        generator state. MaskConditioningError for a model trained without mask conditioning."""
        if not self.mask_conditioned:
            return super().sample_masked(labels, masks, generator)
        size = self.cfg.data.image_size
        if tuple(masks.shape) != (len(labels), 1, size, size):
            raise ValueError(f"masks {tuple(masks.shape)}: expected ({len(labels)}, 1, {self.cfg.data.image_size}, "
                             f"{self.cfg.data.image_size}) (data.image_size of the model)")
        return self._sample(labels, masks, generator)

    def _sample(self, labels, masks, generator) -> torch.Tensor:
        m = self.cfg.model
        x = torch.randn(len(labels), *self.shape, generator=generator)
        with self._eval_mode():
            x, y = x.to(self._device), labels.to(self._device)
            cond = self._condition(y, masks)
            if m.sampler == "ddim":
                x = self._ddim(x, y, self.T, min(m.ddim_steps, self.T), m.guidance_scale, m.ddim_eta, generator, cond)
            else:
                x = self._ancestral(x, y, m.guidance_scale, generator, cond)
            return self._to_images(x)

    def anomaly_map(self, images, brain=None, **setting) -> torch.Tensor:
        """AnoDDPM-style: noise images (B, 1, S, S) in [0, 1] to step ``t`` (setting ``t``, default
        ``model.anomaly_t``) with ``model.anomaly_noise`` (Gaussian or simplex), denoise to t = 0 with
        the healthy label (deterministic DDIM in ``model.anomaly_steps`` jumps, configured guidance) and
        score (x - x_hat)^2, averaged over ``model.anomaly_draws`` noise draws from a fixed seed,
        Gaussian-smoothed (sigma 1 px) and zeroed outside ``brain``. Same shape as ``images``, >= 0,
        deterministic.

        One jump is the network's estimate of E[x_0 | x_t, healthy]: where the chain would paint
        texture of its own into every pixel (error everywhere), this estimate is smooth where the
        slice is typical and errs where it is not (README, "Model families", for the measurements)."""
        unknown = set(setting) - {"t"}
        if unknown:
            raise TypeError(f"ddpm anomaly_map: unknown settings {sorted(unknown)} (known: t)")
        m = self.cfg.model
        t = int(setting.get("t", self.anomaly_t))
        if not 1 <= t <= self.T:
            raise ValueError(f"ddpm anomaly_map: t={t} outside 1..{self.T} (model.timesteps)")
        g = torch.Generator().manual_seed(self.cfg.seed)
        with self._eval_mode():
            x, a = images.to(self._device), float(self.abar[t])
            x_0, _ = self._to_x0(self._ema.net, x)
            healthy = torch.full((len(x),), HEALTHY, dtype=torch.long, device=x.device)
            cond = self._condition(healthy, torch.zeros_like(x))  # mask-conditioned: "no lesion anywhere"
            score = torch.zeros_like(x)
            for _ in range(m.anomaly_draws):
                noise = (simplex_noise(x_0.shape, g) if m.anomaly_noise == "simplex"
                         else torch.randn(x_0.shape, generator=g))
                x_t = math.sqrt(a) * x_0 + math.sqrt(1 - a) * noise.to(x.device)
                x_hat = self._to_images(self._ddim(x_t, healthy, t, min(m.anomaly_steps, t), m.guidance_scale,
                                                   cond=cond))
                score = score + (x - x_hat) ** 2
            return smooth_score(score / m.anomaly_draws, None if brain is None else brain.to(x.device))

    def anomaly_sweep(self) -> list[dict]:
        """The configured t first, then AnoDDPM's noise levels t = 25, 50, 100, 200, 300 of 1000,
        scaled to ``model.timesteps``."""
        ts = dict.fromkeys([self.anomaly_t, *(max(1, round(t * self.T / 1000)) for t in (25, 50, 100, 200, 300))])
        return [{"t": t} for t in ts]
