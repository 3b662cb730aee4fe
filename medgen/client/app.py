"""The site: a Flower ClientApp. It receives the global weights and the run's config, checks the
config against the site's policy, trains or evaluates on its own slices, and sends back weights and
aggregate numbers — never images unless its policy allows them. Every message it sends is written
to its sent-message log first (``sent_log.py``).

Binding a node to its site: in a deployment the SuperNode's node config names the site and its
own folders (``site="A" data-dir="/data/A" state-dir="..." policy="..."``, written by
``medgen-client join``), and nothing in the server's config can move them; in simulation the
node's ``partition-id`` indexes ``sites.train + sites.heldout``, the folder is
``data.root/<site>``, the state folder ``<run>/sites/<site>`` and the policy
``sites.policies[<site>]``.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medgen.client import secure, sent_log
from medgen.client.policy import (budget, budget_delta, plan_violations, policy_summary, refusal_text, site_config,
                                  violations)
from medgen.client.task import (evaluate_local, local_steps, proximal_term, release_device, site_data, site_seed,
                                train_local)
from medgen.config import Config, SitePolicy, load_config_text, load_policy
from medgen.data.check import counts_text, scan_headers
from medgen.data.dataset import concat_slices
from medgen.data.picture import write_site_picture
from medgen.data.errors import DataError, SiteDataError
from medgen.deployment.signing import check_study, study_identity
from medgen.data.sites import discover_site
from medgen.deployment.handshake import check_handshake
from medgen.evaluation.plan import EvaluationPlan
from medgen.evaluation.site import evaluate_site
from medgen.models import build_model
from medgen.privacy.dp import plan, secret_seed, site_secret
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger

app = ClientApp()
POLICY_FILE = "policy.yaml"


@dataclass(frozen=True)
class Site:
    """A node's site: its name, data folder, state folder (privacy ledger, DP secret, sent-message
    log) and policy (None: a simulated site without one checks nothing)."""

    name: str
    folder: Path
    state: Path
    policy: SitePolicy | None
    deployed: bool


def bind_site(cfg: Config, node_config: dict, message_config: dict) -> Site:
    """The site of this node. Deployed (``site`` in the node config): every folder and the policy
    come from the node config; a policy file that does not exist means the safe defaults.
    Simulated: from the run's config."""
    if "site" in node_config:
        name = str(node_config["site"])
        missing = [k for k in ("data-dir", "state-dir") if not node_config.get(k)]
        if missing:
            raise ValueError(f"site {name}: the SuperNode's node config lacks {', '.join(missing)}; start it with "
                             f"`medgen-client join`, which names the site's own folders")
        state = Path(str(node_config["state-dir"]))
        policy_file = Path(str(node_config.get("policy") or state / POLICY_FILE))
        policy = load_policy(policy_file) if policy_file.is_file() else SitePolicy()
        return Site(name, Path(str(node_config["data-dir"])), state, policy, True)
    name = cfg.sites.all[int(node_config["partition-id"])]
    if cfg.data.root is None:
        raise ValueError("data.root is not set: the simulation must resolve the cohort folder first")
    return Site(name, Path(cfg.data.root) / name, Path(str(message_config["state-root"])) / name,
                cfg.sites.policies.get(name), False)


def site_cache(site: Site) -> Path | None:
    """A deployed site's slice cache: its policy's, else ``$MEDGEN_CACHE_DIR``, else in its state
    folder. A simulated site keeps the run's (None), unless its policy names one."""
    own = site.policy.cache_dir if site.policy else None
    if not site.deployed:
        return own
    return own or Path(os.environ.get("MEDGEN_CACHE_DIR") or site.state / "cache")


class SiteFailure(RuntimeError):
    """What a site reports to the server instead of its result; the text names the site."""


def client_threads(cfg: Config) -> int:
    """torch threads of a site's work: ``$MEDGEN_CLIENT_THREADS`` if set, else the CPUs a simulated
    site reserves (``simulation.client_cpus``, at least 1)."""
    return int(os.environ.get("MEDGEN_CLIENT_THREADS") or max(1, int(cfg.simulation.client_cpus or 1)))


_KIND = {MessageType.QUERY: "query", MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}


