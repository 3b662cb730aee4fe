"""`medgen-server start`: the coordinator's side of a real deployment.

1. the run directory (as `medgen simulate`: a new one, or ``--resume`` an old one);
2. a SuperLink child (TLS, SuperNode authentication) on ``127.0.0.1:<free port>`` only, waited on
   through ``GET /health``: the Control and Runtime APIs are not reachable from the network;
3. every site's public key (``<certs>/sites/<site>.pub``) registered with the SuperLink; only then
   the fleet-only proxy child (``proxy.py``) on the public ``--address/--port`` (waited on the
   same way), so that a site which connects finds its key known instead of being turned away;
4. the medgen ServerApp submitted as a run (a FAB naming ``medgen.server.app:app``; the medgen
   config, the run directory and the handshake travel in the run config); once the SuperLink has
   given it a run id, the run is signed with the study key and the signature handed over to the
   ServerApp (``signing.py``), which sends it with every message;
5. progress followed (the ServerApp writes ``<run>/server.log``) until the run finishes; then
   every child is stopped, whatever happened (also on Ctrl-C / SIGTERM).

Everything Flower writes goes under ``<run>/deployment/`` (SuperLink and proxy logs, Flower home,
the signature hand-over).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medgen import logs
from medgen.config import Config, dump_config, load_config_text
from medgen.deployment.certs import CertError, check_cert, load_public_key, site_public_keys
from medgen.deployment.fab import build_fab
from medgen.deployment.handshake import server_handshake
from medgen.deployment.link import TLS, Control, DeploymentError, start_proxy, start_superlink, wait_healthy
from medgen.deployment.procs import free_port, port_free, shielded
from medgen.deployment.signing import hand_over, sign_study
from medgen.server.errors import FederationError, StudyRefused
from medgen.server.rundir import RunDir, open_run


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 9092
    tls: TLS | None = None  # None: --insecure (no TLS, no SuperNode authentication)
    site_keys: dict[str, Path] = field(default_factory=dict)  # site -> OpenSSH public key
    state_db: Path | None = None
    health_timeout_s: float = 60.0
    port_wait_s: float = 10.0  # how long a taken --port may take to come free
    study_key: Ed25519PrivateKey | None = None  # signs every run; None: unsigned (--insecure only)
    link_port: int | None = None  # the SuperLink's own port on 127.0.0.1 (default: a free one)


def tls_from_certs(certs: Path | None, ca: Path | None, cert: Path | None, key: Path | None) -> TLS:
    """The server's TLS files: explicit flags win over ``<certs>/ca.pem, server.pem, server.key``."""
    files = {"--ca": ca or (certs / "ca.pem" if certs else None),
             "--cert": cert or (certs / "server.pem" if certs else None),
             "--key": key or (certs / "server.key" if certs else None)}
    missing = [flag for flag, path in files.items() if path is None]
    if missing:
        raise CertError(f"TLS needs {', '.join(missing)} (or --certs DIR made by `medgen certs init`); "
                        f"--insecure runs without TLS")
    check_cert(files["--ca"], "--ca")
    check_cert(files["--cert"], "--cert")
    if not files["--key"].is_file():
        raise CertError(f"--key {files['--key']}: private key file not found")
    return TLS(*(Path(p).resolve() for p in files.values()))


def find_site_keys(cfg: Config, keys_dir: Path | None) -> dict[str, Path]:
    """``<keys_dir>/<site>.pub`` for every site of the study; CertError naming the missing ones."""
    if keys_dir is None:
        raise CertError("SuperNode authentication needs the sites' public keys: --certs DIR (DIR/sites/<site>.pub) "
                        "or --site-keys DIR (DIR/<site>.pub)")
    found = site_public_keys(keys_dir.parent) if keys_dir.name == "sites" else \
        {p.stem: p for p in sorted(keys_dir.glob("*.pub"))}
    missing = [s for s in cfg.sites.all if s not in found]
    if missing:
        raise CertError(f"no public key for site(s) {', '.join(missing)} in {keys_dir} (expected "
                        f"{keys_dir / (missing[0] + '.pub')}; the site makes it with `medgen certs site {missing[0]}`)")
    for site in cfg.sites.all:
        load_public_key(found[site])
    return {s: found[s] for s in cfg.sites.all}


def deployment_config(cfg: Config) -> Config:
    """The config the sites receive: the data folder and cache are each site's own business."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": None, "cache_dir": None})})


def prepare_run(cfg: Config | None, out: Path | None, resume: Path | None, overrides=()) -> tuple[Config, RunDir]:
    cfg, run = open_run(cfg, out, resume, overrides)
    cfg = deployment_config(cfg)
    run.create(cfg)
    run.path = run.path.resolve()
    return cfg, RunDir(run.path)


class Follower:
    """Prints the new lines of the ServerApp's ``server.log``."""

    def __init__(self, path: Path, log):
        self.path, self.log, self.offset = path, log, path.stat().st_size if path.is_file() else 0

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.log(line)


