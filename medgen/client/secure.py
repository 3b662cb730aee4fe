"""The site's side of secure aggregation (``federation.secure_aggregation: secaggplus``; the
protocol is ``medgen/privacy/secagg.py``). Its secrets for the round live in the node's
``context.state`` (kept by the site's SuperNode, or the simulation engine, between messages; never
sent) with the stage reached, so that each step runs once, in order, for one round:

    keys -> shares -> mask (the training message) -> unmask

Each step checks what the server asks before it answers, and raises SecAggError (the site's reply
is an error, the server counts the site as dropped) when it could not be an honest request — or
when the sum it would go into holds fewer sites' updates than the site's policy allows
(``min_secagg_sites``: ``min_sites``; None, a simulated site without a policy, checks nothing).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from medgen.config import Config
from medgen.privacy.secagg import Quantiser, SecAggError, SiteKeys, check_threshold, mask, open_shares, share_keys

STATE = "secagg"
KEYS, SHARES, OPENED = "secagg-keys", "secagg-shares", "secagg-open"  # records of the messages
NORMS = "fedbn-norms"  # the site's own normalisation parameters (fedbn), never sent


def floating_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose values are summed, in the order both sides flatten them."""
    return sorted(k for k, v in state.items() if v.is_floating_point())


def flat_delta(local: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> np.ndarray:
    """local - reference over :func:`floating_keys`, one float64 vector."""
    return np.concatenate([(local[k].double() - reference[k].double()).numpy().ravel()
                           for k in floating_keys(reference)])


def own_norms(context: Context, model) -> None:
    """``federation.strategy: fedbn`` under secure aggregation: the server sees only the sum, so the
    site keeps its own normalisation parameters (``model.norm_keys()``) in its node context between
    rounds and trains from them instead of the global mean (as the server does for each site in the
    clear). The first round, and a run resumed on a new node context, start from the global mean."""
    if NORMS in context.state:
        model.load_state_dict({**model.state_dict(), **context.state[NORMS].to_torch_state_dict()})


def keep_norms(context: Context, model) -> None:
    """After training: the site's normalisation parameters for its next round (see :func:`own_norms`)."""
    state = model.state_dict()
    context.state[NORMS] = ArrayRecord({k: state[k].detach().clone() for k in model.norm_keys()})


def _state(context: Context, round_: int, stage: str) -> ConfigRecord:
    state = context.state[STATE] if STATE in context.state else None
    if state is None or int(state["round"]) != round_ or str(state["stage"]) != stage:
        at = "nothing" if state is None else f"round {int(state['round'])}, stage {state['stage']}"
        raise SecAggError(f"secure aggregation: asked for the step after {stage!r} of round {round_}, but this site "
                          f"is at {at}")
    return state


def _enough(n: int, min_sites: int | None, what: str) -> None:
    """SecAggError naming the policy key when a sum of ``n`` sites' updates is too small for the site."""
    if min_sites is not None and n < min_sites:
        raise SecAggError(f"min_secagg_sites: {what} {n} sites < {min_sites} (this site's policy): refused, a sum of "
                          f"so few updates would let the others learn this site's")


def _keys(state: ConfigRecord) -> SiteKeys:
    return SiteKeys(bytes(state["enc"]), bytes(state["mask"]), bytes(state["seed"]))


def _public(state: ConfigRecord) -> dict[str, list[bytes]]:
    return {s: [bytes(state["pub-enc"][i]), bytes(state["pub-mask"][i]), bytes(state["pub-hash"][i])]
            for i, s in enumerate(state["sites"])}


def keys(msg: Message, context: Context, site: str, round_: int, min_sites: int | None = None) -> ConfigRecord:
    """Step 1: fresh keys and seed for this round; the reply carries their public parts."""
    config = msg.content["config"]
    sites, threshold = [str(s) for s in config["secagg-sites"]], int(config["secagg-threshold"])
    if site not in sites or len(set(sites)) != len(sites):
        raise SecAggError(f"site {site} is not (once) in this round's site list")
    _enough(len(sites), min_sites, "this round's secure sum would hold")
    check_threshold(threshold, len(sites))
    new = SiteKeys.new()
    context.state[STATE] = ConfigRecord({"round": round_, "stage": "keys", "sites": sites, "threshold": threshold,
                                         "enc": new.enc_private, "mask": new.mask_private, "seed": new.seed})
    return ConfigRecord({"public": new.public()})


def shares(msg: Message, context: Context, site: str, round_: int, min_sites: int | None = None) -> ConfigRecord:
    """Step 2: the shares of this site's seed and mask key, one ciphertext per other site."""
    state = _state(context, round_, "keys")
    given = msg.content[KEYS]
    public = {str(s): [bytes(v) for v in given[s]] for s in given}
    if not set(public) <= set(state["sites"]):
        raise SecAggError(f"the key list names sites not asked this round: {sorted(set(public) - set(state['sites']))}")
    threshold = int(state["threshold"])
    if len(public) < threshold:
        raise SecAggError(f"{len(public)} sites sent keys < threshold {threshold}")
    _enough(len(public), min_sites, "sites that sent keys:")
    out = share_keys(site, _keys(state), round_, public, threshold)
    order = list(public)
    state.update({"stage": "shares", "sites": order, "own-share": out.pop(site),
                  "pub-enc": [public[s][0] for s in order], "pub-mask": [public[s][1] for s in order],
                  "pub-hash": [public[s][2] for s in order]})
    return ConfigRecord(out)


def mask_plan(msg: Message, context: Context, site: str, round_: int, min_sites: int | None = None) -> dict:
    """Before training (step 3): check the sites the server says got every share, keep the
    ciphertexts addressed to this site; returns what :func:`masked` needs."""
    state = _state(context, round_, "shares")
    sites = [str(s) for s in msg.content["config"]["secagg-sites"]]
    public = _public(state)
    if site not in sites or not set(sites) <= set(public) or len(set(sites)) != len(sites):
        raise SecAggError("the sites of the masking step are not a subset of the round's sites with this one")
    if len(sites) < int(state["threshold"]):
        raise SecAggError(f"{len(sites)} sites shared their keys < threshold {int(state['threshold'])}")
    _enough(len(sites), min_sites, "sites of the masking step:")
    held = msg.content[SHARES]
    owners = sorted(str(s) for s in held)
    if owners != sorted(set(sites) - {site}):
        raise SecAggError("the shares forwarded to this site are not one from each other site of the round")
    state.update({"held-from": owners, "held": [bytes(held[s]) for s in owners], "mask-sites": sites})
    return {"public": {s: public[s] for s in sites}, "keys": _keys(state), "state": state}


def masked(plan: dict, cfg: Config, site: str, round_: int, local: dict[str, torch.Tensor],
           reference: dict[str, torch.Tensor], weight: int) -> tuple[ArrayRecord, dict[str, float]]:
    """Step 3: the masked quantised weighted update (uint64 of length 1 + D) and the number of
    clipped coordinates (the only number about it that leaves in the clear).

    With ``privacy.central`` (distributed central DP, ``medgen/privacy/central.py``): the update is
    the site's delta clipped to L2 norm C plus its share of the noise, z C / sqrt(t) for the round's
    threshold t — the t this site checked at the key exchange and enforces when it opens its shares
    — sent with weight 1; the clipped count is not sent (it would say something about the delta
    that no noise covers)."""
    fed = cfg.federation
    delta, numbers = flat_delta(local, reference), {}
    if cfg.privacy.central.enabled:
        from medgen.privacy.central import site_release  # noqa: PLC0415  (imports Flower's DP functions)

        delta, numbers = site_release(cfg, delta, int(plan["state"]["threshold"]))
        weight = 1
    x, clipped = Quantiser(fed.secagg_clip, fed.secagg_bits).encode(delta, weight)
    if not cfg.privacy.central.enabled:
        numbers["secagg-clipped-coordinates"] = clipped
    y = mask(site, plan["keys"], round_, x, plan["public"])
    plan["state"]["stage"] = "masked"
    return ArrayRecord({"masked": Array(y)}), numbers


def unmask(msg: Message, context: Context, site: str, round_: int, min_sites: int | None = None) -> ConfigRecord:
    """Step 4, answered once per round: the shares the server needs, never both of one site's, and
    none for a sum of fewer survivors than ``min_sites``."""
    state = _state(context, round_, "masked")
    config = msg.content["config"]
    survivors = [str(s) for s in config["secagg-survivors"]]
    dropped = [str(s) for s in config.get("secagg-dropped", [])]
    sites = [str(s) for s in state["mask-sites"]]
    public = {s: v for s, v in _public(state).items() if s in sites}
    held = dict(zip([str(s) for s in state["held-from"]], [bytes(b) for b in state["held"]]))
    held[site] = bytes(state["own-share"])
    state["stage"] = "opened"  # before answering: a second request for this round is refused
    _enough(len(survivors), min_sites, "survivors whose sum the shares would unmask:")
    return ConfigRecord(open_shares(site, _keys(state), round_, public, held, survivors, dropped,
                                    int(state["threshold"])))
