"""tracking.tensorboard / tracking.mlflow: a tiny federation (the real server loop and ClientApp,
test_federation.py's in-process Grid) and its resume, read back from the TensorBoard event files
and the MLflow store; a tracker that fails mid-run; the errors at start."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from medgen.config import ConfigError, load_config
from medgen.server.rundir import RunDir, final_metrics, open_run
from test_federation import federate, tiny_cfg, tiny_cohort  # noqa: F401  (tiny_cohort: a fixture)

TRACKED = ["tracking.tensorboard=true", "tracking.mlflow=mlflow"]


def scalars(run_dir) -> tuple[dict[str, dict[int, float]], EventAccumulator]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}, events


def mlflow_run(run_dir):
    from mlflow import MlflowClient  # after medgen.server.tracking: MLflow reads its telemetry switch at import

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    state = json.loads((run_dir / "tracking.json").read_text())
    return client, state["mlflow-run-id"]


def test_every_record_sample_grid_and_final_metric_reach_tensorboard_and_mlflow(tiny_cohort, tmp_path):
    """Round 1, then --resume to round 2 after a crash in round 2 that TensorBoard had seen part of:
    one MLflow run; both stores hold what metrics.jsonl holds."""
    run = RunDir(tmp_path / "run")
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", *TRACKED)
    run.create(cfg)
    federate(cfg, run.path)
    client, first_id = mlflow_run(run.path)
    assert client.get_run(first_id).info.status == "FINISHED"
    with SummaryWriter(str(run.path / "tensorboard")) as crashed:  # round 2's loss, tracked before a crash
        crashed.add_scalar("A/train/loss", 999.0, 2)

    federate(tiny_cfg(tiny_cohort, "federation.rounds=2", *TRACKED), run.path)
    records = run.records()
    tb, events = scalars(run.path)
    client, run_id = mlflow_run(run.path)
    assert run_id == first_id and len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"

    checked = 0
    for r in records:
        for key, value in r.items():
            if key in ("round", "site", "phase", "time") or not isinstance(value, (int, float)):
                continue
            tag = f"{r['site']}/{r['phase']}/{key}"
            assert tb[tag][r["round"]] == pytest.approx(value, rel=1e-6, nan_ok=True), tag
            checked += 1
    assert checked > 100 and {"A/train/loss", "B/train/loss", "C/evaluate/pixel-auroc", "global/train/sites"} <= tb.keys()
    assert tb["A/train/loss"].keys() == {1, 2} and tb["A/train/loss"][2] != 999.0

    history = client.get_metric_history(run_id, "A/train/loss")
    expected = {r["round"]: r["loss"] for r in records if r["site"] == "A" and r["phase"] == "train"}
    assert {m.step: m.value for m in history} == expected
    heldout = client.get_metric_history(run_id, "C/evaluate/pixel-auroc")
    assert [(m.step, m.value) for m in heldout] == [(r["round"], r["pixel-auroc"]) for r in records
                                                   if r["site"] == "C" and r["phase"] == "evaluate"]

    final = final_metrics(records)["C"]
    assert final["round"] == 2
    assert max(tb["final/C/pixel-auroc"]) == 2  # (each session's end has its own point)
    assert tb["final/C/pixel-auroc"][2] == pytest.approx(final["pixel-auroc"], rel=1e-6)
    assert client.get_run(run_id).data.metrics["final/C/pixel-auroc"] == final["pixel-auroc"]

    assert [e.step for e in events.Images("samples")] == [1, 2]
    assert events.Images("samples")[-1].width == 2 + 2 * (32 + 2)  # 2 samples per class, 32 px, 2 px padding
    artefacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert artefacts == ["samples/round-0001.png", "samples/round-0002.png"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert (run.path / "mlflow" / "artifacts").is_dir()


def test_a_tracker_that_fails_mid_run_is_named_once_and_the_run_goes_on(tmp_path):
    """The MLflow run is deleted from the store while the server records: one warning, the
    records still reach metrics.jsonl and TensorBoard."""
    cfg = load_config(None, TRACKED)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    lines = []
    run.track(cfg, lines.append)
    run.log(1, "A", "train", {"loss": 1.5, "note": "text is not a metric"})
    client, run_id = mlflow_run(run.path)
    client.delete_run(run_id)
    run.log(1, "B", "train", {"loss": 2.5})
    run.log(2, "A", "train", {"loss": 0.5})
    run.close_tracking("completed")

    assert [line for line in lines if "WARNING" in line] == [lines[0]] and "MLflow failed" in lines[0]
    assert "metrics.jsonl has every record" in lines[0]
    assert [r["loss"] for r in run.records()] == [1.5, 2.5, 0.5]
    tb, _ = scalars(run.path)
    assert tb == {"A/train/loss": {1: 1.5, 2: 0.5}, "B/train/loss": {1: 2.5}}
    assert [m.value for m in client.get_metric_history(run_id, "A/train/loss")] == [1.5]
    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None  # MLflow sends nothing home


@pytest.mark.parametrize("key, module", [("tracking.mlflow", "mlflow"), ("tracking.mlflow", "alembic"),
                                         ("tracking.tensorboard", "torch.utils.tensorboard")])
def test_a_missing_library_is_named_at_start(tmp_path, monkeypatch, key, module):
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
    cfg = load_config(None, TRACKED)
    with pytest.raises(ConfigError, match=rf"^{key}: needs {module}.*pip install 'medgen\[tracking\]'"):
        open_run(cfg, tmp_path / "run", None)
    assert not (tmp_path / "run").exists()


def test_an_http_server_needs_no_local_store_library(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "alembic", None)
    cfg, _ = open_run(load_config(None, ["tracking.mlflow=https://mlflow.example.org"]), tmp_path / "run", None)
    assert cfg.tracking.mlflow == "https://mlflow.example.org"


@pytest.mark.parametrize("value, words", [("file:///tmp/mlruns", "file store is deprecated"),
                                          ("s3://bucket/x", "may be http, https or sqlite"),
                                          ("https://me:secret@mlflow.example.org", "MLFLOW_TRACKING_USERNAME")])
def test_stores_that_are_refused(value, words):
    with pytest.raises(ConfigError, match=rf"tracking\.mlflow: .*{words}"):
        load_config(None, [f"tracking.mlflow={value}"])
