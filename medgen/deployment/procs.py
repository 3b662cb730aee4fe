"""Child processes of `medgen-server` / `medgen-client` (a SuperLink, SuperNodes): each in its
own process group with its output in a log file; stopping one also stops everything it spawned
(Flower detaches its SuperExec / ServerApp / ClientApp processes into new sessions), so nothing
is left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


@contextlib.contextmanager
def shielded():
    """Hold off SIGINT / SIGTERM while children are being stopped (a second Ctrl-C, or a SIGTERM
    forwarded twice, must not cut the clean-up short and leave processes behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def flower_env(flwr_home: str | Path | None = None, extra: dict | None = None) -> dict[str, str]:
    """The environment for Flower's processes: no telemetry, no update check, no run-time
    dependency installation, this virtual environment's binaries first on PATH (the SuperLink
    and SuperNode find ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` there)."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                # the SuperExec looks for a run to launch every 0.25 s, not every second (Flower's default)
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children, found, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Child:
    """One child process in its own process group, output appended to ``log_file``."""

    def __init__(self, name: str, cmd: list[str], log_file: str | Path, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None):
        self.name, self.cmd, self.log_file = name, cmd, Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the child's group and to every process it spawned; SIGKILL what is still
        there after ``timeout`` seconds. Returns the child's exit code."""
        with shielded():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> int | None:
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        groups = {self.proc.pid}
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        own = os.getpgid(0)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups - {own}:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline:
                self.proc.poll()
                if not any(_alive(p) for p in pids):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None
