"""`medgen-client join`: a site's side of a real deployment — one SuperNode bound to the site's
data through its node config (``site``, ``data-dir``, ``state-dir``, ``policy``; ``study-key``, the
coordinator's study.pub that every run must be signed with, or ``allow-unsigned-studies``). The
site's policy, privacy ledger, DP secret, sent-message log, slice cache and Flower files stay in
``--state-dir``. While the server is not up (or the
connection drops) the SuperNode is restarted with exponential back-off; a key the server keeps
refusing, or a bad flag, stops it with the reason."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medgen import logs
from medgen.config import ConfigError
from medgen.deployment.link import Refused
from medgen.deployment.procs import Child, flower_bin, flower_env, free_port
from medgen.deployment.signing import NODE_KEY, NODE_UNSIGNED
from medgen.deployment.supernode import heartbeat_s

# What a SuperNode's log says when the SuperLink turns its key away, and when it gives up.
# (Flower 1.41: "[code: 2004] Failed to activate SuperNode." and exit code 305.)
REFUSED = re.compile(r"(?i)(code: 2004\]|failed to activate supernode|no supernode found with the given public key)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SERVED = re.compile(r"^task \S+: ")  # the worker served a task: the server had accepted this node
INVALID_ARGS = re.compile(r"(?i)(unable to parse the private key|does not point to a file|error: argument)")


@dataclass
class NodeOptions:
    site: str
    server: str  # HOST:PORT of the SuperLink
    data: Path
    state_dir: Path
    ca: Path | None  # None: --insecure
    key: Path | None  # the site's OpenSSH private key (SuperNode authentication)
    port: int | None = None  # the SuperNode's local Runtime API port (default: a free one)
    max_backoff_s: float = 30.0
    max_attempts: int | None = None
    max_refusals: int = 3  # the key may be registered a moment after the SuperLink is up
    stale_patience_s: float = 150.0  # how long a node the server accepted before may be refused (see join)
    worker: bool = True  # one long-lived ClientApp process (medgen/deployment/worker.py), not one per message
    policy: Path | None = None  # the site's policy file (default <state_dir>/policy.yaml)
    study_key: Path | None = None  # the coordinator's study.pub: the site serves only runs signed with it
    allow_unsigned: bool = False  # --insecure --no-study-signature: serve unsigned runs (a closed test network)

    @property
    def policy_file(self) -> Path:
        return self.policy or self.state_dir / "policy.yaml"


def node_config(opts: NodeOptions) -> str:
    """The SuperNode's ``--node-config`` text (what the ClientApp reads as ``context.node_config``)."""
    def q(v) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = (f"site={q(opts.site)} data-dir={q(opts.data)} state-dir={q(opts.state_dir)} "
            f"policy={q(opts.policy_file)}")
    if opts.study_key is not None:
        text += f" {NODE_KEY}={q(opts.study_key)}"
    if opts.allow_unsigned:
        text += f" {NODE_UNSIGNED}={q('true')}"
    return text


def supernode_command(opts: NodeOptions, port: int) -> list[str]:
    isolation = "process" if opts.worker else "subprocess"
    # with the worker, Flower's SuperNode with a shorter idle poll (medgen/deployment/supernode.py)
    supernode = [sys.executable, "-m", "medgen.deployment.supernode"] if opts.worker else [flower_bin("flower-supernode")]
    cmd = [*supernode, "--superlink", opts.server, "--node-config", node_config(opts),
           "--host", "127.0.0.1", "--port", str(port), "--isolation", isolation]
    if opts.ca is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(opts.ca)]
    if opts.key is not None:
        cmd += ["--auth-supernode-private-key", str(opts.key)]
    return cmd


def worker_command(port: int, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "medgen.deployment.worker", "--runtime-api-address", f"127.0.0.1:{port}",
            "--parent-pid", str(parent_pid)]


def site_env(opts: NodeOptions) -> dict[str, str]:
    extra = {} if os.environ.get("MEDGEN_CACHE_DIR") else {"MEDGEN_CACHE_DIR": str(opts.state_dir / "cache")}
    if not os.environ.get("MEDGEN_CLIENT_THREADS"):  # a site trains on its whole machine unless told otherwise
        extra["MEDGEN_CLIENT_THREADS"] = str(os.cpu_count() or 1)
    return flower_env(opts.state_dir / "flwr-home", extra)


