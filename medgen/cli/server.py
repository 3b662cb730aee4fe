"""`medgen-server start`: run a federated study on a Flower SuperLink (TLS + SuperNode
authentication unless --insecure); writes the same run directory and reports as `medgen simulate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgen import logs
from medgen.cli.main import Parser, _config_args, add_verbosity, add_version, run_command
from medgen.config import ConfigError, load_config
from medgen.watchdog import guard


def study_key(args: argparse.Namespace):
    """The study-signing key: ``--study-key`` or ``<certs>/study.key``; required unless --insecure
    (then used when present)."""
    from medgen.deployment.signing import SigningError, load_signing_key

    path = args.study_key or (args.certs / "study.key" if args.certs else None)
    if args.insecure and args.study_key is None and (path is None or not path.is_file()):
        return None
    if path is None:
        raise SigningError("the study-signing key is needed: --study-key FILE or --certs DIR (DIR/study.key, made by "
                           "`medgen certs init` or `medgen certs study`); --insecure runs unsigned")
    return load_signing_key(path)


def cmd_start(args: argparse.Namespace) -> int:
    from medgen.deployment.server import ServerOptions, find_site_keys, prepare_run, serve, tls_from_certs
    from medgen.evaluation.report import build_report

    if args.resume and args.config:
        raise ConfigError("--resume uses the run's own config.yaml; give changes with --set, not --config")
    # Check the flags and files before anything is written.
    cfg = None if args.resume else load_config(args.config, args.overrides)
    tls = keys = None
    if not args.insecure:
        tls = tls_from_certs(args.certs, args.ca, args.cert, args.key)
    signing_key = study_key(args)
    cfg, run = prepare_run(cfg, args.out, args.resume, args.overrides)
    logs.to_run_log(run.path)
    if not args.insecure:
        keys = find_site_keys(cfg, args.site_keys or (args.certs / "sites" if args.certs else None))
    opts = ServerOptions(host=args.address, port=args.port, tls=tls, site_keys=keys or {},
                         state_db=args.state_db, health_timeout_s=args.health_timeout,
                         study_key=signing_key, link_port=args.link_port)
    guard()  # the SuperLink, proxy and ServerApp end with this process, even on SIGKILL
    serve(cfg, run, opts)
    print(f"run directory: {run.path}\nreport: {build_report(run.path)}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """One ``GET /health`` of the coordinator's port (a container HEALTHCHECK, or a site checking it
    can reach the server): 0 when it answers 200 within ``--timeout``."""
    from medgen.deployment.link import wait_healthy

    if args.ca is None and not args.insecure:
        raise ConfigError("--ca FILE (the study's ca.pem) is needed to check the server's certificate; "
                          "--insecure for a server started with --insecure")
    waited = wait_healthy(args.address, None if args.insecure else args.ca, args.timeout)
    print(f"{args.address}: healthy ({waited:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="medgen-server", description=__doc__)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start the SuperLink and run the study")
    start.add_argument("--address", default="0.0.0.0", help="address of the sites' port (default 0.0.0.0: all); "
                       "only the Fleet API and /health are served there")
    start.add_argument("--port", type=int, default=9092, help="the one port the sites connect to (default 9092)")
    start.add_argument("--link-port", type=int, help="the SuperLink's own port, on 127.0.0.1 only (Control and "
                       "Runtime APIs; default: a free one)")
    start.add_argument("--certs", type=Path, help="folder made by `medgen certs init` (ca.pem, server.pem, "
                       "server.key, study.key, sites/<site>.pub)")
    start.add_argument("--ca", type=Path, help="CA certificate (default <certs>/ca.pem)")
    start.add_argument("--cert", type=Path, help="server certificate (default <certs>/server.pem)")
    start.add_argument("--key", type=Path, help="server private key (default <certs>/server.key)")
    start.add_argument("--study-key", type=Path, help="the study-signing private key that signs every run "
                       "(default <certs>/study.key)")
    start.add_argument("--site-keys", type=Path, help="folder of the sites' public keys <site>.pub "
                       "(default <certs>/sites)")
    start.add_argument("--state-db", type=Path, help="SuperLink state database file (default: in memory)")
    start.add_argument("--out", type=Path, help="run directory (default runs/<time>-<family>-<strategy>)")
    start.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run after its last completed round")
    start.add_argument("--insecure", action="store_true",
                       help="no TLS and no site authentication: for a closed test network only")
    start.add_argument("--health-timeout", type=float, default=60.0, help="seconds to wait for the SuperLink")
    _config_args(start)
    add_verbosity(start)
    start.set_defaults(func=cmd_start)
    health = commands.add_parser("health", help="check that a coordinator answers on its port (GET /health)")
    health.add_argument("--address", default="localhost:9092", help="host:port (default localhost:9092)")
    health.add_argument("--ca", type=Path, help="CA certificate the server's certificate is checked against")
    health.add_argument("--insecure", action="store_true", help="plain HTTP (a server started with --insecure)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, "every child process is stopped")


if __name__ == "__main__":
    sys.exit(main())
