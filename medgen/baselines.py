"""`medgen train`: the baselines that federation is compared with, on the same model and the same
total optimiser steps, written in the same run-directory format.

- ``--site A``: one site alone (what a hospital can do without the consortium); each "round" is the
  steps that site makes in one federated round.
- ``--centralized``: all training sites pooled in one place (the upper bound federation cannot
  see); each "round" is the steps all training sites make together in one federated round.

After every round, all sites evaluate the model exactly as in ``medgen simulate``. With
``privacy.enabled`` the baseline trains with DP-SGD too, with its own ledger in ``<run>/sites/<name>``.
"""

from __future__ import annotations

from pathlib import Path

from medgen import logs
from medgen.client.task import check_device, evaluate_local, local_steps, site_data, site_seed, train_local
from medgen.config import Config
from medgen.data.dataset import concat_slices
from medgen.models import build_model
from medgen.privacy.dp import plan
from medgen.privacy.ledger import PrivacyLedger
from medgen.progress import track
from medgen.server.central_evaluation import SERVER_SITE, evaluate_server_data
from medgen.server.errors import FederationError
from medgen.evaluation.site import evaluate_site
from medgen.server.federation import is_full_evaluation, record_evaluation
from medgen.server.rundir import RunDir
from medgen.simulation import resolve_data


def train_baseline(cfg: Config, site: str | None = None, out: str | Path | None = None, log=logs.info) -> RunDir:
    """Train on ``site`` alone, or on all training sites pooled when ``site`` is None."""
    if site is not None and site not in cfg.sites.all:
        raise FederationError(f"--site {site}: not one of the configured sites {cfg.sites.all}")
    name = site or "centralized"
    run = RunDir(out or Path("runs") / f"baseline-{name}-{cfg.model.family}")
    if run.last_checkpoint() is not None:
        raise FederationError(f"{run.path} already holds a run; choose another --out")
    check_device(cfg)
    run.create(cfg)
    logs.to_run_log(run.path)
    cfg = resolve_data(cfg, log)
    root = Path(cfg.data.root)
    data = {s: site_data(cfg, s, root / s, heldout=s in cfg.sites.heldout) for s in cfg.sites.all}
    trained = [site] if site else cfg.sites.train
    pool = concat_slices([data[s][0] for s in trained], name)
    if len(pool) == 0:
        raise FederationError(f"site {site} is held out: it has no training slices (sites.heldout)")
    steps = sum(local_steps(cfg, len(data[s][0])) for s in trained)
    model = build_model(cfg)
    run.set_status("running")
    log(f"run directory: {run.path}\ntraining on {', '.join(trained)}: {len(pool)} slices, {steps} steps per round")
    dp = plan(cfg, pool, steps) if cfg.privacy.enabled else None
    ledger = PrivacyLedger(run.path / "sites" / name, name) if dp else None
    for round_ in track(range(1, cfg.federation.rounds + 1), f"{name}: rounds", unit="rounds"):
        metrics = train_local(model, pool, cfg, site_seed(cfg, name, round_), steps=steps, dp=dp)
        if dp:
            metrics.update(ledger.spend(dp, round_))
        run.log(round_, name, "train", metrics)
        log(f"round {round_}/{cfg.federation.rounds} {name}: train loss={metrics['loss']:.4g} "
            f"({metrics['train-time-s']:.1f}s)")
        if round_ % cfg.federation.eval_every == 0 or round_ == cfg.federation.rounds:
            results = {s: evaluate_local(model, val, cfg) for s, (_, val) in data.items() if len(val)}
            artefacts = {}
            if is_full_evaluation(cfg, round_):
                for s, (_, val) in data.items():
                    if len(val):
                        scores, artefacts[s] = evaluate_site(model, val, cfg)
                        results[s].update(scores)
            if cfg.evaluation.server_data is not None:
                results[SERVER_SITE], artefacts[SERVER_SITE] = evaluate_server_data(
                    cfg, model.state_dict(), is_full_evaluation(cfg, round_))
            record_evaluation(run, cfg, round_, results, model.state_dict(), log, artefacts)
        run.save_checkpoint(round_, model.state_dict(), {}, cfg)
    run.set_status("completed", round=cfg.federation.rounds)
    return run
