"""Central DP (``privacy.central``): a site-level guarantee — the noise added at the server, or,
under secure aggregation, by the sites themselves (distributed noise; see the end of this text).

Flower's ``DifferentialPrivacyServerSideFixedClipping`` / ``...AdaptiveClipping`` wrap Flower
Strategy objects; our server runs its own loop and aggregators, so :class:`CentralDP` wraps one of
those instead, with the same semantics and Flower's own functions where they apply to our deltas:

- each site's update delta_i = w_i - w_global (every floating tensor, flattened together) is clipped
  to L2 norm C (``adaptive_clip_inputs_inplace``, Flower's FlatClip, which also says whether it
  clipped);
- the clipped deltas are averaged with equal weights (Flower's accounted mode requires uniform
  weights: an example-weighted mean would let a big site move the mean by more than C / m);
- Gaussian noise of std z C / m (``compute_stdv``, ``add_gaussian_noise_inplace``) is added to the
  mean; the server optimiser (fedavg / fedadam / fedyogi) then treats the noised mean as the mean.
- adaptive clipping (Andrew et al. 2021) uses Flower's own server-side adaptive strategy object for
  its parameters (``compute_adaptive_noise_params``: the updates get z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
  so that updates + clipped count together have noise multiplier z) and its update rule
  C <- C exp(-lr (b~ - target)). Two differences, on purpose, where Flower 1.41's Message-API
  wrapper departs from the paper: b~ is the noised share of updates NOT clipped (the paper's
  b = 1[||delta|| <= C], as Flower's own legacy DP-FedAvg client sends it; the 1.41 wrapper counts
  the clipped ones, which drives C the wrong way — towards 0 when every update is clipped), so C
  tracks the ``target_clipped_quantile`` quantile of the update norms; and the noise uses the norm
  that clipped this round's updates (the sensitivity), not the already-updated one.

Accounting: Opacus' RDP accountant with one step per round at sampling rate q =
``federation.fraction_train``. q = 1 (the default): every training site every round, no
amplification, as Flower's fixed-clipping accountant also requires; the mean is over the m updates
that came. q < 1: each site is asked with probability q, independently (Poisson sampling,
medgen/server/sampling.py), and the mean is over the expected count q N, not over the updates that
came (DP-FedAvg's fixed-denominator estimator, McMahan et al. 2018): the noise std is z C / (q N)
whether few or no sites were drawn, and a round that drew none releases noise alone.

Under secure aggregation (``federation.secure_aggregation: secaggplus``) the server never holds one
site's delta, so the mechanism moves to the sites (**distributed noise**, :func:`site_release`):

- each site clips its own delta to L2 norm C (the same flat vector over every floating tensor) and
  adds Gaussian noise of std z C / sqrt(t) from a generator seeded by ``os.urandom`` (the server
  cannot seed or replay it), t being the round's secure-aggregation threshold that the same site
  enforces when it opens its shares; z and C come from the study config the site has checked
  against its policy (``min_central_noise_multiplier``), t from the round's key exchange;
- it sends the result with weight 1 through the secure sum (uniform weights, as above), so the
  server decodes the equal-weight mean over the s >= t survivors; its noise has std
  z C sqrt(s / t) / s >= z C / s, i.e. the sum carries at least the z C of the clear mechanism.
  More survivors than t only add noise; fewer than t and no site opens its shares.

The guarantee: the released sums (and every global model) are (epsilon, delta + p)-DP at site
level, with the same epsilon as the clear mechanism for the same z, rounds and q (q = 1: with
secure aggregation the server draws the sample and knows it, so sampling amplification is refused),
against the server and outsiders, as long as at least t of the sites in each sum are honest (follow
the protocol and keep their noise secret; the protected site is one of them); sites that collude
with the server can subtract their own noise. Neighbours are zero-out ones: a site's update
replaced by zero while it stays in the round (the server sees who sends anyway), so the sum's
sensitivity is C and its noise, which includes the site's own share, does not depend on its data. p bounds the chance that the quantiser clips a coordinate of a site's noised delta:
``federation.secagg_clip`` must be at least C + :data:`CLIP_SIGMAS` per-site noise stds (config
error otherwise), so p <= rounds x sites x coordinates x 2 Phi(-10) ~ 1.5e-23 per coordinate. The
noise is added before quantisation; the rounding to the 2^bits grid (at most step / 2 per coordinate
per site) is applied to each site's noised vector, which is not strictly post-processing of the
noised sum — the accounting is the Gaussian mechanism's on the unrounded sum (the distributed
discrete Gaussian of Kairouz et al. 2021 would account the rounding too; not built). Adaptive
clipping is refused (its clipped count would need a noised bit through the sum). Sites choose
nothing here but take z and C from the study config they checked against their policy; the server
choosing a larger C costs utility, not privacy (the noise is z C for the same C). Epsilon counts
the aggregated rounds: a round that fails after its sum was unmasked and is rerun on --resume is
one release the resumed accountant does not see.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from medgen._compat.flwr import (
    adaptive_clip_inputs_inplace,
    adaptive_clipping_update,
    add_gaussian_noise_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
    get_norm,
)
from medgen.config import Config, ConfigError
from medgen.server.strategy import FedAvg, State, Update

def sample_rate(cfg: Config) -> float:
    """The probability that a training site is asked in a round (``federation.fraction_train``)."""
    return cfg.federation.fraction_train


def noise_multiplier(cfg: Config) -> float:
    """``privacy.central.noise_multiplier``, or the one that reaches ``target_epsilon`` at ``delta``
    over ``federation.rounds`` rounds."""
    c = cfg.privacy.central
    if c.noise_multiplier is not None:
        return c.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415  (importing Opacus takes seconds)

    return float(get_noise_multiplier(target_epsilon=c.target_epsilon, target_delta=c.delta,
                                      sample_rate=sample_rate(cfg), steps=cfg.federation.rounds, accountant="rdp"))


CLIP_SIGMAS = 10.0  # secagg_clip >= C + this many per-site noise stds: P(|N(0,1)| > 10) = 1.5e-23


def site_noise_std(z: float, clipping_norm: float, threshold: int) -> float:
    """The std of the noise each site adds under secure aggregation: z C / sqrt(t), so that the sum
    of any t sites' noise has std z C."""
    return z * clipping_norm / math.sqrt(threshold)


