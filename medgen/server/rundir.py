"""The run directory: what a run leaves behind, and what `--resume` reads back.

    <run>/config.yaml           the resolved config (every key)
    <run>/metrics.jsonl         one JSON object per line: round, site (name or "global"), phase, values
    <run>/checkpoints/round-NNNN.pt   global weights + aggregator state after round N (atomic), with
                                      the config and the provenance of the process that wrote it
    <run>/samples/round-NNNN.png      generated slices, one row per class
    <run>/evaluation/round-NNNN/<site>.npz   a site's ROC/PR curves (and overlays, if it shares images)
    <run>/status.json           running / completed / failed, last completed round, error
    <run>/provenance.json       medgen / library versions, git commit, config sha256 per session (medgen.provenance)
    <run>/tensorboard/, <run>/tracking.json   copies for TensorBoard / MLflow (tracking.*, medgen.server.tracking)

Every JSON file is strict JSON (medgen.strictjson): a NaN or infinite value is written as null and
read back as NaN.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgen import logs, provenance, strictjson
from medgen.config import Config, dump_config, load_config
from medgen.data.errors import DataError
from medgen.fileio import atomic_write
from medgen.server.errors import FederationError
from medgen.server.tracking import Tracker, require

if TYPE_CHECKING:
    import torch

_CHECKPOINT = re.compile(r"round-(\d{4,})\.pt$")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics_file = self.path / "metrics.jsonl"
        self.tracker: Tracker | None = None

    def create(self, cfg: Config) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise FederationError(f"{self.path}: a file, not a run directory (--out names a folder)")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        provenance.record(self.path)

    # ------------------------------------------------------------------ metrics
    def track(self, cfg: Config, log=logs.info) -> None:
        """From now on, copy what is recorded to TensorBoard / MLflow as ``cfg.tracking`` asks."""
        if cfg.tracking.tensorboard or cfg.tracking.mlflow:
            self.tracker = Tracker(self.path, cfg.tracking, log)

    def close_tracking(self, status: str) -> None:
        """Send the final metrics and close the trackers (``status``: how the run ended)."""
        if self.tracker is not None:
            self.tracker.close(final_metrics(self.records()), status)
            self.tracker = None

    def log(self, round_: int, site: str, phase: str, values: dict) -> dict:
        record = {"round": round_, "site": site, "phase": phase, **values, "time": round(time.time(), 3)}
        with self.metrics_file.open("a") as f:
            f.write(strictjson.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.record(record)
        return record

    def records(self) -> list[dict]:
        """The metrics records (null, a non-finite number, read as NaN). A cut last line (a write interrupted by a crash) is left out, with a
        note on stderr; a damaged line elsewhere is a DataError naming the file and line."""
        if not self.metrics_file.is_file():
            return []
        lines = [line for line in self.metrics_file.read_text(errors="replace").splitlines() if line.strip()]
        out = []
        for i, line in enumerate(lines, start=1):
            try:
                out.append(strictjson.null_to_nan(json.loads(line)))
            except json.JSONDecodeError:
                if i < len(lines):
                    raise DataError(self.metrics_file, f"line {i} is not a JSON record") from None
                print(f"note: {self.metrics_file}: the last line is cut (an interrupted write); left out",
                      file=sys.stderr)
        return out

    def truncate_metrics(self, last_round: int) -> None:
        """Drop records of rounds after ``last_round`` (a round that crashed before its checkpoint)."""
        kept = [r for r in self.records() if r["round"] <= last_round]
        text = "".join(strictjson.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics_file, lambda f: f.write(text.encode()))
        if self.tracker is not None:
            self.tracker.resumed_after(last_round)

    def save_samples(self, round_: int, images: torch.Tensor, rows: int) -> Path:
        """The generator's sample grid of ``round_`` (``images`` (N, 1, S, S) in [0, 1], ``rows`` rows)."""
        from medgen.evaluation.samples import save_grid

        path = save_grid(self.samples / f"round-{round_:04d}.png", images, rows)
        if self.tracker is not None:
            self.tracker.image(round_, path)
        return path

    def save_artefacts(self, round_: int, site: str, arrays: dict) -> Path:
        """A site's evaluation arrays (ROC/PR curves, overlays) for the report."""
        path = self.path / "evaluation" / f"round-{round_:04d}" / f"{site}.npz"
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, round_: int, model_state: dict, aggregator_state: dict, cfg: Config) -> Path:
        path = self.checkpoints / f"round-{round_:04d}.pt"
        payload = {"round": round_, "model": model_state, "aggregator": aggregator_state,
                   "config": dump_config(cfg), "family": cfg.model.family, "provenance": provenance.collect()}
        import torch  # here, not at the top: `medgen simulate` starts Flower before it needs torch

        atomic_write(path, lambda f: torch.save(payload, f))
        return path

    def last_checkpoint(self) -> Path | None:
        found = self._checkpoints()
        return found[-1] if found else None

    def last_round(self) -> int:
        """The round of the newest checkpoint (0: none)."""
        found = [int(m.group(1)) for p in self.checkpoints.glob("round-*.pt") if (m := _CHECKPOINT.search(p.name))]
        return max(found, default=0)

    def _checkpoints(self) -> list[Path]:
        found = sorted((int(m.group(1)), p) for p in self.checkpoints.glob("round-*.pt")
                       if (m := _CHECKPOINT.search(p.name)))
        return [p for _, p in found]

    def last_good_checkpoint(self, log=logs.info) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its content; an unreadable newer one is named and
        passed over (it stays on disk, and the round it held is trained again)."""
        for path in reversed(self._checkpoints()):
            try:
                return path, load_checkpoint(path)
            except DataError as e:
                log(f"skipping {e}; using the one before")
        return None

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temporary files of writes a crash interrupted (``atomic_write``'s ``.*.tmp``)."""
        found = [p for folder in (self.path, self.checkpoints) for p in folder.glob(".*.tmp") if p.is_file()]
        for path in found:
            path.unlink()
        return found

    # ------------------------------------------------------------------ status
    def set_status(self, status: str, **info) -> None:
        text = strictjson.dumps({"status": status, **info}, indent=2)
        atomic_write(self.path / "status.json", lambda f: f.write(text.encode()))

    def status(self) -> dict:
        path = self.path / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {"status": "missing"}


