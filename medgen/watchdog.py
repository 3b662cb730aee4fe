"""Processes die with their parent, SIGKILL included.

`medgen-server`, `medgen-client` and `medgen simulate` start processes that start their own
(Flower's SuperExec / ServerApp / ClientApp, Ray's GCS, raylet and workers), many in new sessions:
when the parent is killed outright, nothing of its own runs to stop them, and they live on with
the port. :func:`guard` starts one small watchdog process, in a session of its own, that
notes every descendant of the parent twice a second and, once the parent is gone, stops them —
SIGTERM, then SIGKILL — checking each one's start time so that a recycled pid is never hit.

    python -m medgen.watchdog --parent PID
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    from medgen.deployment.procs import descendants

    return descendants(pid)


def watch(parent: int, poll_s: float = 0.5, grace_s: float = 5.0) -> int:
    """Until ``parent`` is gone, remember its descendants; then stop those still running.
    Returns how many were stopped."""
    me, seen = os.getpid(), {}
    born = _start_time(parent)
    while born is not None and _start_time(parent) == born:
        for pid in _descendants(parent):
            if pid != me and pid not in seen and (t := _start_time(pid)) is not None:
                seen[pid] = t
        time.sleep(poll_s)
    left = [p for p, t in seen.items() if _start_time(p) == t]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_start_time(p) == seen[p] for p in left):
            time.sleep(0.1)
    return len(left)


def guard() -> subprocess.Popen | None:
    """Start the watchdog of this process (Linux only: it reads /proc). It exits by itself shortly
    after this process ends, however it ends."""
    if not Path("/proc/self/stat").is_file():
        return None
    return subprocess.Popen([sys.executable, "-m", "medgen.watchdog", "--parent", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True, help="the process whose descendants are watched")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the process table")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the parent's to handle
    watch(args.parent, args.poll)


if __name__ == "__main__":
    main()
