"""What the server accepts from a site before anything is aggregated.

A training reply must hold weights with exactly the global model's keys, shapes and dtypes (checked
before any cast: a float64 1e300 becomes Inf only when cast to float32), finite values, finite
metrics, and a whole ``num-examples`` between 1 and the number of training slices the site declared
when it connected. Then, across the round, an update whose distance from the global model is more
than ``federation.max_update_ratio`` times the round's lower median distance is rejected or scaled
down to that bound (``federation.on_large_update``). Anything else is that site's problem: its
update is rejected with the reason logged, and the round goes on.

Under secure aggregation (``medgen/server/secure.py``) a site's reply holds a masked vector
instead of weights: :func:`read_masked` checks its metrics, dtype and length; the norm bound
cannot apply (it needs each site's update), the sum is checked instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Message

from medgen.config import FederationConfig
from medgen.server.strategy import State, Update


class Rejected(ValueError):
    """A site's update is not aggregated; the text says why."""


def check_update(state: State, reference: State) -> str | None:
    """Why an update must be rejected (missing / extra keys, wrong shape or dtype, NaN / Inf), or None."""
    missing, extra = reference.keys() - state.keys(), state.keys() - reference.keys()
    if missing or extra:
        return f"keys differ from the global model (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for key, ref in reference.items():
        value = state[key]
        if value.shape != ref.shape:
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key} has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key} holds NaN or Inf"
    return None


def read_metrics(reply: Message, declared: int | None) -> tuple[dict, int]:
    """(metrics, num-examples) of a training reply with arrays; Rejected naming what is wrong with them."""
    try:
        metrics = dict(reply.content["metrics"])
        reply.content["arrays"]
    except (KeyError, TypeError) as e:
        raise Rejected(f"malformed reply (no {e})") from None
    numbers = [x for v in metrics.values() for x in (v if isinstance(v, list) else [v])]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
        raise Rejected("metrics hold NaN, Inf or non-numbers")
    count = metrics.get("num-examples")
    if not isinstance(count, (int, float)) or count != int(count) or count < 1:
        raise Rejected(f"num-examples must be a whole number >= 1 (got {count!r})")
    if declared is not None and count > declared:
        raise Rejected(f"num-examples={count:g} is more than the {declared} training slices the site declared")
    return metrics, int(count)


def read_update(site: str, reply: Message, reference: State, declared: int | None) -> tuple[Update, dict]:
    """(update, metrics) of a training reply; Rejected naming what is wrong with it."""
    metrics, count = read_metrics(reply, declared)
    try:
        state = reply.content["arrays"].to_torch_state_dict()
    except Exception as e:  # a record that is not an ArrayRecord of tensors
        raise Rejected(f"malformed weights ({type(e).__name__}: {e})") from None
    if reason := check_update(state, reference):
        raise Rejected(reason)
    return Update(site, state, count), metrics


def read_masked(reply: Message, length: int, declared: int | None) -> tuple[np.ndarray, dict, int]:
    """(masked vector, metrics, num-examples) of a secure-aggregation training reply: its arrays
    must be one uint64 array ``masked`` of shape (length,); Rejected naming what is wrong with it."""
    metrics, count = read_metrics(reply, declared)
    record = reply.content["arrays"]
    try:
        keys = list(record.keys())
        vector = record["masked"].numpy() if keys == ["masked"] else None
    except Exception as e:  # not an ArrayRecord of numpy arrays
        raise Rejected(f"malformed masked vector ({type(e).__name__}: {e})") from None
    if vector is None:
        raise Rejected(f"the arrays must be one array 'masked' (got {keys[:3]})")
    if vector.dtype != np.uint64 or vector.shape != (length,):
        raise Rejected(f"masked vector is {vector.dtype} of shape {vector.shape}, expected uint64 of shape ({length},)")
    return vector, metrics, count


def update_norm(update: State, reference: State) -> float:
    """L2 distance of an update from the global model, over its floating tensors."""
    return math.sqrt(sum(float(((update[k].double() - v.double()) ** 2).sum())
                         for k, v in reference.items() if v.is_floating_point()))


def bound_norms(updates: list[Update], reference: State, cfg: FederationConfig) -> tuple[list[Update], dict[str, str]]:
    """The updates within ``max_update_ratio`` times the round's lower median distance (others
    rejected or scaled down to the bound), and the reason for each site touched."""
    if cfg.max_update_ratio is None or len(updates) < 2:
        return updates, {}
    norms = [update_norm(u.state, reference) for u in updates]
    median = float(torch.tensor(norms).median())  # the lower median: robust with two sites too
    bound = cfg.max_update_ratio * median
    kept, touched = [], {}
    for u, norm in zip(updates, norms):
        if norm <= bound:
            kept.append(u)
            continue
        what = (f"update norm {norm:.3g} > federation.max_update_ratio={cfg.max_update_ratio:g} x the round's "
                f"median {median:.3g}")
        if cfg.on_large_update == "reject":
            touched[u.site] = f"update rejected: {what}"
            continue
        scale = bound / norm
        state = {k: reference[k] + (v - reference[k]) * scale if v.is_floating_point() else v
                 for k, v in u.state.items()}
        kept.append(Update(u.site, state, u.num_examples))
        touched[u.site] = f"update clipped to norm {bound:.3g}: {what}"
    return kept, touched