def serve(cfg: Config, run: RunDir, opts: ServerOptions, log=logs.info) -> RunDir:
    """Run the federation on a SuperLink until it finishes; stop every child process before
    returning or raising (KeyboardInterrupt / SystemExit included)."""
    if opts.tls is not None and set(opts.site_keys) != set(cfg.sites.all):
        raise CertError(f"public keys are needed for every site: {sorted(cfg.sites.all)}")
    deadline = time.monotonic() + opts.port_wait_s  # a killed predecessor's processes may still be stopping
    while not port_free(opts.host, opts.port) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not port_free(opts.host, opts.port):
        raise DeploymentError(f"--port {opts.port}: something already listens on {opts.host}:{opts.port}")
    if opts.link_port and (opts.link_port == opts.port or not port_free("127.0.0.1", opts.link_port)):
        raise DeploymentError(f"--link-port {opts.link_port}: already in use on 127.0.0.1 (or the same as --port)")
    work = run.path / "deployment"
    work.mkdir(parents=True, exist_ok=True)
    link_port = opts.link_port or free_port("127.0.0.1")
    address = f"{'localhost' if opts.tls else '127.0.0.1'}:{link_port}"
    ca = opts.tls.ca if opts.tls else None
    link = start_superlink("127.0.0.1", link_port, opts.tls, opts.state_db, work / "superlink.log",
                           work / "flwr-home", auth=opts.tls is not None)
    proxy = None
    control = None
    run_id = None
    interrupted = False
    follower = Follower(run.path / "server.log", log)
    try:
        waited = wait_healthy(address, ca, opts.health_timeout_s, link)
        control = Control(address, ca)
        nodes = {}
        for site, key in opts.site_keys.items():  # before the public port opens: a site that reaches
            nodes[site] = control.register(key, name=f"site-{site}")  # it finds its key known
            log(f"site {site}: public key {key} registered (node {nodes[site]})")
        proxy = start_proxy(_join(opts.host, opts.port), f"127.0.0.1:{link_port}", opts.tls, work / "proxy.log")
        waited += wait_healthy(_join(_reachable(opts.host), opts.port), ca, opts.health_timeout_s, proxy,
                               sni_hostname="localhost")
        log(f"SuperLink up: fleet API on {opts.host}:{opts.port} "
            f"({'TLS, SuperNode authentication' if opts.tls else 'INSECURE: no TLS, no authentication'}; "
            f"only /v1/fleet/* and /health are forwarded); Control API and Runtime API on "
            f"127.0.0.1:{link_port} only ({waited:.1f} s; logs {link.log_file}, {proxy.log_file})")
        if opts.study_key is None:
            log("WARNING: no study key: runs are NOT signed; only sites joined with --no-study-signature serve them")
        run_config = {"medgen-config": dump_config(cfg), "run-dir": str(run.path), **server_handshake(cfg),
                      "site-nodes": ",".join(f"{s}={n}" for s, n in nodes.items())}
        run_id = control.start_run(build_fab(run_config["medgen-version"]), run_config)
        sent_text = dump_config(load_config_text(run_config["medgen-config"]))  # what the ServerApp sends
        token = sign_study(opts.study_key, run_id, run.path.name, sent_text) if opts.study_key else ""
        hand_over(run.path, run_id, run.path.name, token)
        log(f"run {run_id} submitted{' and signed' if token else ''} (study {run.path.name}); run directory "
            f"{run.path}; waiting for the sites ({', '.join(cfg.sites.all)})")
        while True:
            follower.poll()
            for child in (link, proxy):
                if not child.running():
                    raise DeploymentError(f"the {child.name} exited (code {child.proc.returncode}); its log "
                                          f"({child.log_file}) ends:\n{child.tail()}")
            status, sub_status, details = control.run_status(run_id)
            if status == "finished":
                follower.poll()
                break
            time.sleep(1.0)
        if sub_status != "completed" and run.status().get("status") != "failed":
            run.set_status("failed", round=run.last_round(), error=f"Flower run {run_id} {sub_status}: {details}")
        status = run.status()
        if status.get("status") != "completed":
            error = StudyRefused if status.get("refused") else FederationError  # refused: by the sites' policies
            raise error(f"the federation did not complete: {status.get('error', status.get('status'))} "
                        f"(run directory {run.path}; SuperLink log {link.log_file})")
        return run
    except BaseException as e:
        follower.poll()  # what the ServerApp wrote up to now
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit)) and type(e).__name__
        raise
    finally:
        with shielded():
            if control is not None:
                if run_id is not None and link.running():
                    try:
                        if control.run_status(run_id)[0] != "finished":
                            control.stop_run(run_id)
                    except Exception:  # the link may be going down; stopping it below ends the run anyway
                        pass
                control.close()
            link.stop()
            if proxy is not None:
                proxy.stop()
            # after the ServerApp is gone: its own last words (e.g. a push error as the link went
            # down) must not hide that the coordinator stopped the run
            if interrupted and run.status().get("status") != "completed":
                run.set_status("failed", round=run.last_round(),
                               error=f"stopped by the coordinator ({interrupted}); continue with --resume {run.path}")
                log(f"stopping: continue later with `medgen-server start --resume {run.path}`")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reachable(host: str) -> str:
    """Where this machine reaches a server listening on ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)

