"""TensorBoard and MLflow copies of what the server records (config section ``tracking``).

Every metrics record goes in as scalars ``<site>/<phase>/<metric>`` at step = round (numbers
only), every sample grid as an image, and at the end of the run each site's last evaluation as
``final/<site>/<metric>``. metrics.jsonl stays the record: a tracker that fails while the run goes
on is named once in the log and left out for the rest of the run.

    <run>/tensorboard/     TensorBoard event files
    <run>/tracking.json    the MLflow store and run id, so that --resume continues the same MLflow run

``tracking.mlflow`` as a directory (relative: to the run directory) is a sqlite store
``DIR/mlflow.db`` with artifacts in ``DIR/artifacts/``.
"""

from __future__ import annotations

import importlib
import json
import logging
import numbers
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from medgen import logs, strictjson
from medgen.config import ConfigError, TrackingConfig
from medgen.fileio import atomic_write

INSTALL = "pip install 'medgen[tracking]'"
EXPERIMENT = "medgen"
_NOT_METRICS = {"round", "site", "phase", "time"}
_SERVER = ("http:", "https:")

# MLflow must not phone home; and a tracking server that is down costs seconds, not MLflow's default
# minutes of retries per call (users may still set their own).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def require(cfg: TrackingConfig) -> None:
    """ConfigError naming the key when ``cfg`` asks for a library that is not installed."""
    wanted = {"tracking.tensorboard": ["tensorboard", "torch.utils.tensorboard"] if cfg.tensorboard else [],
              "tracking.mlflow": ["mlflow"] + (["sqlalchemy", "alembic"] if _is_local(cfg.mlflow) else [])
              if cfg.mlflow else []}
    for key, modules in wanted.items():
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"{key}: needs {module}, which is not installed ({e}); {INSTALL}") from None


def _is_local(store: str | None) -> bool:
    return store is not None and not store.lower().startswith(_SERVER)


def _scalars(prefix: str, values: dict) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if k not in _NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Tracker:
    """The run's TensorBoard writer and MLflow run, as ``cfg`` asks (nothing when it asks for neither)."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, log: Callable[[str], None] = logs.info):
        require(cfg)
        self.run_dir, self.log = Path(run_dir), log
        self.sinks: dict[str, object] = {}
        if cfg.tensorboard:
            self.sinks["TensorBoard"] = _TensorBoard(self.run_dir / "tensorboard")
        if cfg.mlflow and (sink := self._call("MLflow", lambda: _MLflow(self.run_dir, cfg.mlflow))):
            self.sinks["MLflow"] = sink

    def record(self, record: dict) -> None:
        """One metrics.jsonl record."""
        self._each("scalars", int(record["round"]), _scalars(f"{record['site']}/{record['phase']}", record),
                   float(record["time"]))

    def image(self, round_: int, path: Path) -> None:
        self._each("image", round_, path)

    def resumed_after(self, round_: int) -> None:
        """What a crashed run tracked after ``round_`` is trained again (TensorBoard drops its old points)."""
        self._each("resumed_after", round_)

    def close(self, final: dict[str, dict], status: str) -> None:
        """Each site's last evaluation (``final_metrics``) as ``final/<site>/<metric>``, then close."""
        now = time.time()
        for site, metrics in final.items():
            self._each("scalars", int(metrics.get("round", 0)), _scalars(f"final/{site}", metrics), now)
        self._each("close", status)

    def _each(self, method: str, *args) -> None:
        for name, sink in list(self.sinks.items()):
            self._call(name, lambda: getattr(sink, method)(*args))

    def _call(self, name: str, action: Callable[[], object]) -> object:
        try:
            return action()
        except Exception as e:  # whatever a tracker raises, the training run goes on
            self.sinks.pop(name, None)
            self.log(f"WARNING: tracking: {name} failed ({type(e).__name__}: {e}); left out for the rest of "
                     f"this run (metrics.jsonl has every record)")
            return None


class _TensorBoard:
    def __init__(self, folder: Path):
        self.folder, self.purge_step, self.writer = folder, None, None

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        return self.writer

    def scalars(self, step: int, values: dict[str, float], walltime: float) -> None:
        writer = self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, step, walltime=walltime)
        writer.flush()

    def image(self, step: int, path: Path) -> None:
        writer = self._open()
        writer.add_image("samples", np.asarray(Image.open(path).convert("L")), step, dataformats="HW")
        writer.flush()

    def resumed_after(self, round_: int) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.purge_step = round_ + 1

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_MLFLOW_KEY = re.compile(r"[^\w\-. :/]")


class _MLflow:
    def __init__(self, run_dir: Path, store: str):
        from mlflow import MlflowClient

        if logs.verbosity() <= 0:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating the database) only with -v
        self.state_file = run_dir / "tracking.json"
        uri, artifacts = _store_uri(run_dir, store)
        self.client = MlflowClient(tracking_uri=uri)
        state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        if state.get("mlflow") == store:  # as configured: a run directory moved with its store keeps its run
            self.run_id = state["mlflow-run-id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            experiment = found.experiment_id if found else self.client.create_experiment(
                EXPERIMENT, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name,
                                                 tags={"medgen.run-dir": str(run_dir.resolve())}).info.run_id
            text = strictjson.dumps({"mlflow": store, "mlflow-uri": uri, "mlflow-run-id": self.run_id}, indent=2)
            atomic_write(self.state_file, lambda f: f.write(text.encode()))
        if (run_dir / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "config.yaml"))

    def scalars(self, step: int, values: dict[str, float], walltime: float) -> None:
        from mlflow.entities import Metric

        ms = int(walltime * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, ms, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, step: int, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "samples")

    def resumed_after(self, round_: int) -> None:
        pass  # MLflow keeps every point; the re-trained rounds' come later

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")


def _store_uri(run_dir: Path, store: str) -> tuple[str, str | None]:
    """The tracking URI of ``tracking.mlflow``, and where a new experiment keeps its artifacts
    (beside a local database; an http server decides itself)."""
    if not _is_local(store):
        return store, None
    if store.lower().startswith("sqlite:"):
        db = Path(store.split(":///", 1)[-1])
        return store, str((db.parent / "artifacts").resolve())
    folder = (run_dir / Path(store).expanduser()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")