def min_secagg_clip(z: float, clipping_norm: float, threshold: int) -> float:
    """The smallest ``federation.secagg_clip`` for which the quantiser clips a coordinate of a
    noised, clipped delta only with probability 2 Phi(-CLIP_SIGMAS) (each coordinate of a delta of
    norm <= C is in [-C, C])."""
    return clipping_norm + CLIP_SIGMAS * site_noise_std(z, clipping_norm, threshold)


def smallest_threshold(cfg: Config) -> int:
    """The smallest secure-aggregation threshold a round of this study can have: the configured one,
    else 2 (a round of 3 sites, as few as a secure sum may hold, has t = 3 // 2 + 1)."""
    return cfg.federation.secagg_threshold or 2


def gaussian(size: int, std: float) -> np.ndarray:
    """``size`` draws of N(0, std^2) from a generator seeded with 256 bits of ``os.urandom``: fresh each
    call, so neither the server nor a rerun of the round can reproduce or cancel them."""
    rng = np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))
    return rng.normal(0.0, std, size)


def site_release(cfg: Config, delta: np.ndarray, threshold: int) -> tuple[np.ndarray, dict[str, float]]:
    """A site's share of distributed central DP (secure aggregation): its flat ``delta`` clipped to
    L2 norm C, plus Gaussian noise of std z C / sqrt(``threshold``); and the numbers the site may
    say in the clear (none about its delta: not its norm, not whether it was clipped). SecAggError
    naming ``federation.secagg_clip`` when the quantiser's range is too narrow for the noise."""
    from medgen.privacy.secagg import SecAggError  # noqa: PLC0415  (secagg imports cryptography)

    c, z = cfg.privacy.central, noise_multiplier(cfg)
    if c.adaptive:
        raise SecAggError("privacy.central.adaptive: not with secure aggregation (use a fixed clipping_norm)")
    std = site_noise_std(z, c.clipping_norm, threshold)
    if cfg.federation.secagg_clip < (need := min_secagg_clip(z, c.clipping_norm, threshold)):
        raise SecAggError(f"federation.secagg_clip={cfg.federation.secagg_clip:g} < {need:.4g} = "
                          f"privacy.central.clipping_norm + {CLIP_SIGMAS:g} x the noise std z C / sqrt(t) of this "
                          f"round (t = {threshold}): the quantiser would clip the noised update")
    clipped = [np.asarray(delta, dtype=np.float64).copy()]
    if get_norm(clipped) > 0:  # (Flower's FlatClip divides by the norm)
        adaptive_clip_inputs_inplace(clipped, c.clipping_norm)
    return clipped[0] + gaussian(clipped[0].size, std), {"central-site-noise-std": std}


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Site-level epsilon of the releases in ``history`` [(noise multiplier, sample rate, rounds)]."""
    if not history:
        return 0.0
    from medgen._compat.opacus import rdp_epsilon  # noqa: PLC0415  (importing Opacus takes seconds)

    return rdp_epsilon(history, delta)


def check_adaptive(cfg: Config) -> None:
    """Flower's own check of the adaptive parameters, as an error naming the key."""
    c = cfg.privacy.central
    try:
        compute_adaptive_noise_params(noise_multiplier(cfg), len(cfg.sites.train), c.clipped_count_stddev)
    except ValueError as e:
        raise ValueError(f"privacy.central.clipped_count_stddev: with {len(cfg.sites.train)} training sites and "
                         f"noise multiplier {noise_multiplier(cfg):.3g} adaptive clipping needs "
                         f"clipped_count_stddev > noise_multiplier / 2 (Flower: {e})") from None


