"""One federated round under secure aggregation (``federation.secure_aggregation: secaggplus``):
the server's side of SecAgg+ (``medgen/privacy/secagg.py``) over the Message API, as four
exchanges with the round's training sites:

    train.secagg_keys -> train.secagg_shares -> train (masked update) -> train.secagg_unmask

A site that fails, times out or sends something malformed at a step is logged and counted as
dropped from then on; the round goes on while at least t sites (``federation.secagg_threshold``,
null = n // 2 + 1) and at least :data:`MIN_SUM_SITES` remain, and otherwise fails (finished rounds
are kept; each site also refuses sums smaller than its policy's ``min_secagg_sites``). What the
server holds during the round: public keys, ciphertexts it cannot open, masked vectors, and at the end the
shares needed to remove the masks of the sum — never one site's update.

With ``privacy.central`` each site sends its clipped, noised delta with weight 1
(``medgen/privacy/central.py``, distributed noise): the decoded sum's total weight must then be the
number of survivors, the decoded mean is handed to ``CentralDP`` (which only accounts it), and the
round record gets the decoded mean's noise std.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType

from medgen.client.secure import KEYS, OPENED, SHARES, floating_keys
from medgen.privacy.secagg import Quantiser, SecAggError, check_public, unmask
from medgen.server.errors import FederationError
from medgen.server.strategy import State, Update
from medgen.server.validation import Rejected, read_masked


MIN_SUM_SITES = 3  # no sum of fewer sites' updates is published: in a sum of two, each learns the other's


def threshold(configured: int | None, n: int) -> int:
    return configured if configured is not None else n // 2 + 1


def apply_mean(current: State, mean: np.ndarray) -> State:
    """``current`` moved by ``mean`` (float64 over :func:`floating_keys`); other tensors kept."""
    out, at = {k: v.clone() for k, v in current.items()}, 0
    for key in floating_keys(current):
        value = current[key]
        part = torch.from_numpy(mean[at: at + value.numel()].reshape(value.shape))
        out[key] = (value.double() + part).to(value.dtype)
        at += value.numel()
    return out


class SecureRound:
    """The server's side of one round; ``fed`` is the :class:`medgen.server.federation.Federation`."""

    def __init__(self, fed, round_: int):
        self.fed, self.round, self.cfg = fed, round_, fed.cfg.federation
        self.quantiser = Quantiser(self.cfg.secagg_clip, self.cfg.secagg_bits)
        self.metrics: dict[str, float] = {}

    def _fail(self, what: str) -> FederationError:
        return FederationError(f"round {self.round}: secure aggregation: {what}; the round is not aggregated, "
                               f"finished rounds are kept")

    def _ask(self, sites: list[str], kind: str, phase: str, per_site=None, **config) -> dict:
        """Send ``kind`` with ``config`` to ``sites`` (``per_site(site)``: its weights and records)."""
        msgs = {}
        for s in sites:
            weights, records = per_site(s) if per_site else (None, {})
            msgs[s] = self.fed._message(self.fed.nodes[s], kind, self.round, weights, extra=config, records=records)
        return self.fed._exchange(self.round, phase, msgs)

    def _reject(self, site: str, phase: str, reason: str) -> None:
        self.fed.log(f"round {self.round}: site {site} {phase} REJECTED: {reason}")
        self.fed.run.log(self.round, site, phase, {"error": f"secure aggregation: {reason}"})

    def _refused(self, site: str, reply, phase: str) -> bool:
        info = reply.content["info"] if "info" in reply.content else {}
        if "refused" not in info:
            return False
        reason = str(info["refused"])
        epsilon = dict(reply.content["metrics"]).get("epsilon", 0.0) if "metrics" in reply.content else 0.0
        self.fed.exhausted.add(site)
        self.fed.log(f"round {self.round}: site {site} refused to train: {reason}")
        self.fed.run.log(self.round, site, phase, {"refused": reason, "epsilon": epsilon})
        return True

    def _need(self, sites, t: int, step: str) -> None:
        if len(sites) < t:
            raise self._fail(f"{len(sites)} sites left after {step} < federation.secagg_threshold={t} "
                             f"({', '.join(sites) or 'none'})")
        if len(sites) < MIN_SUM_SITES:
            raise self._fail(f"{len(sites)} sites left after {step} < {MIN_SUM_SITES}: no sum of fewer sites' "
                             f"updates is published (each would learn the other's) ({', '.join(sites) or 'none'})")

    def run(self, asked: list[str], state: State, payload) -> tuple[Update | None, dict[str, dict]]:
        """(the sum as one update of weight N, each counted site's training metrics); (None, {})
        when every site refused to train. ``payload(site, state)``: the weights a site trains from."""
        fed, t0 = self.fed, time.perf_counter()
        sites = [s for s in asked if s in fed.nodes]
        t = threshold(self.cfg.secagg_threshold, len(sites))
        if len(sites) < MIN_SUM_SITES:
            raise self._fail(f"{len(sites)} sites in the round ({', '.join(sites) or 'none'}) < {MIN_SUM_SITES}: no "
                             f"sum of fewer sites' updates is published (each would learn the other's)")
        if t > len(sites) or 2 * t <= len(sites) or t < 2:
            raise self._fail(f"{len(sites)} sites in the round, federation.secagg_threshold={t} must be a majority "
                             f"of them and at most all")
        central = fed.cfg.privacy.central.enabled  # distributed noise: each site sends weight 1
        declared = len(sites) if central else sum(fed.declared.get(s, 0) for s in sites)
        if declared > self.quantiser.max_weight():
            raise self._fail(f"{declared} training slices x 2^{self.cfg.secagg_bits} levels overflow 2^64; lower "
                             f"federation.secagg_bits")

        # 1. public keys
        public = {}
        for site, reply in self._ask(sites, f"{MessageType.TRAIN}.secagg_keys", "secagg-keys",
                                     **{"secagg-sites": sites, "secagg-threshold": t}).items():
            if self._refused(site, reply, "train"):
                continue
            try:
                value = [bytes(v) for v in reply.content[KEYS]["public"]]
                check_public({site: value})
            except (KeyError, TypeError, SecAggError) as e:
                self._reject(site, "secagg-keys", f"malformed public keys ({e})")
                continue
            public[site] = value
        try:
            check_public(public)
        except SecAggError as e:
            raise self._fail(str(e)) from None
        self._need(public, t, "key exchange")
        u1 = list(public)

        # 2. encrypted shares, routed: holder -> {owner: ciphertext}
        held: dict[str, dict[str, bytes]] = {s: {} for s in u1}
        keys_record = ConfigRecord({s: public[s] for s in u1})
        shared = set()
        for site, reply in self._ask(u1, f"{MessageType.TRAIN}.secagg_shares", "secagg-shares",
                                     lambda s: (None, {KEYS: keys_record})).items():
            try:
                shares = {str(k): bytes(v) for k, v in reply.content[SHARES].items()}
            except (KeyError, TypeError) as e:
                self._reject(site, "secagg-shares", f"malformed shares ({e})")
                continue
            if sorted(shares) != sorted(set(u1) - {site}):
                self._reject(site, "secagg-shares", "shares are not one for each other site of the round")
                continue
            for holder, blob in shares.items():
                held[holder][site] = blob
            shared.add(site)
        u2 = [s for s in u1 if s in shared]
        self._need(u2, t, "sharing keys")

        # 3. training: each site sends its masked weighted update
        length = 1 + sum(v.numel() for k, v in state.items() if v.is_floating_point())

        def train_message(site: str):
            return payload(site, state), {SHARES: ConfigRecord({o: held[site][o] for o in u2 if o != site})}

        masked, accepted = {}, {}
        for site, reply in self._ask(u2, MessageType.TRAIN, "train", train_message, **{"secagg-sites": u2}).items():
            if self._refused(site, reply, "train"):
                continue
            try:
                vector, metrics, _ = read_masked(reply, length, fed.declared.get(site))
            except Rejected as e:
                fed.log(f"round {self.round}: site {site} update REJECTED: {e}")
                fed.run.log(self.round, site, "train", {"error": f"update rejected: {e}"})
                continue
            masked[site], accepted[site] = vector, metrics
        if not masked and set(u2) <= fed.exhausted:
            return None, {}
        survivors = [s for s in u2 if s in masked]
        dropped = [s for s in u2 if s not in masked]
        self._need(survivors, t, "training")

        # 4. unmasking: the survivors open the shares of the others' seeds or mask keys
        opened = {}
        for site, reply in self._ask(survivors, f"{MessageType.TRAIN}.secagg_unmask", "secagg-unmask",
                                     **{"secagg-survivors": survivors, "secagg-dropped": dropped}).items():
            try:
                shares = {str(k): bytes(v) for k, v in reply.content[OPENED].items()}
            except (KeyError, TypeError) as e:
                self._reject(site, "secagg-unmask", f"malformed shares ({e})")
                continue
            if sorted(shares) != sorted(u2):
                self._reject(site, "secagg-unmask", "opened shares are not one for each site of the round")
                continue
            opened[site] = shares
        self._need(list(opened), t, "unmasking")
        try:
            total = unmask(self.round, {s: public[s] for s in u2}, masked, opened, t)
            mean, weight = self.quantiser.decode(total)
        except SecAggError as e:
            raise self._fail(str(e)) from None
        counted = sum(int(accepted[s]["num-examples"]) for s in survivors)
        expected = len(survivors) if central else counted
        if weight != expected:
            what = "sites in it (each sends weight 1 under privacy.central)" if central else \
                "examples the sites in it reported"
            raise self._fail(f"the sum's total weight {weight} is not the {expected} {what}: some site sent a "
                             f"vector that is not an encoded update")
        if dropped:
            fed.log(f"round {self.round}: secure aggregation recovered from {len(dropped)} dropped site(s): "
                    f"{', '.join(dropped)}")
        self.metrics = {"secagg-sites": len(survivors), "secagg-dropped": len(dropped),
                        "secagg-threshold": t, "secagg-bound": self.quantiser.bound,
                        "secagg-time-s": time.perf_counter() - t0}
        if central:  # the decoded mean's noise: s survivors' shares of std z C / sqrt(t) each, over s
            from medgen.privacy.central import noise_multiplier, site_noise_std  # noqa: PLC0415

            c = fed.cfg.privacy.central
            per_site = site_noise_std(noise_multiplier(fed.cfg), c.clipping_norm, t)
            self.metrics["central-noise-std"] = float(per_site * np.sqrt(len(survivors)) / len(survivors))
        return Update("secure-sum", apply_mean(state, mean), counted), accepted