class Tail:
    """New lines of a log file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, path.stat().st_size if path.is_file() else 0

    def lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open(errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        return complete.splitlines()


def _plain(line: str) -> str:
    return ANSI.sub("", line).rstrip()


def _interesting(line: str) -> bool:
    return any(k in line for k in ("REFUSED", "site ", "ERROR", "WARNING", "Traceback", "Error:"))


def join(opts: NodeOptions, log=logs.info) -> int:
    """Run the site's SuperNode until it is stopped (Ctrl-C / SIGTERM: stops it cleanly) or the
    server refuses the site; returns an exit code."""
    try:
        heartbeat = heartbeat_s()  # the SuperNode's and the worker's (MEDGEN_HEARTBEAT_S)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    port = opts.port or free_port()
    log_file = opts.state_dir / "supernode.log"
    backoff, attempt, refusals = 1.0, 0, 0
    accepted, stale_since = False, None  # has the server accepted this site's node in this session?
    mode = "TLS" if opts.ca else "INSECURE (no TLS)"
    log(f"site {opts.site}: joining {opts.server} ({mode}{', authenticated' if opts.key else ''}); data {opts.data}; "
        f"state {opts.state_dir}; SuperNode log {log_file}")
    while True:
        attempt += 1
        tail = Tail(log_file)
        node = Child(f"SuperNode {opts.site}", supernode_command(opts, port), log_file, env=site_env(opts))
        worker = None
        started = time.monotonic()
        try:
            refused = None
            while node.running():
                if opts.worker and (worker is None or not worker.running()):
                    if worker is not None:
                        log(f"site {opts.site}: the ClientApp worker exited (code {worker.proc.returncode}); "
                            f"starting it again")
                    worker = Child(f"worker {opts.site}", worker_command(port, node.pid), log_file,
                                   env=site_env(opts))
                for line in map(_plain, tail.lines()):
                    if REFUSED.search(line) and "REFUSED" not in line:
                        refused = line
                    accepted = accepted or bool(SERVED.match(line))
                    if _interesting(line):
                        log(f"[supernode {opts.site}] {line.strip()}")
                if refused:
                    break
                time.sleep(0.5)
            for line in map(_plain, tail.lines()):
                if REFUSED.search(line) and "REFUSED" not in line:
                    refused = refused or line
                if _interesting(line):
                    log(f"[supernode {opts.site}] {line.strip()}")
        finally:
            if worker is not None:
                worker.stop()
            code = node.stop()
        if refused and accepted:
            # Flower answers a node whose predecessor crashed exactly as it answers an unknown key, while
            # it still counts the old node as online (until 2 missed heartbeats, 60 s by default): wait that out
            stale_since = stale_since or time.monotonic()
            if time.monotonic() - stale_since > opts.stale_patience_s:
                raise Refused(f"the server has refused site {opts.site}'s SuperNode for "
                              f"{opts.stale_patience_s:g} s since it last served: {refused.strip()}")
            log(f"site {opts.site}: the server still counts this site's previous SuperNode as online (it stopped "
                f"without signing off; released within {2 * heartbeat:g} s); trying again in 5 s")
            time.sleep(5)
            continue
        if not refused and time.monotonic() - started > 30:
            accepted = True  # it ran without being turned away
        stale_since = None
        if refused:
            refusals += 1
            pub = Path(str(opts.key)).with_suffix(".pub") if opts.key else None
            if refusals >= opts.max_refusals:
                raise Refused(f"the server refused site {opts.site}'s key ({opts.key}) {refusals} times: "
                              f"{refused.strip()}\nAsk the coordinator to register {pub}")
            log(f"site {opts.site}: the server does not know this site's key yet ({refused.strip()}); "
                f"trying again in {2 * refusals} s (the coordinator registers {pub} when it starts)")
            time.sleep(2 * refusals)
            continue
        if INVALID_ARGS.search(node.tail()):
            raise ConfigError(f"the SuperNode rejected its arguments; its log ({log_file}) ends:\n{node.tail(800)}")
        if opts.max_attempts is not None and attempt >= opts.max_attempts:
            return code or 1
        if time.monotonic() - started > 60:
            backoff = 1.0
        log(f"site {opts.site}: SuperNode exited (code {code}); trying again in {backoff:.0f} s")
        time.sleep(backoff)
        backoff = min(opts.max_backoff_s, backoff * 2)
