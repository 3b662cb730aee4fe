"""`medgen certs init` / `medgen certs study` / `medgen certs site NAME`: the study's CA, the server
certificate, the coordinator's study-signing key and the sites' SuperNode key pairs (see
medgen/deployment/certs.py for the layout)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path


def _errors(fn):
    """A file that cannot be written is a CertError (naming it), like a bad one."""
    @functools.wraps(fn)
    def wrapped(args):
        from medgen.deployment.certs import CertError

        try:
            return fn(args)
        except OSError as e:
            raise CertError(str(e)) from None
    return wrapped


@_errors
def cmd_init(args: argparse.Namespace) -> int:
    from medgen.deployment.certs import init_ca

    made = init_ca(args.out, args.host, days=args.days, force=args.force)
    print(f"CA: {made['ca']} (its key {made['ca-key']}: keep it offline)")
    print(f"server certificate: {made['cert']}, key {made['key']}; valid for {', '.join(made['hosts'])}")
    print(f"study-signing key: {made['study-key']} (stays with medgen-server), {made['study-pub']} "
          f"(goes to every site with {made['ca']})")
    print(f"next: `medgen certs site NAME --out {args.out}` for every site")
    return 0


@_errors
def cmd_study(args: argparse.Namespace) -> int:
    from medgen.deployment.certs import make_study_keys

    made = make_study_keys(args.out, force=args.force)
    print(f"study-signing key: {made['study-key']} (stays with medgen-server), {made['study-pub']} "
          f"(goes to every site)")
    return 0


@_errors
def cmd_site(args: argparse.Namespace) -> int:
    from medgen.deployment.certs import make_site_keys

    for site in args.sites:
        made = make_site_keys(args.out, site, force=args.force)
        print(f"site {site}: private key {made['key']} (stays at the site), public key {made['pub']} "
              f"(goes to the coordinator)")
    return 0


def add_parser(commands) -> None:
    certs = commands.add_parser("certs", help="make the CA, server certificate and site keys for a deployment")
    actions = certs.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="a CA, a server certificate (localhost plus --host names) and "
                              "the study-signing key pair")
    init.add_argument("--out", type=Path, default=Path("certs"), help="folder to write (default ./certs)")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="a host name or IP address the sites use to reach the server (repeatable)")
    init.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=cmd_init)
    study = actions.add_parser("study", help="only the study-signing key pair study.key / study.pub (Ed25519), "
                               "e.g. for a certificate folder made before it existed")
    study.add_argument("--out", type=Path, default=Path("certs"), help="certificate folder (default ./certs)")
    study.add_argument("--force", action="store_true", help="replace an existing study key")
    study.set_defaults(func=cmd_study)
    site = actions.add_parser("site", help="a SuperNode key pair per site (EC P-384, OpenSSH format)")
    site.add_argument("sites", nargs="+", metavar="NAME")
    site.add_argument("--out", type=Path, default=Path("certs"), help="certificate folder (default ./certs)")
    site.add_argument("--force", action="store_true", help="replace an existing key pair")
    site.set_defaults(func=cmd_site)
