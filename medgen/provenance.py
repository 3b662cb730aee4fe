"""What produced a run's numbers: medgen and library versions, Python, platform, the git commit of
the medgen source (when it is a git checkout), the machine's CPUs and CUDA devices, and a
fingerprint of the resolved config.

``<run>/provenance.json`` holds one entry per session that wrote into the run directory (the first
start, then each ``--resume``): ``{"sessions": [{"started": ..., "medgen": ..., ...}, ...]}``. The
report states them, and the software that built the report. Collecting never fails and never waits
long: a missing library is ``null``, a missing or slow git is ``null`` (5 s timeout).

In a deployment this is the coordinator's software; each site runs its own installation.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from medgen import strictjson
from medgen.fileio import atomic_write

FILE = "provenance.json"
LIBRARIES = ("torch", "flwr", "ray", "opacus", "numpy", "scipy", "nibabel", "nilearn", "monai", "deepbet",
             "SimpleITK", "matplotlib", "Jinja2")
SOURCE = Path(__file__).resolve().parent  # the medgen package imported now
GIT_TIMEOUT_S = 5


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        out = subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=GIT_TIMEOUT_S, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_source() -> dict | None:
    """``{"commit": sha, "dirty": bool}`` when the imported medgen package is the ``medgen`` folder of
    a git checkout (not an installed copy that happens to sit inside some repository); else None.
    ``dirty``: tracked files under medgen/ differ from the commit."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != SOURCE.parent:
        return None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", str(SOURCE))
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def fingerprint(config_text: str | bytes) -> str:
    """sha256 of the resolved config.yaml, as written."""
    data = config_text.encode() if isinstance(config_text, str) else config_text
    return hashlib.sha256(data).hexdigest()


def device() -> str:
    """This machine's compute: its CPU count, and the CUDA devices torch sees when torch is already
    imported (a report built without torch does not import it for this)."""
    text = f"{os.cpu_count() or '?'} CPUs ({platform.machine() or 'unknown'})"
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            text += ", CUDA: " + ", ".join(names)
    except Exception:  # a broken CUDA set-up must not stop a run from recording what it can
        text += ", CUDA: unavailable"
    return text


def collect(config_file: str | Path | None = None) -> dict:
    """The provenance of this process (and of ``config_file``'s text, when given)."""
    out = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medgen": _version("medgen"), "git": git_source(),
           "python": platform.python_version(), "platform": platform.platform(), "device": device(),
           "libraries": {name: _version(name) for name in LIBRARIES}}
    if config_file is not None and Path(config_file).is_file():
        out["config-sha256"] = fingerprint(Path(config_file).read_bytes())
    return out


def read(run_dir: str | Path) -> list[dict]:
    """The sessions recorded in ``run_dir`` (empty for a run made before medgen recorded them)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    try:
        sessions = strictjson.loads(path.read_text()).get("sessions", [])
    except (ValueError, AttributeError):
        return []
    return [s for s in sessions if isinstance(s, dict)]


def record(run_dir: str | Path) -> dict:
    """Append this session's provenance (with the fingerprint of ``<run_dir>/config.yaml``); returns it."""
    run_dir = Path(run_dir)
    entry = collect(run_dir / "config.yaml")
    text = strictjson.dumps({"sessions": [*read(run_dir), entry]}, indent=1) + "\n"
    atomic_write(run_dir / FILE, lambda f: f.write(text.encode()))
    return entry