def _floating(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


class CentralDP(FedAvg):
    """An aggregator (``medgen.server.strategy`` interface) that clips, averages and noises the sites'
    updates, then hands the noised mean to ``inner`` as if it were the only update."""

    def __init__(self, inner: FedAvg, cfg: Config):
        c = cfg.privacy.central
        if not c.enabled:
            raise ConfigError("privacy.central.enabled is false")
        self.inner, self.delta, self.sites = inner, c.delta, len(cfg.sites.train)
        self.sample_rate = sample_rate(cfg)
        self.noise_multiplier = noise_multiplier(cfg)
        self.clipping_norm = c.clipping_norm
        self.adaptive = None
        self.update_noise_multiplier = self.noise_multiplier
        if c.adaptive:
            self.adaptive = DifferentialPrivacyServerSideAdaptiveClipping(
                FlowerFedAvg(), self.noise_multiplier, self.sites, c.clipping_norm, c.target_clipped_quantile,
                c.clip_norm_lr, c.clipped_count_stddev)
            self.update_noise_multiplier = self.adaptive.noise_multiplier
        self.history: list[tuple[float, float, int]] = []
        self.last: dict[str, float] = {}
        # secure aggregation: the sites clipped and noised (site_release); the one update is their mean
        self.distributed = cfg.federation.secure_aggregation == "secaggplus"
        if self.distributed and (self.adaptive is not None or self.sample_rate < 1.0):
            raise ConfigError("privacy.central with federation.secure_aggregation=secaggplus needs a fixed "
                              "clipping_norm and federation.fraction_train=1")

    # ------------------------------------------------------------------ the mechanism
    def clip(self, current: State, updates: list[Update]) -> tuple[list[list[np.ndarray]], list[float], int]:
        """(clipped deltas as float64 arrays over the floating keys, norms before clipping, clipped count)."""
        keys = _floating(current)
        base = [current[k].double().numpy() for k in keys]
        deltas, norms, clipped = [], [], 0
        for u in updates:
            delta = [u.state[k].double().numpy() - b for k, b in zip(keys, base)]
            norms.append(get_norm(delta))
            if norms[-1] > 0:  # a site that sent the global model back: Flower's FlatClip divides by the norm
                clipped += int(adaptive_clip_inputs_inplace(delta, self.clipping_norm))
            deltas.append(delta)
        return deltas, norms, clipped

    def release(self, current: State, deltas: list[list[np.ndarray]]) -> tuple[State, dict[str, float]]:
        """The global state moved by the equal-weight mean of ``deltas`` plus Gaussian noise of std
        z C / m; and the std, the norm of the noise-free mean and the norm of the noise. m: the
        number of deltas, or the expected number q N when sites are sampled (q < 1)."""
        keys = _floating(current)
        m = len(deltas) if self.sample_rate >= 1.0 else self.sample_rate * self.sites
        mean = [sum((d[i] for d in deltas), np.zeros(current[k].shape)) / m for i, k in enumerate(keys)]
        std = compute_stdv(self.update_noise_multiplier, self.clipping_norm, m)
        noisy = [a.copy() for a in mean]
        add_gaussian_noise_inplace(noisy, std)
        out = dict(current)
        for k, n in zip(keys, noisy):
            out[k] = (current[k].double() + torch.from_numpy(n)).to(current[k].dtype)
        return out, {"central-noise-std": std, "central-mean-norm": get_norm(mean),
                     "central-noise-norm": get_norm([n - a for n, a in zip(noisy, mean)])}

    def aggregate(self, current: State, updates: list[Update]) -> State:
        if self.distributed:
            return self._aggregate_distributed(current, updates)
        deltas, norms, clipped = self.clip(current, updates)
        used_norm = self.clipping_norm
        noised, released = self.release(current, deltas)
        if self.adaptive is not None:  # Flower's rule, after the release that used the old norm, fed
            # with the share of updates NOT clipped (Andrew et al.'s b; see the module docstring)
            self.adaptive.clipping_norm = self.clipping_norm
            adaptive_clipping_update(self.adaptive, len(deltas) - clipped, len(deltas))
            self.clipping_norm = float(self.adaptive.clipping_norm)
        self._account()
        self.last = {"central-epsilon": self.epsilon(), "central-delta": self.delta,
                     "central-noise-multiplier": self.noise_multiplier, "central-clipping-norm": used_norm,
                     "central-clipped-fraction": clipped / len(deltas) if deltas else float("nan"),
                     "central-update-norm-median": float(np.median(norms)) if norms else float("nan"), **released}
        return self.inner.aggregate(current, [Update("central-dp", noised, 1)])

    def _aggregate_distributed(self, current: State, updates: list[Update]) -> State:
        """Secure aggregation: ``updates`` is the one secure mean of the sites' clipped, noised deltas
        (``medgen/server/secure.py``); nothing is clipped or noised here, the round is accounted."""
        if len(updates) != 1:
            raise ValueError(f"distributed central DP takes the one secure mean, got {len(updates)} updates")
        self._account()
        self.last = {"central-epsilon": self.epsilon(), "central-delta": self.delta,
                     "central-noise-multiplier": self.noise_multiplier,
                     "central-clipping-norm": self.clipping_norm, "central-distributed": 1.0}
        return self.inner.aggregate(current, [Update("central-dp", updates[0].state, 1)])

    def _account(self) -> None:
        z, q = self.noise_multiplier, self.sample_rate
        if self.history and self.history[-1][:2] == (z, q):
            self.history[-1] = (z, q, self.history[-1][2] + 1)
        else:
            self.history.append((z, q, 1))

    def epsilon(self) -> float:
        return epsilon(self.history, self.delta)

    # ------------------------------------------------------------------ aggregator interface
    def payload(self, site: str, current: State) -> State:
        return self.inner.payload(site, current)

    def round_metrics(self) -> dict[str, float]:
        return dict(self.last)

    def state(self) -> dict:
        return {"inner": self.inner.state(), "central": {"history": self.history, "clipping_norm": self.clipping_norm}}

    def load_state(self, state: dict) -> None:
        self.inner.load_state(state.get("inner", {}))
        central = state.get("central", {})
        self.history = [tuple(h) for h in central.get("history", [])]
        self.clipping_norm = float(central.get("clipping_norm", self.clipping_norm))
