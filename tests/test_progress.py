"""Progress bars (#19 req 4): on a terminal a long step shows a bar with its rate and ETA; in a pipe
(CI, a log file) nothing of it is printed, and the result lines are the same."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from conftest import FAST_DATA, make_plain_site

MEDGEN = str(Path(sys.executable).parent / "medgen")


def _check(site: Path, cache: Path, *flags: str, terminal: bool) -> str:
    """`medgen data check SITE` with stdout and stderr on a pseudo-terminal or on pipes; all it printed."""
    sets = [x for kv in [f"data.cache_dir={cache}", *FAST_DATA] for x in ("--set", kv)]
    args = [MEDGEN, "data", "check", str(site), "--no-picture", *sets, *flags]
    env = {k: v for k, v in os.environ.items() if k != "MEDGEN_PROGRESS"} | {"COLUMNS": "120"}
    if not terminal:
        out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        return out.stdout + out.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_a_bar_with_rate_and_eta_on_a_terminal_only(tmp_path):
    site = make_plain_site(tmp_path / "A", n_healthy=3, n_lesion=1)
    on_terminal = _check(site, tmp_path / "cache-1", terminal=True)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", on_terminal)
    assert "site A: preprocessing" in plain and "ETA" in plain, plain[-2000:]
    assert re.search(r"4/4 [0-9.]+ scans/s", plain), plain[-2000:]  # the last frame: all done, with the rate
    assert "OK: usable" in on_terminal

    piped = _check(site, tmp_path / "cache-2", terminal=False)
    assert "OK: usable" in piped and "ETA" not in piped and "preprocessing" not in piped and "\x1b[" not in piped
