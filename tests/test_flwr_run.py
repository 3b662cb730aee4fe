"""`flwr run .` from the repository root (Flower 1.41's managed local SuperLink in simulation mode),
as a user runs it: the repository's pyproject.toml is the Flower App, the run config overrides
medgen's config keys, and the run directory gets metrics, status and report as with `medgen simulate`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from pydantic import BaseModel

from conftest import FAST_DATA
from medgen.config import Config
from medgen.deployment.procs import descendants
from medgen.server.flwrrun import RUN_KEYS, overrides
from medgen.server.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).parent / "flwr")
# test_simulation.py's TINY, as Flower's run config (TOML values: strings in double quotes)
TINY = ("sites.train='[A,B]' sites.heldout='[C]' phantom.subjects_per_site=3 train.local_steps=3 train.batch_size=8 "
        "model.width=8 model.latent_dim=16 data.image_size=32 federation.samples_per_class=2 federation.rounds=1 "
        + " ".join(f'{k}="{v}"' for k, v in (kv.split("=") for kv in FAST_DATA)))


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _leaves(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_the_run_config_lists_every_config_key():
    """Flower drops a --run-config key that the app's pyproject does not list: every medgen config
    key must be there, set to "" (not overridden). Flower flattens the tables with dots."""
    def flatten(table: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in table.items():
            out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    listed = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert sorted(listed) == sorted([*RUN_KEYS, *_leaves(Config)])
    assert set(listed.values()) == {""}
    assert overrides({**listed, "federation.rounds": 1, "privacy.enabled": True, "model.family": "gan",
                      "train.lr": 0.5, "run-dir": "x"}) == [
        "federation.rounds=1", "model.family=gan", "privacy.enabled=true", "train.lr=0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_local_superlink(flwr_home: Path) -> None:
    """The managed SuperLink runs detached; stop the one whose command line names this test's
    FLWR_HOME (its --log-file / --database), and what it started."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            below = descendants(pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
                    "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                time.sleep(0.2)
            for child in [pid, *below]:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_flwr_run_from_the_repository_root(tmp_path, shared_cache):
    """`flwr run . --federation-config num-supernodes=3 --run-config ...` returns a run id at once;
    the run finishes (flwr ls) with metrics, a completed status and the report in run-dir. With
    Flower's default 2 SuperNodes for a 3-site study the run fails naming the fix."""
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ADDRESS": "local",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # flower-superlink

    def flwr(*args):
        out = subprocess.run([FLWR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    def start(run_dir: Path, *extra) -> str:
        out = flwr("run", ".", *extra, "--format", "json", "--run-config",
                   f'run-dir="{run_dir}" data.cache_dir="{shared_cache}" {TINY}')
        result = json.loads(out[out.index("{"):])
        assert result.get("success"), out
        return result["run-id"]

    def finished(run_id: str) -> dict:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            out = flwr("ls", "--run-id", run_id, "--format", "json")
            run = json.loads(out[out.index("{"):])["runs"][0]
            if run["status"].startswith("finished"):
                return run
            time.sleep(3)
        raise AssertionError(f"run {run_id} did not finish: {run}")

    try:
        run_dir = tmp_path / "run"
        run_id = start(run_dir, "--federation-config", "num-supernodes=3")
        found = finished(run_id)
        assert found["status"] == "finished:completed", found
        run = RunDir(run_dir)
        assert run.status()["status"] == "completed"
        records = run.records()
        assert {r["site"] for r in records if r["phase"] == "train"} == {"A", "B", "global"}
        assert any(r["phase"] == "evaluate" and r["site"] == "C" for r in records)
        assert (run_dir / "report" / "index.html").is_file() and (run_dir / "config.yaml").is_file()
        assert "round 1/1 site A: train" in flwr("log", run_id, "--show")
        assert found["fab-id"] == "medgen/medgen"

        short = tmp_path / "two-nodes"
        found = finished(start(short))  # Flower's default: 2 simulated SuperNodes
        assert found["status"] == "finished:failed" and "num-supernodes=3" in found["status-details"], found
        assert run_dir.is_dir() and RunDir(short).status()["status"] == "failed"
    finally:
        _stop_local_superlink(home)
