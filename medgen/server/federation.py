"""The federated loop of the server, over a Flower Grid (simulation or deployment alike).

Each round: the training sites get the global weights and train; their updates are checked and
aggregated; every ``federation.eval_every`` rounds all sites (held-out ones included) evaluate the
global model where their data is; the global model writes sample images; a checkpoint is written.
A site that fails or times out is logged with its name and round; the round goes on when at least
``federation.min_sites`` training sites answered, otherwise it fails and the last checkpoint stays.
With ``federation.secure_aggregation: secaggplus`` the training step is SecAgg+
(``medgen/server/secure.py``): the server gets the sum of the sites' updates, not the updates.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medgen import logs
from medgen.config import Config, dump_config
from medgen.data.dataset import HEALTHY, LESION
from medgen.evaluation.plan import EvaluationPlan, pooled_thresholds
from medgen.evaluation.samples import CLASS_NAMES, generate
from medgen.models import build_model
from medgen.privacy.central import CentralDP
from medgen.progress import track
from medgen.server.central_evaluation import SERVER_SITE, evaluate_server_data, server_data
from medgen.server.errors import FederationError, StudyRefused
from medgen.server.guards import shift_warnings, trained_classes, untrained_note
from medgen.server.rundir import RunDir, load_weights
from medgen.server.sampling import sample_sites
from medgen.server.secure import SecureRound
from medgen.server.strategy import State, make_aggregator
from medgen.server.validation import Rejected, bound_norms, read_update


def _clean_reason(reason: str) -> str:
    """Flower wraps a ClientApp's exception text in "<class ...>:<'Exception ... Message: TEXT'>"."""
    marker = "occurred. Message: "
    return reason.split(marker, 1)[1].rstrip("'>") if marker in reason else reason


def _summary(metrics: dict) -> str:
    shown = [f"{k}={v:.4g}" for k, v in metrics.items()
             if k in ("loss", "recon", "kl", "num-examples", "train-examples", "eval-examples", "epsilon")]
    return " ".join(shown)


