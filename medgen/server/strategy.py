"""Aggregation of site updates into the global model.

- ``fedavg``: example-weighted mean (McMahan et al. 2017).
- ``fedprox``: the same aggregation; the sites add mu/2 ||w - w_global||^2 (Li et al. 2020).
- ``fedadam`` / ``fedyogi``: the weighted mean defines a pseudo-gradient that a server-side Adam /
  Yogi step applies (Reddi et al. 2021, "Adaptive Federated Optimization").
- ``fedbn``: weighted mean of everything except normalisation parameters (the GroupNorm weight and
  bias keys, ``GenerativeModel.norm_keys()``): each training site gets its own back every round
  (Li et al. 2021). The global model — used by held-out sites and for sampling — carries their
  example-weighted mean. The server keeps each site's copy in its checkpoint so that a resumed run
  restores them.

Every aggregator's state round-trips through ``state()`` / ``load_state()`` for checkpoints.
Central DP (``medgen.privacy.central.CentralDP``) wraps any of them but fedbn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medgen.config import FederationConfig

State = dict[str, torch.Tensor]


@dataclass
class Update:
    site: str
    state: State
    num_examples: int


def weighted_mean(updates: list[Update], current: State) -> State:
    """Example-weighted mean of floating tensors; other tensors (counters) come from ``current``."""
    total = sum(u.num_examples for u in updates)
    out = {}
    for key, value in current.items():
        if value.is_floating_point():
            out[key] = sum(u.state[key].double() * (u.num_examples / total) for u in updates).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


class FedAvg:
    def aggregate(self, current: State, updates: list[Update]) -> State:
        return weighted_mean(updates, current)

    def payload(self, site: str, current: State) -> State:
        """The weights sent to ``site`` for training."""
        return current

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def round_metrics(self) -> dict[str, float]:
        """Numbers about the last aggregation for the global train record (central DP's epsilon)."""
        return {}


class FedBN(FedAvg):
    def __init__(self, norm_keys: list[str]):
        self.norm_keys = list(norm_keys)
        self.site_norms: dict[str, State] = {}

    def aggregate(self, current: State, updates: list[Update]) -> State:
        for u in updates:
            self.site_norms[u.site] = {k: u.state[k].clone() for k in self.norm_keys}
        return weighted_mean(updates, current)

    def payload(self, site: str, current: State) -> State:
        return {**current, **self.site_norms.get(site, {})}

    def state(self) -> dict:
        return {"site_norms": self.site_norms}

    def load_state(self, state: dict) -> None:
        self.site_norms = state.get("site_norms", {})


class FedAdam(FedAvg):
    """Server-side adaptive optimiser on the pseudo-gradient delta = mean(updates) - current."""

    yogi = False

    def __init__(self, lr: float, betas: tuple[float, float], tau: float):
        self.lr, (self.beta1, self.beta2), self.tau = lr, betas, tau
        self.m: State = {}
        self.v: State = {}

    def aggregate(self, current: State, updates: list[Update]) -> State:
        mean = weighted_mean(updates, current)
        out = {}
        for key, value in current.items():
            if not value.is_floating_point():
                out[key] = mean[key]
                continue
            delta = mean[key] - value
            m = self.m.get(key, torch.zeros_like(value))
            v = self.v.get(key, torch.zeros_like(value))
            m = self.beta1 * m + (1 - self.beta1) * delta
            if self.yogi:
                v = v - (1 - self.beta2) * delta**2 * torch.sign(v - delta**2)
            else:
                v = self.beta2 * v + (1 - self.beta2) * delta**2
            self.m[key], self.v[key] = m, v
            out[key] = value + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict) -> None:
        self.m, self.v = state.get("m", {}), state.get("v", {})


class FedYogi(FedAdam):
    yogi = True


def make_aggregator(cfg: FederationConfig, norm_keys: list[str]) -> FedAvg:
    if cfg.strategy in ("fedavg", "fedprox"):
        return FedAvg()
    if cfg.strategy == "fedbn":
        return FedBN(norm_keys)
    kind = FedYogi if cfg.strategy == "fedyogi" else FedAdam
    return kind(cfg.server_lr, cfg.server_betas, cfg.server_tau)
