"""`medgen evaluate`: any checkpoint on any site folder, written as a run directory with a report."""

from __future__ import annotations

from pathlib import Path

from medgen.client.task import check_device, evaluate_local
from medgen.config import INFERENCE_KEYS, ConfigError, load_config_text, with_overrides
from medgen.data.dataset import load_site
from medgen.data.picture import write_site_picture
from medgen.evaluation.report import build_report
from medgen.evaluation.samples import generate, save_grid
from medgen.evaluation.site import evaluate_site
from medgen.models import build_model
from medgen.server.rundir import RunDir, load_checkpoint, load_weights


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out: str | Path | None = None,
                        site: str | None = None, overrides: list[str] | tuple[str, ...] = (), log=print) -> RunDir:
    """Score the model in ``checkpoint`` on every slice of the site folder ``data_dir``.

    When ``site`` is one of the run's training sites, the memorisation audit compares generated
    samples with its training vs validation subjects (the run's own split).

    The config is the checkpoint's own (the model must be rebuilt exactly); ``overrides`` may change
    the ``data`` and ``evaluation`` sections and the model's sampling and anomaly-map settings
    (``INFERENCE_KEYS``), e.g. ``data.on_bad_file=skip``, ``model.anomaly_t=400``."""
    ckpt = load_checkpoint(checkpoint)
    cfg = load_config_text(ckpt["config"])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith(("data.", "evaluation.")) or key in INFERENCE_KEYS or key == "train.device"):
            raise ConfigError(f"--set {item}: evaluating a checkpoint can change data.*, evaluation.*, train.device "
                              f"and {', '.join(sorted(INFERENCE_KEYS))} only (the rest built the weights)")
    cfg = with_overrides(cfg, overrides)
    check_device(cfg)
    model = build_model(cfg)
    load_weights(model, ckpt, checkpoint)
    data_dir = Path(data_dir)
    site = site or data_dir.resolve().name
    run = RunDir(out or Path("runs") / f"evaluate-{site}-{Path(checkpoint).stem}")
    run.create(cfg)
    data = load_site(data_dir, cfg.data, site)
    write_site_picture(data, run.path / "sites" / site, site)
    log(f"evaluating {checkpoint} (round {ckpt['round']}, {cfg.model.family}) on {data_dir}: {len(data)} slices")
    metrics = evaluate_local(model, data, cfg)
    # a training site of the checkpoint's run: its own subject split gives the memorisation audit's
    # training and held-out slices (the folder must hold the same scans it trained on)
    train, heldout = data.split_subjects(cfg.train.val_fraction, cfg.seed) if site in cfg.sites.train else (None, None)
    scores, arrays = evaluate_site(model, data, cfg, train=train, heldout=heldout)
    round_ = int(ckpt["round"])
    run.log(round_, site, "evaluate", {**metrics, **scores, "checkpoint": str(checkpoint)})
    if arrays:
        run.save_artefacts(round_, site, arrays)
    if cfg.federation.samples_per_class:
        images, _ = generate(model, cfg.federation.samples_per_class, cfg.seed)
        save_grid(run.samples / f"round-{round_:04d}.png", images, rows=2)
    run.set_status("completed", round=round_, evaluated=str(data_dir))
    log(f"report: {build_report(run.path)}")
    return run
