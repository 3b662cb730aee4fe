"""`medgen evaluate`: any checkpoint on any site folder, written as a run directory with a report."""

from __future__ import annotations

from pathlib import Path

from medgen import logs
from medgen.client.task import check_device, evaluate_local
from medgen.config import INFERENCE_KEYS, Config, ConfigError, load_config_text, with_overrides
from medgen.data.dataset import load_site
from medgen.data.picture import write_site_picture
from medgen.evaluation.plan import EvaluationPlan, pooled_thresholds
from medgen.evaluation.report import build_report
from medgen.evaluation.samples import generate
from medgen.evaluation.site import evaluate_site
from medgen.models import GenerativeModel, build_model
from medgen.server.guards import trained_classes, untrained_note
from medgen.server.rundir import RunDir, load_checkpoint, load_weights


def run_plan(run_dir: Path, cfg: Config, round_: int) -> EvaluationPlan:
    """What the federation that wrote a checkpoint knew, from its run directory's records when
    they are there: the classes its training sites held, and the threshold their healthy validation
    slices fixed at that round (when they were asked for it). Otherwise every class, no threshold."""
    records = RunDir(run_dir).records() if (run_dir / "metrics.jsonl").is_file() else []
    summaries = {r["site"]: r for r in records if r["phase"] == "query" and "train-examples" in r}
    if not summaries:
        return EvaluationPlan()
    evaluated = {r["site"]: r for r in records if r["phase"] == "evaluate" and r["round"] == round_
                 and r["site"] in cfg.sites.train}
    return EvaluationPlan(trained_classes(summaries, cfg.sites.train), pooled_thresholds(evaluated))


def load_trained(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, Config,
                                                                                           GenerativeModel]:
    """(checkpoint content, config, model with its weights) of a checkpoint file. The config is the
    checkpoint's own (the model must be rebuilt exactly); ``overrides`` may change the ``data`` and
    ``evaluation`` sections, ``train.device`` and the model's sampling and anomaly-map settings
    (``INFERENCE_KEYS``); ConfigError naming ``--set`` for any other key, DataError naming the file
    for a checkpoint that is missing, unreadable or does not fit its config's model."""
    ckpt = load_checkpoint(checkpoint)
    cfg = load_config_text(ckpt["config"])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith(("data.", "evaluation.")) or key in INFERENCE_KEYS or key == "train.device"):
            raise ConfigError(f"--set {item}: a trained checkpoint can change data.*, evaluation.*, train.device "
                              f"and {', '.join(sorted(INFERENCE_KEYS))} only (the rest built the weights)")
    cfg = with_overrides(cfg, overrides)
    check_device(cfg)
    model = build_model(cfg)
    load_weights(model, ckpt, checkpoint)
    return ckpt, cfg, model


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out: str | Path | None = None,
                        site: str | None = None, overrides: list[str] | tuple[str, ...] = (), log=logs.info) -> RunDir:
    """Score the model in ``checkpoint`` on every slice of the site folder ``data_dir``.

    When ``site`` is one of the run's training sites, the memorisation audit compares generated
    samples with its training vs validation subjects (the run's own split).

    The config is the checkpoint's own (the model must be rebuilt exactly); ``overrides`` may change
    the ``data`` and ``evaluation`` sections and the model's sampling and anomaly-map settings
    (``INFERENCE_KEYS``), e.g. ``data.on_bad_file=skip``, ``model.anomaly_t=400``."""
    ckpt, cfg, model = load_trained(checkpoint, overrides)
    data_dir = Path(data_dir)
    site = site or data_dir.resolve().name
    run = RunDir(out or Path("runs") / f"evaluate-{site}-{Path(checkpoint).stem}")
    run.create(cfg)
    logs.to_run_log(run.path)
    data = load_site(data_dir, cfg.data, site)
    write_site_picture(data, run.path / "sites" / site, site)
    log(f"evaluating {checkpoint} (round {ckpt['round']}, {cfg.model.family}) on {data_dir}: {len(data)} slices")
    metrics = evaluate_local(model, data, cfg)
    # a training site of the checkpoint's run: its own subject split gives the memorisation audit's
    # training and held-out slices (the folder must hold the same scans it trained on)
    train, heldout = data.split_subjects(cfg.train.val_fraction, cfg.seed) if site in cfg.sites.train else (None, None)
    told = run_plan(Path(checkpoint).resolve().parent.parent, cfg, int(ckpt["round"]))
    scores, arrays = evaluate_site(model, data, cfg, train=train, heldout=heldout, plan=told)
    round_ = int(ckpt["round"])
    warnings = {"warnings": untrained_note(told.classes)} if untrained_note(told.classes) else {}
    run.log(round_, site, "evaluate", {**metrics, **scores, "checkpoint": str(checkpoint), **warnings})
    if arrays:
        run.save_artefacts(round_, site, arrays)
    if cfg.federation.samples_per_class:
        images, _ = generate(model, cfg.federation.samples_per_class, cfg.seed, told.classes)
        run.save_samples(round_, images, rows=len(told.classes))
    run.set_status("completed", round=round_, evaluated=str(data_dir))
    log(f"report: {build_report(run.path)}")
    return run
