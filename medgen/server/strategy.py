"""Aggregation of site updates into the global model.

- ``fedavg``: example-weighted mean (McMahan et al. 2017).
- ``fedprox``: the same aggregation; the sites add mu/2 ||w - w_global||^2 (Li et al. 2020).
- ``fedadam`` / ``fedyogi``: the weighted mean defines a pseudo-gradient that a server-side Adam /
  Yogi step applies (Reddi et al. 2021, "Adaptive Federated Optimization").
- ``fedbn``: weighted mean of everything except normalisation parameters (the GroupNorm weight and
  bias keys, ``GenerativeModel.norm_keys()``): each training site gets its own back every round
  (Li et al. 2021). The global model — used by held-out sites and for sampling — carries their
  example-weighted mean. The server keeps each site's copy in its checkpoint so that a resumed run
  restores them; under secure aggregation, which shows the server only the sum, each site keeps its
  own in its node context instead (``medgen/client/secure.py``) and the server averages everything.

Robust rules, with Flower's aggregation functions (``medgen/_compat/flwr.py``), for studies where a
site may send a bad update; f = ``federation.num_malicious``:

- ``fedmedian``: the coordinate-wise median (Yin et al. 2018);
- ``fedtrimmedavg``: the coordinate-wise mean after cutting ``federation.trim_fraction`` of the
  values at each end;
- ``krum``: the one update with the smallest sum of squared distances to its n − f − 2 nearest
  (Blanchard et al. 2017); ``multikrum``: the example-weighted mean of the
  ``federation.multikrum_keep`` (default n − f) best;
- ``bulyan``: Multi-Krum selects n − 2f, then the coordinate-wise mean of the n − 4f values
  closest to their median (El Mhamdi et al. 2018); it needs n >= 4f + 3 updates, and with fewer
  the global model stays as it is for that round (as Flower's Bulyan does).

These ignore example counts (but multikrum's mean). A server that sees only sums (secure
aggregation) cannot apply them.

Every aggregator's state round-trips through ``state()`` / ``load_state()`` for checkpoints.
Central DP (``medgen.privacy.central.CentralDP``) wraps any of them but fedbn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


class Robust(FedAvg):
    """fedmedian, fedtrimmedavg, krum, multikrum and bulyan over the floating tensors; other
    tensors (counters) come from the current model."""

    def __init__(self, rule: str, num_malicious: int = 1, trim_fraction: float = 0.2, keep: int | None = None):
        self.rule, self.f, self.trim, self.keep = rule, num_malicious, trim_fraction, keep
        self.skipped = 0

    def aggregate(self, current: State, updates: list[Update]) -> State:
        from medgen._compat.flwr import aggregate_n_closest_weights, select_multikrum, trim_mean

        keys = [k for k, v in current.items() if v.is_floating_point()]
        stacks = {k: np.stack([u.state[k].double().numpy() for u in updates]) for k in keys}
        self.skipped = 0
        if self.rule == "fedmedian":
            merged = {k: np.median(s, axis=0) for k, s in stacks.items()}
        elif self.rule == "fedtrimmedavg":
            merged = {k: trim_mean(s, self.trim) for k, s in stacks.items()}
        else:
            if self.rule == "bulyan" and len(updates) < 4 * self.f + 3:
                self.skipped = 1
                return {k: v.clone() for k, v in current.items()}
            keep = {"krum": 1, "multikrum": self.keep or len(updates) - self.f,
                    "bulyan": len(updates) - 2 * self.f}[self.rule]
            chosen = self._select(updates, keys, max(1, keep), select_multikrum)
            if self.rule == "bulyan":
                layers = [[u.state[k].double().numpy() for k in keys] for u in chosen]
                median = [np.median(np.stack(layer), axis=0) for layer in zip(*layers)]
                beta = max(1, len(chosen) - 2 * self.f)
                merged = dict(zip(keys, aggregate_n_closest_weights(median, layers, beta)))
            else:
                mean = weighted_mean(chosen, current)
                merged = {k: mean[k].double().numpy() for k in keys}
        out = {k: v.clone() for k, v in current.items()}
        for k in keys:
            out[k] = torch.from_numpy(np.asarray(merged[k])).to(current[k].dtype)
        return out

    def _select(self, updates: list[Update], keys: list[str], keep: int, select) -> list[Update]:
        """The ``keep`` updates Flower's Multi-Krum rule picks."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        contents = [RecordDict({"arrays": ArrayRecord({k: Array(u.state[k].double().numpy()) for k in keys}),
                                "who": ConfigRecord({"i": i})}) for i, u in enumerate(updates)]
        return [updates[int(c["who"]["i"])] for c in select(contents, self.f, keep)]

    def round_metrics(self) -> dict[str, float]:
        return {"aggregation-skipped": float(self.skipped)} if self.rule == "bulyan" else {}


ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def make_aggregator(cfg: FederationConfig, norm_keys: list[str]) -> FedAvg:
    if cfg.strategy in ("fedavg", "fedprox"):
        return FedAvg()
    if cfg.strategy in ROBUST:
        return Robust(cfg.strategy, cfg.num_malicious, cfg.trim_fraction, cfg.multikrum_keep)
    if cfg.strategy == "fedbn" and cfg.secure_aggregation == "off":
        return FedBN(norm_keys)
    if cfg.strategy == "fedbn":  # the server sees only the sum: each site keeps its own (medgen/client/secure.py)
        return FedAvg()
    kind = FedYogi if cfg.strategy == "fedyogi" else FedAdam
    return kind(cfg.server_lr, cfg.server_betas, cfg.server_tau)