def _handler(fn):
    """Bind the node to its site and check the run before any data is read — the version
    handshake and the study signature (both required at a deployed site), then the site's
    policy; put back what the site owns (its cache, what it reads, its image policy); run
    ``fn(msg, cfg, site, round, context)``. Every reply, refusal and error goes to the site's sent-message
    log before it leaves; an error's text names the problem, not the site's paths (the site's own
    log, stderr, keeps them)."""

    @functools.wraps(fn)
    def wrapped(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        cfg = load_config_text(str(config["medgen-config"]))
        torch.set_num_threads(client_threads(cfg))
        node_config = dict(context.node_config)
        try:
            site = bind_site(cfg, node_config, dict(config))
        except Exception as e:  # no site folders to log to: only the reason goes back
            print(f"medgen ClientApp: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise SiteFailure(f"{type(e).__name__}: {sent_log.redact(str(e))}") from None
        kind, round_ = msg.metadata.message_type, int(config.get("round", 0))
        entry = {"run": int(context.run_id), "kind": _KIND.get(kind, kind), "round": round_}
        refusal = check_handshake(dict(context.run_config), cfg, required=site.deployed) \
            or check_study(node_config, context.run_id, dict(config))
        if refusal is None and site.policy is not None:
            found = violations(cfg, site.policy, site.name, study_identity(dict(config)))
            refusal = refusal_text(site.name, found) if found else None
        try:  # a reply or refusal whose log entry cannot be written does not leave
            if refusal:
                print(f"site {site.name}: REFUSED: {refusal}", file=sys.stderr, flush=True)
                if kind == MessageType.EVALUATE:
                    sent_log.append(site.state, {**entry, "status": "error", "reason": refusal})
                    raise SiteFailure(f"site {site.name}: {refusal}")
                return _sent(site, entry, _refuse(msg, site.name, refusal), cfg)
            cfg = site_config(cfg, site.policy, site_cache(site))
            try:
                reply = fn(msg, cfg, site, round_, context)
            finally:  # the message's model and batches are gone: give their GPU memory back
                release_device(cfg)
            return _sent(site, entry, reply, cfg)
        except SiteFailure:
            raise
        except Exception as e:
            print(f"site {site.name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            text = f"site {site.name}: {type(e).__name__}: {sent_log.redact(str(e))}"
            try:
                sent_log.append(site.state, {**entry, "status": "error", "reason": text})
            except OSError as log_error:  # e.g. the state folder itself is what broke
                print(f"site {site.name}: cannot write the sent-message log: {log_error}", file=sys.stderr, flush=True)
            raise SiteFailure(text) from None

    return wrapped


def _sent(site: Site, entry: dict, reply: Message, cfg: Config) -> Message:
    info = reply.content["info"]
    if entry["kind"] == "query" and site.policy is not None:  # the coordinator sees what each site allows
        info["policy"] = policy_summary(site.policy)
    status = "refused" if "refused" in info else "error" if "error" in info else "reply"
    reason = {"reason": str(info[status])} if status != "reply" else {}
    sent_log.append(site.state, {**entry, "status": status, **reason,
                                 "records": sent_log.describe(reply.content, cfg.data.image_size)})
    return reply


def data_summary(train, val) -> dict:
    """Aggregate numbers about a site's data (what the report shows; no image leaves)."""
    pixels = np.concatenate([train.images[train.brain], val.images[val.brain]])
    hist, _ = np.histogram(pixels, bins=32, range=(0.0, 1.0))
    lesion_subjects = set(train.lesion_subjects) | set(val.lesion_subjects)
    return {"train-examples": len(train), "eval-examples": len(val),
            "lesion-slices": int((train.labels == 1).sum() + (val.labels == 1).sum()),
            "train-lesion-slices": int((train.labels == 1).sum()),
            "healthy-subjects": len((set(train.subjects.tolist()) | set(val.subjects.tolist())) - lesion_subjects),
            "subjects": len(set(train.subjects.tolist()) | set(val.subjects.tolist())),
            "intensity-hist": (hist / max(1, hist.sum())).tolist()}


def _reply(msg: Message, site: str, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    values = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()}
    content = RecordDict({"metrics": MetricRecord(values),
                          "info": ConfigRecord({"site": site})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _refuse(msg: Message, site: str, reason: str, metrics: dict | None = None) -> Message:
    """The reply of a site that will not take part (to a query: the server leaves it out and asks
    again next round; to a training round: the server goes on without it)."""
    reply = _reply(msg, site, metrics or {})
    reply.content["info"]["refused"] = reason
    return reply


@app.query()
@_handler
def query(msg: Message, cfg: Config, site: Site, round_: int, context: Context) -> Message:
    """Which site is this node, and how much data does it hold. A site whose data is unusable says
    so here (the server leaves it out and asks again next round) rather than crashing."""
    try:
        train, val = site_data(cfg, site.name, site.folder, heldout=site.name in cfg.sites.heldout)
    except (DataError, SiteDataError) as e:
        print(f"site {site.name}: {e}", file=sys.stderr, flush=True)
        reply = _reply(msg, site.name, {})
        reply.content["info"]["error"] = sent_log.redact(str(e))
        return reply
    for problem in train.problems:  # the site's own log names them; the server gets the count
        print(f"site {site.name}: skipped: {problem}", file=sys.stderr, flush=True)
    write_site_picture(concat_slices([train, val], site.name), site.state, site.name)  # stays in its state folder
    reply = _reply(msg, site.name, {**data_summary(train, val), "skipped-files": len(train.problems)})
    listing = discover_site(site.folder, cfg.data)
    voxel_sizes, orientations, _ = scan_headers(listing.scans)
    reply.content["info"]["voxel-sizes"] = counts_text(voxel_sizes)
    reply.content["info"]["orientations"] = counts_text(orientations)
    reply.content["info"]["contrasts"] = sorted({s.contrast or "unknown" for s in listing.scans})
    return reply


@app.train()
@_handler
def train(msg: Message, cfg: Config, site: Site, round_: int, context: Context) -> Message:
    """Train on the global weights; reply with the new weights, or under secure aggregation with
    their masked quantised difference from the global weights (``medgen/client/secure.py``)."""
    if site.name in cfg.sites.heldout:
        raise RuntimeError(f"site {site.name} is held out (sites.heldout) and must never train")
    secagg = secure.mask_plan(msg, context, site.name, round_, _min_sites(site)) \
        if cfg.federation.secure_aggregation != "off" else None
    data, _ = site_data(cfg, site.name, site.folder)
    steps = local_steps(cfg, len(data))
    if site.policy is not None and steps > site.policy.max_local_steps:
        return _refuse(msg, site.name, refusal_text(site.name, [f"max_local_steps: {steps} steps this round > "
                                                                f"{site.policy.max_local_steps}"]))
    dp = ledger = None
    seed = site_seed(cfg, site.name, round_)
    if cfg.privacy.enabled:
        dp = plan(cfg, data, steps)
        ledger = PrivacyLedger(site.state, site.name)
        try:
            if site.policy is not None and (found := plan_violations(dp, site.policy)):
                raise BudgetExceeded(refusal_text(site.name, found))
            delta = budget_delta(site.policy, dp) if site.policy is not None else dp.delta
            ledger.check_budget((dp.noise_multiplier, dp.sample_rate, dp.steps), delta,
                                *budget(site.policy, cfg, site.name))
        except BudgetExceeded as e:  # a refusal, not a crash: the server goes on without this site
            print(f"site {site.name}: REFUSED: {e}", file=sys.stderr, flush=True)
            return _refuse(msg, site.name, str(e), {"epsilon": ledger.epsilon(dp.delta)})
        seed = secret_seed(site_secret(site.state), cfg.seed, site.name, round_)  # batches and noise
    model = build_model(cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_state)
    site_norms = secagg is not None and cfg.federation.strategy == "fedbn"
    if site_norms:
        secure.own_norms(context, model)
    extra = proximal_term(model, global_state, cfg.federation.proximal_mu) \
        if cfg.federation.strategy == "fedprox" else None
    metrics = train_local(model, data, cfg, seed, extra_loss=extra, dp=dp)
    if site_norms:
        secure.keep_norms(context, model)
    if dp:
        metrics.update(ledger.spend(dp, round_))
    if secagg is not None:  # the checks of the masking step ran before any training
        arrays, numbers = secure.masked(secagg, cfg, site.name, round_, model.state_dict(), global_state,
                                        int(metrics["num-examples"]))
        return _reply(msg, site.name, {**metrics, **numbers}, arrays)
    return _reply(msg, site.name, metrics, ArrayRecord(model.state_dict()))


def _min_sites(site: Site) -> int | None:
    """The fewest sites' updates a secure sum may hold for this site (its policy; None: no policy)."""
    return site.policy.min_secagg_sites if site.policy is not None else None


def _secagg_step(step, record: str):
    """A secure-aggregation step of a training site: its reply carries the step's record."""

    def run(msg: Message, cfg: Config, site: Site, round_: int, context: Context) -> Message:
        if site.name not in cfg.sites.train or cfg.federation.secure_aggregation == "off":
            raise RuntimeError(f"site {site.name}: a secure-aggregation step, but the site does not train with it")
        reply = _reply(msg, site.name, {})
        reply.content[record] = step(msg, context, site.name, round_, _min_sites(site))
        return reply

    run.__name__ = run.__qualname__ = step.__name__
    return run


app.train("secagg_keys")(_handler(_secagg_step(secure.keys, secure.KEYS)))
app.train("secagg_shares")(_handler(_secagg_step(secure.shares, secure.SHARES)))
app.train("secagg_unmask")(_handler(_secagg_step(secure.unmask, secure.OPENED)))


@app.evaluate()
@_handler
def evaluate(msg: Message, cfg: Config, site: Site, round_: int, context: Context) -> Message:
    train, data = site_data(cfg, site.name, site.folder, heldout=site.name in cfg.sites.heldout)
    if len(data) == 0:
        return _reply(msg, site.name, {"num-examples": 0})
    model = build_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = evaluate_local(model, data, cfg)
    if not int(msg.content["config"].get("full", 0)):
        return _reply(msg, site.name, metrics)
    told = EvaluationPlan.from_config(msg.content["config"])
    scores, arrays = evaluate_site(model, data, cfg, train=train, plan=told)  # a held-out site's train is empty: no audit
    reply = _reply(msg, site.name, {**metrics, **scores})
    reply.content["artefacts"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return reply
