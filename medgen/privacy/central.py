"""Central DP at the server (``privacy.central``): a site-level guarantee.

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
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

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
    return float(get_noise_multiplier(target_epsilon=c.target_epsilon, target_delta=c.delta,
                                      sample_rate=sample_rate(cfg), steps=cfg.federation.rounds, accountant="rdp"))


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Site-level epsilon of the releases in ``history`` [(noise multiplier, sample rate, rounds)]."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


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

    # ------------------------------------------------------------------ the mechanism
    def clip(self, current: State, updates: list[Update]) -> tuple[list[list[np.ndarray]], list[float], int]:
        """(clipped deltas as float64 arrays over the floating keys, norms before clipping, clipped count)."""
        keys = _floating(current)
        base = [current[k].double().numpy() for k in keys]
        deltas, norms, clipped = [], [], 0
        for u in updates:
            delta = [u.state[k].double().numpy() - b for k, b in zip(keys, base)]
            norms.append(get_norm(delta))
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
