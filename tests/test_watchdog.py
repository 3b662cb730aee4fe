"""Processes die with their parent: the watchdog stops what a SIGKILLed process left running,
including what its children detached into new sessions, and nothing it should not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgen.watchdog import _start_time

PARENT = """\
import subprocess, sys, time
from medgen.watchdog import guard
guard()
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
                          "time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    return _start_time(pid) is not None and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the watchdog reads /proc (Linux)")
def test_a_sigkilled_parent_leaves_nothing_running(tmp_path):
    from medgen.deployment.procs import descendants

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while len(descendants(parent.pid)) < 3 and time.monotonic() < deadline:  # watchdog, child, grandchild
        time.sleep(0.2)
    below = descendants(parent.pid)
    assert len(below) >= 3
    time.sleep(1.0)  # the watchdog has looked at the table since
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the parent's
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in below if _alive(p)], "left running"
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()