class FileLog:
    """A log function that prints and appends each line to a file (a deployed ServerApp runs in
    a process of the SuperLink's; `medgen-server` follows the file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def final_metrics(records: list[dict]) -> dict[str, dict]:
    """The last evaluation of every site (and "global"): {site: {metric: value, "round": r}}."""
    out: dict[str, dict] = {}
    for r in records:
        if r["phase"] == "evaluate":
            out[r["site"]] = {k: v for k, v in r.items() if k not in ("site", "phase", "time")}
    return out


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``RunDir.save_checkpoint`` (tensors on the CPU); DataError naming the
    file when it is missing or not a medgen checkpoint. ``provenance`` is absent from checkpoints
    written before medgen recorded it."""
    import torch

    from medgen.data.errors import DataError

    if not Path(path).is_file():
        raise DataError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise DataError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"round", "model", "config"} <= ckpt.keys():
        raise DataError(path, "not a medgen checkpoint (needs round, model and config)")
    return ckpt


def load_weights(model, ckpt: dict, path: str | Path) -> None:
    """Load the checkpoint ``ckpt`` (read from ``path``) into ``model``, a GenerativeModel;
    DataError naming the file when its weights do not fit the model."""
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        detail = " ".join(str(e).split())
        raise DataError(path, f"its weights do not fit the {model.family} model that the config builds (a "
                              f"checkpoint of another config or medgen version?): {detail[:300]}") from None


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.family}-{cfg.federation.strategy}"


def open_run(cfg: Config | None, out: str | Path | None, resume: str | Path | None,
             overrides=()) -> tuple[Config, RunDir]:
    """The config and run directory of a new run (``out``, default ``runs/<time>-<family>-<strategy>``;
    ``cfg`` or the defaults plus ``overrides``), or of the run that ``resume`` continues (its own
    config.yaml plus ``overrides``, e.g. more rounds). FederationError for a ``resume`` folder that
    is not a run, or an ``out`` that already holds one; ConfigError when ``tracking.*`` asks for a
    library that is not installed."""
    if resume is not None:
        run = RunDir(resume)
        if not (run.path / "config.yaml").is_file():
            raise FederationError(f"--resume {run.path}: not a run directory (no config.yaml)")
        cfg = load_config(run.path / "config.yaml", overrides)
        require(cfg.tracking)
        found = run.last_good_checkpoint()
        if found is not None:  # the overrides must fit the weights before anything is written
            from medgen.models import build_model

            load_weights(build_model(cfg), found[1], found[0])
        run.remove_partial_writes()
        return cfg, run
    cfg = cfg if cfg is not None else load_config(None, overrides)
    require(cfg.tracking)
    run = RunDir(out or default_run_dir(cfg))
    if run.last_checkpoint() is not None:
        raise FederationError(f"{run.path} already holds a run; use --resume {run.path} or another --out")
    return cfg, run
