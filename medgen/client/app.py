"""The site: a Flower ClientApp. It receives the global weights and the run's config, trains or
evaluates on its own slices, and sends back weights and aggregate numbers — never images.

Binding a node to its site: in a deployment the SuperNode's node config names it
(``site="A" data-dir="/data/A"``); in simulation the node's ``partition-id`` indexes
``sites.train + sites.heldout`` and the folder is ``data.root/<site>``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medgen.client.task import evaluate_local, local_steps, proximal_term, site_data, site_seed, train_local
from medgen.config import Config, load_config_text
from medgen.data.check import counts_text, scan_headers
from medgen.data.errors import DataError, SiteDataError
from medgen.deployment.handshake import check_handshake
from medgen.deployment.signing import check_study
from medgen.data.sites import discover_site
from medgen.evaluation.site import evaluate_site
from medgen.models import build_model
from medgen.privacy.dp import plan
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger

app = ClientApp()


def bind_site(cfg: Config, node_config: dict) -> tuple[str, Path]:
    """(site name, site folder) of this node."""
    if "site" in node_config:
        site = str(node_config["site"])
        folder = Path(str(node_config.get("data-dir") or Path(str(cfg.data.root)) / site))
    else:
        site = cfg.sites.all[int(node_config["partition-id"])]
        if cfg.data.root is None:
            raise ValueError("data.root is not set: the simulation must resolve the cohort folder first")
        folder = Path(cfg.data.root) / site
    return site, folder


class SiteFailure(RuntimeError):
    """What a site reports to the server instead of its result; the text names the site."""


def client_threads(cfg: Config) -> int:
    """torch threads of a site's work: ``$MEDGEN_CLIENT_THREADS`` if set, else the CPUs a simulated
    site reserves (``simulation.client_cpus``, at least 1)."""
    return int(os.environ.get("MEDGEN_CLIENT_THREADS") or max(1, int(cfg.simulation.client_cpus or 1)))


def _handler(fn):
    """Bind the node to its site, check the run (version handshake, study signature: both required
    at a deployed site) before any data is read, then run ``fn(msg, cfg, site, folder, round)``. A
    refused run is answered like a failure (a query reply with the reason, otherwise SiteFailure);
    any failure is re-raised as SiteFailure naming the site, which Flower sends back as the reply's
    error."""

    @functools.wraps(fn)
    def wrapped(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        cfg = load_config_text(str(config["medgen-config"]))
        torch.set_num_threads(client_threads(cfg))
        site, folder = bind_site(cfg, dict(context.node_config))
        if "state-dir" in context.node_config:  # a deployed site keeps its state (privacy ledger) itself
            config["node-state-dir"] = str(context.node_config["state-dir"])
        node_config = dict(context.node_config)
        refusal = check_handshake(dict(context.run_config), cfg, required="site" in node_config) \
            or check_study(node_config, context.run_id, dict(config))
        if refusal:
            print(f"site {site}: REFUSED: {refusal}", file=sys.stderr, flush=True)
            if msg.metadata.message_type == MessageType.QUERY:
                return _refuse(msg, site, refusal)
            raise SiteFailure(f"site {site}: {refusal}")
        try:
            return fn(msg, cfg, site, folder, int(config.get("round", 0)))
        except Exception as e:
            raise SiteFailure(f"site {site}: {type(e).__name__}: {e}") from e

    return wrapped


def state_dir(msg: Message, site: str) -> Path:
    """The site's own state folder (privacy ledger): the SuperNode's ``state-dir`` node config in a
    deployment; in simulation ``<run>/sites/<site>``, named by the server."""
    config = msg.content["config"]
    if "node-state-dir" in config:
        return Path(str(config["node-state-dir"]))
    return Path(str(config["state-root"])) / site


def data_summary(train, val) -> dict:
    """Aggregate numbers about a site's data (what the report shows; no image leaves)."""
    pixels = np.concatenate([train.images[train.brain], val.images[val.brain]])
    hist, _ = np.histogram(pixels, bins=32, range=(0.0, 1.0))
    return {"train-examples": len(train), "eval-examples": len(val),
            "lesion-slices": int((train.labels == 1).sum() + (val.labels == 1).sum()),
            "subjects": len(set(train.subjects.tolist()) | set(val.subjects.tolist())),
            "intensity-hist": (hist / max(1, hist.sum())).tolist()}


def _reply(msg: Message, site: str, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    values = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()}
    content = RecordDict({"metrics": MetricRecord(values),
                          "info": ConfigRecord({"site": site})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _refuse(msg: Message, site: str, reason: str) -> Message:
    """The query reply of a site that will not take part: the server logs the reason, leaves the
    site out and asks again next round."""
    reply = _reply(msg, site, {})
    reply.content["info"]["error"] = reason
    return reply


@app.query()
@_handler
def query(msg: Message, cfg: Config, site: str, folder: Path, round_: int) -> Message:
    """Which site is this node, and how much data does it hold. A site whose data is unusable says
    so here (the server leaves it out and asks again next round) rather than crashing."""
    try:
        train, val = site_data(cfg, site, folder, heldout=site in cfg.sites.heldout)
    except (DataError, SiteDataError) as e:
        reply = _reply(msg, site, {})
        reply.content["info"]["error"] = str(e)
        return reply
    reply = _reply(msg, site, data_summary(train, val))
    voxel_sizes, orientations, _ = scan_headers(discover_site(folder, cfg.data).subjects)
    reply.content["info"]["voxel-sizes"] = counts_text(voxel_sizes)
    reply.content["info"]["orientations"] = counts_text(orientations)
    return reply


@app.train()
@_handler
def train(msg: Message, cfg: Config, site: str, folder: Path, round_: int) -> Message:
    if site in cfg.sites.heldout:
        raise RuntimeError(f"site {site} is held out (sites.heldout) and must never train")
    data, _ = site_data(cfg, site, folder)
    dp = ledger = None
    if cfg.privacy.enabled:
        dp = plan(cfg, data, local_steps(cfg, len(data)))
        ledger = PrivacyLedger(state_dir(msg, site), site)
        try:
            ledger.check_budget((dp.noise_multiplier, dp.sample_rate, dp.steps), dp.delta, cfg.privacy.budget(site))
        except BudgetExceeded as e:  # a refusal, not a crash: the server goes on without this site
            reply = _reply(msg, site, {"epsilon": ledger.epsilon(dp.delta), "refused": 1.0})
            reply.content["info"]["refused"] = str(e)
            return reply
    model = build_model(cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(global_state)
    extra = proximal_term(model, global_state, cfg.federation.proximal_mu) \
        if cfg.federation.strategy == "fedprox" else None
    seed = site_seed(cfg, site, round_)
    metrics = train_local(model, data, cfg, seed, extra_loss=extra, dp=dp)
    if dp:
        metrics.update(ledger.spend(dp, round_))
    return _reply(msg, site, metrics, ArrayRecord(model.state_dict()))


@app.evaluate()
@_handler
def evaluate(msg: Message, cfg: Config, site: str, folder: Path, round_: int) -> Message:
    train, data = site_data(cfg, site, folder, heldout=site in cfg.sites.heldout)
    if len(data) == 0:
        return _reply(msg, site, {"num-examples": 0})
    model = build_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = evaluate_local(model, data, cfg)
    if not int(msg.content["config"].get("full", 0)):
        return _reply(msg, site, metrics)
    scores, arrays = evaluate_site(model, data, cfg, train=train)  # a held-out site's train is empty: no audit
    reply = _reply(msg, site, {**metrics, **scores})
    reply.content["artefacts"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return reply