class Federation:
    def __init__(self, grid: Grid, cfg: Config, run: RunDir, log: Callable[[str], None] = logs.info,
                 site_nodes: dict[str, int] | None = None, extra_config: dict[str, str] | None = None):
        self.grid, self.cfg, self.run, self.log = grid, cfg, run, log
        self.site_nodes = site_nodes or {}  # deployment: the node each site's registered key belongs to
        self.extra_config = dict(extra_config or {})  # deployment: the study signature, in every message
        self.config_text = dump_config(cfg)
        self.nodes: dict[str, int] = {}
        self.declared: dict[str, int] = {}  # training slices each site said it holds when it connected
        self.summaries: dict[str, dict] = {}  # what each site said about its data when it connected
        self.strangers: set[int] = set()  # nodes naming a site the study does not have: not asked again
        self.refusals: dict[str, str] = {}  # sites that refused the study when asked, and why
        self.exhausted: set[str] = set()  # sites that refused to train (privacy budget spent, or their policy)
        self.last_round = 0
        self.stopped: str | None = None

    # ----------------------------------------------------------------- messaging
    def _message(self, node: int, kind: str, round_: int, state: State | None = None, full: bool = False,
                 plan: EvaluationPlan | None = None, extra: dict | None = None, records: dict | None = None) -> Message:
        config = {"medgen-config": self.config_text, "round": round_, "state-root": str(self.run.path / "sites"),
                  "study-name": self.run.path.name, "full": int(full), **(plan.to_config() if plan else {}),
                  **(extra or {}), **self.extra_config}
        content = RecordDict({"config": ConfigRecord(config), **(records or {})})
        if state is not None:
            content["arrays"] = ArrayRecord(state)
        return Message(content=content, message_type=kind, dst_node_id=node)

    def _exchange(self, round_: int, phase: str, messages: dict[str, Message]) -> dict[str, Message]:
        """Send, wait up to the round timeout (the query timeout for a query), return the good replies
        by site; log every failure."""
        fed = self.cfg.federation
        key, timeout = (("query_timeout_s", fed.query_timeout_s) if phase == "query" and fed.query_timeout_s
                        else ("round_timeout_s", fed.round_timeout_s))
        replies = self.grid.send_and_receive(list(messages.values()), timeout=timeout)
        by_node = {m.metadata.src_node_id: m for m in replies}
        good = {}
        for site, msg in messages.items():
            reply = by_node.get(msg.metadata.dst_node_id)
            if reply is None:
                reason = f"no answer within federation.{key}={timeout:g}"
            elif reply.has_error():
                reason = _clean_reason(reply.error.reason)
            else:
                good[site] = reply
                continue
            self.log(f"round {round_}: site {site} FAILED ({phase}): {reason}")
            self.run.log(round_, site, phase, {"error": reason})
        return good

    def discover_sites(self, wait: bool) -> None:
        """Ask every node not yet bound which site it is. With ``wait``, keep asking (up to the query
        timeout) until every configured site is bound or every node has answered."""
        expected = set(self.cfg.sites.all)
        fed = self.cfg.federation
        deadline = time.monotonic() + (fed.query_timeout_s or fed.round_timeout_s)
        while True:
            node_ids = list(self.grid.get_node_ids())
            unknown = [n for n in node_ids if n not in self.nodes.values() and n not in self.strangers]
            if unknown:
                msgs = {f"node {n}": self._message(n, MessageType.QUERY, 0) for n in unknown}
                for name, reply in self._exchange(0, "query", msgs).items():
                    try:
                        info = reply.content["info"]
                        site = str(info["site"])
                    except (KeyError, TypeError):
                        self.log(f"{name}: malformed query reply (no site name): ignored")
                        continue
                    if site not in expected:
                        self.log(f"{name} says it is site {site!r}, which is in neither sites.train nor sites.heldout "
                                 f"({sorted(expected)}): ignored")
                        self.strangers.add(reply.metadata.src_node_id)
                        continue
                    policy = {"policy": str(info["policy"])} if "policy" in info else {}
                    if "refused" in info:
                        self.log(f"site {site}: REFUSED the study (left out, asked again next round): {info['refused']}")
                        self.run.log(0, site, "query", {"refused": str(info["refused"]), **policy})
                        self.refusals[site] = str(info["refused"])
                        continue
                    if "error" in info:
                        self.log(f"site {site}: left out for now: {info['error']}")
                        self.run.log(0, site, "query", {"error": str(info["error"])})
                        continue
                    node = reply.metadata.src_node_id
                    if self.site_nodes.get(site, node) != node:
                        reason = (f"node {node} claims site {site!r}, but site {site}'s registered key belongs to "
                                  f"node {self.site_nodes[site]}: refused")
                        self.log(f"site {site}: {reason}")
                        self.run.log(0, site, "query", {"error": reason})
                        continue
                    if self.nodes.get(site, node) != node and self.nodes[site] in node_ids:
                        raise FederationError(f"two nodes claim site {site!r}")
                    self.refusals.pop(site, None)
                    self.nodes[site] = reply.metadata.src_node_id
                    summary = dict(reply.content["metrics"])
                    if isinstance(summary.get("train-examples"), (int, float)):
                        self.declared[site] = int(summary["train-examples"])
                    summary.update({k: str(info[k]) for k in ("voxel-sizes", "orientations", "policy") if k in info})
                    if isinstance(info.get("contrasts"), list):
                        summary["contrasts"] = [str(c) for c in info["contrasts"]][:20]
                    self.summaries[site] = summary
                    self.run.log(0, site, "query", summary)
                    skipped = int(summary.get("skipped-files", 0))
                    note = f"; {skipped} bad file(s) skipped, named in the site's own log" if skipped else ""
                    self.log(f"site {site}: connected ({_summary(summary)}{note})")
            if not wait or expected <= self.nodes.keys():
                return
            if len(set(node_ids) - self.strangers) >= len(expected) or time.monotonic() > deadline:
                self.log(f"sites not connected: {sorted(expected - self.nodes.keys())}")
                return
            time.sleep(1.0)

    # ----------------------------------------------------------------- the loop
    def run_rounds(self) -> State:
        cfg, run = self.cfg, self.run
        model = build_model(cfg)
        aggregator = make_aggregator(cfg.federation, model.norm_keys())
        if cfg.privacy.central.enabled:
            aggregator = CentralDP(aggregator, cfg)
        state, start = model.state_dict(), 1
        found = run.last_good_checkpoint(self.log)
        if found is not None:
            last, ckpt = found
            state, start = ckpt["model"], ckpt["round"] + 1
            self.last_round = ckpt["round"]
            load_weights(model, ckpt, last)  # they must fit this config's model
            aggregator.load_state(ckpt["aggregator"])
            run.truncate_metrics(ckpt["round"])
            self.log(f"resuming after round {ckpt['round']} from {last}")
        min_sites = cfg.federation.min_sites or len(cfg.sites.train)
        if cfg.evaluation.server_data is not None:
            self.log(f"server data: {len(server_data(cfg))} slices for central evaluation")
        self.discover_sites(wait=True)
        ready = [s for s in cfg.sites.train if s in self.nodes]
        if len(ready) < min_sites and start <= cfg.federation.rounds:
            missing = [s for s in cfg.sites.train if s not in self.nodes]
            if all(s in self.refusals for s in missing):
                raise StudyRefused(f"only {len(ready)} of {len(cfg.sites.train)} training sites are usable "
                                   f"(federation.min_sites={min_sites}); every other one refused the study by its "
                                   f"policy: " + "; ".join(self.refusals[s] for s in missing))
            raise FederationError(f"only {len(ready)} of {len(cfg.sites.train)} training sites are usable "
                                  f"(federation.min_sites={min_sites}); see the site errors above")
        rounds = range(start, cfg.federation.rounds + 1)
        for round_ in track(rounds, f"study: {len(rounds)} rounds", unit="rounds"):
            t0 = time.perf_counter()
            if round_ > start and not set(cfg.sites.all) <= self.nodes.keys():
                self.discover_sites(wait=False)  # a site that failed or joined late gets another chance
            for site in sorted(set(cfg.sites.train) - self.nodes.keys()):
                run.log(round_, site, "train", {"refused": self.refusals[site]} if site in self.refusals
                        else {"error": "site not connected"})
            willing = [s for s in cfg.sites.train if s not in self.exhausted]
            asked = sample_sites(willing, cfg, round_)
            if len(asked) < len(willing):
                self.log(f"round {round_}: asking {len(asked)} of {len(willing)} training sites "
                         f"(federation.fraction_train={cfg.federation.fraction_train:g}): {', '.join(asked) or 'none'}")
            secure_metrics = {}
            if cfg.federation.secure_aggregation == "secaggplus":  # the server sees only the sum
                secure = SecureRound(self, round_)
                total, accepted = secure.run(asked, state, aggregator.payload)
                updates, touched, counted, secure_metrics = [total] if total else [], {}, len(accepted), secure.metrics
            else:
                updates, accepted, touched = self._train_clear(round_, asked, state, aggregator)
                counted = len(updates)
            for site, metrics in accepted.items():
                if site in touched:
                    self.log(f"round {round_}: site {site} {touched[site]}")
                if site in touched and touched[site].startswith("update rejected"):
                    run.log(round_, site, "train", {"error": touched[site]})
                    continue
                run.log(round_, site, "train", {**metrics, **({"warning": touched[site]} if site in touched else {})})
                self.log(f"round {round_}/{cfg.federation.rounds} site {site}: train {_summary(metrics)} "
                         f"({metrics.get('train-time-s', 0):.1f}s)")
            if set(willing) <= self.exhausted:
                self.stopped = "every training site refused to train (privacy budget spent, or its policy)"
                self.log(f"round {round_}: {self.stopped}; stopping after round {round_ - 1}")
                break
            if counted < min(min_sites, len(set(asked) - self.exhausted)) or (asked and not updates):
                raise FederationError(
                    f"round {round_}: only {counted} of {len(cfg.sites.train)} training sites sent a usable "
                    f"update (federation.min_sites={min_sites}); finished rounds are kept")
            aggregated = aggregator.aggregate(state, updates)
            if bad := [k for k, v in aggregated.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
                raise FederationError(f"round {round_}: the aggregated model holds NaN or Inf ({bad[0]}, ...); it is not "
                                      f"written, and the last checkpoint stays the one --resume continues from")
            state = aggregated
            run.log(round_, "global", "train", {"sites": counted, "sites-asked": len(asked),
                                                "num-examples": sum(u.num_examples for u in updates),
                                                "round-time-s": time.perf_counter() - t0,
                                                **aggregator.round_metrics(), **secure_metrics})
            if round_ % cfg.federation.eval_every == 0 or round_ == cfg.federation.rounds:
                self.evaluate(round_, state)
            run.save_checkpoint(round_, state, aggregator.state(), cfg)
            run.set_status("running", round=round_)
            self.last_round = round_
        return state

    def _train_clear(self, round_: int, asked: list[str], state: State, aggregator) -> tuple[list, dict, dict]:
        """The asked sites train and send their weights: (updates within the norm bound, each
        replying site's metrics, the reason for each site the bound touched)."""
        msgs = {s: self._message(self.nodes[s], MessageType.TRAIN, round_, aggregator.payload(s, state))
                for s in asked if s in self.nodes}
        updates, accepted = [], {}
        for site, reply in self._exchange(round_, "train", msgs).items():
            info = reply.content["info"] if "info" in reply.content else {}
            if "refused" in info:
                reason = str(info["refused"])
                epsilon = dict(reply.content["metrics"]).get("epsilon", 0.0) if "metrics" in reply.content else 0.0
                self.exhausted.add(site)
                self.log(f"round {round_}: site {site} refused to train: {reason}")
                self.run.log(round_, site, "train", {"refused": reason, "epsilon": epsilon})
                continue
            try:
                update, metrics = read_update(site, reply, state, self.declared.get(site))
            except Rejected as e:
                self.log(f"round {round_}: site {site} update REJECTED: {e}")
                self.run.log(round_, site, "train", {"error": f"update rejected: {e}"})
                continue
            updates.append(update)
            accepted[site] = metrics
        updates, touched = bound_norms(updates, state, self.cfg.federation)
        return updates, accepted, touched

    def evaluate(self, round_: int, state: State) -> None:
        """Every connected site scores the global model. A full evaluation tells the sites which
        classes trained; when a held-out site has no healthy subjects to fix its threshold on, the
        training sites evaluate first and send their healthy validation slices' quantiles, and the
        held-out sites get the pooled threshold (EvaluationPlan)."""
        cfg = self.cfg
        full = is_full_evaluation(cfg, round_)
        sites = [s for s in cfg.sites.all if s in self.nodes]
        classes = trained_classes(self.summaries, cfg.sites.train)
        results, artefacts = {}, {}

        def ask(group: list[str], plan: EvaluationPlan) -> None:
            msgs = {s: self._message(self.nodes[s], MessageType.EVALUATE, round_, state, full, plan) for s in group}
            for site, reply in self._exchange(round_, "evaluate", msgs).items():
                results[site] = dict(reply.content["metrics"])
                if "artefacts" in reply.content:
                    artefacts[site] = {k: v.numpy() for k, v in reply.content["artefacts"].items()}

        calibrate = full and self._needs_pooled_threshold()
        first = [s for s in sites if s in cfg.sites.train] if calibrate else sites
        ask(first, EvaluationPlan(classes, send_calibration=calibrate))
        thresholds = pooled_thresholds({s: results[s] for s in first if s in results})
        if rest := [s for s in sites if s not in first]:
            ask(rest, EvaluationPlan(classes, thresholds))
        if cfg.evaluation.server_data is not None:
            results[SERVER_SITE], artefacts[SERVER_SITE] = evaluate_server_data(cfg, state, full,
                                                                                EvaluationPlan(classes, thresholds))
        warnings = shift_warnings(self.summaries, cfg.sites.train, sites, cfg.evaluation.max_intensity_shift)
        for site, metrics in results.items():
            found = warnings.get(site, []) + (untrained_note(classes) if full and site != SERVER_SITE else [])
            if found:
                metrics["warnings"] = found
        record_evaluation(self.run, cfg, round_, results, state, self.log, artefacts, classes)

    def _needs_pooled_threshold(self) -> bool:
        """Whether some held-out site that holds lesions has no healthy subject (half of them, at least
        one, fix its own threshold) and may take the training sites' (evaluation.calibration)."""
        if self.cfg.evaluation.calibration not in ("auto", "training-sites"):
            return False
        if self.cfg.evaluation.server_data is not None:
            return True  # the server's own folder may hold only patients
        for site in self.cfg.sites.heldout:
            s = self.summaries.get(site, {})
            if site in self.nodes and s.get("lesion-slices", 0) > 0 and (
                    self.cfg.evaluation.calibration == "training-sites" or s.get("healthy-subjects", 0) < 1):
                return True
        return False


def is_full_evaluation(cfg: Config, round_: int) -> bool:
    every = cfg.evaluation.every_rounds
    return round_ == cfg.federation.rounds or (every > 0 and round_ % every == 0)


def record_evaluation(run: RunDir, cfg: Config, round_: int, results: dict[str, dict], state: State,
                      log: Callable[[str], None] = logs.info, artefacts: dict[str, dict] | None = None,
                      classes: tuple[int, ...] = (HEALTHY, LESION)) -> None:
    """Log each site's evaluation and their example-weighted mean (site "global"; sample sizes
    ``n-*`` are summed instead), keep the sites' report arrays (curves, overlays), and write the
    global model's sample grid (a row per class of ``classes``, those that trained)."""
    results = {s: m for s, m in results.items() if m.get("num-examples", 0) > 0}
    for site, arrays in (artefacts or {}).items():
        if arrays:
            run.save_artefacts(round_, site, arrays)
    for site, metrics in results.items():
        run.log(round_, site, "evaluate", metrics)
        role = "central" if site == SERVER_SITE else "held-out" if site in cfg.sites.heldout else "validation"
        log(f"round {round_} site {site}: evaluate ({role}) {_summary(metrics)}")
        for warning in metrics.get("warnings", []):
            log(f"round {round_} site {site}: WARNING: {warning}")
    sites = {s: m for s, m in results.items() if s != SERVER_SITE}  # the server's own data is not a site
    if sites:
        total = sum(r["num-examples"] for r in sites.values())
        keys = {k for k in set.intersection(*(set(r) for r in sites.values())) - {"num-examples"}
                if all(isinstance(r[k], (int, float)) for r in sites.values())}
        mean = {k: sum(r[k] * r["num-examples"] for r in sites.values()) / total for k in sorted(keys)}
        mean.update({k: sum(r[k] for r in sites.values()) for k in keys if k.startswith("n-")})  # sample sizes add up
        run.log(round_, "global", "evaluate", {**mean, "num-examples": total, "sites": len(sites),
                                                "trained-classes": [CLASS_NAMES[c] for c in classes]})
    if cfg.federation.samples_per_class:
        model = build_model(cfg)
        model.load_state_dict(state)
        images, _ = generate(model, cfg.federation.samples_per_class, cfg.seed, classes)
        run.save_samples(round_, images, rows=len(classes))


def run_federation(grid: Grid, cfg: Config, run: RunDir, log: Callable[[str], None] = logs.info,
                   site_nodes: dict[str, int] | None = None, extra_config: dict[str, str] | None = None) -> State:
    """Run (or resume) the federation; the run directory's status says how it ended. With
    ``site_nodes`` (a deployment with SuperNode authentication) a site is accepted only from the
    node its registered key belongs to; ``extra_config`` goes into every message's config (the
    study signature, medgen/deployment/signing.py)."""
    run.set_status("running")
    federation = Federation(grid, cfg, run, log, site_nodes, extra_config)
    try:
        run.track(cfg, log)
        state = federation.run_rounds()
    except Exception as e:
        run.set_status("failed", round=federation.last_round, error=f"{type(e).__name__}: {e}",
                       **({"refused": True} if isinstance(e, StudyRefused) else {}))
        log(f"FAILED: {e}")
        run.close_tracking("failed")
        raise
    extra = {"stopped": federation.stopped} if federation.stopped else {}
    skipped = {r["site"]: int(r["skipped-files"]) for r in run.records()
               if r["phase"] == "query" and r.get("skipped-files")}
    if skipped:
        extra["skipped-files"] = skipped  # per site; the names stay in each site's own log
    run.set_status("completed", round=federation.last_round, **extra)
    run.close_tracking("completed")
    return state
