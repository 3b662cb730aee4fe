"""`medgen-client join --site A --server HOST:PORT --data DIR`: take part in a study as one site.
Starts a Flower SuperNode bound to the site's data; the scans never leave this machine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medgen.cli import exitcodes
from medgen.cli.main import Parser, _config_args, add_verbosity, add_version, run_command
from medgen.config import ConfigError, load_config
from medgen.watchdog import guard

SHARED = """\
What this site sends to the server (nothing else leaves it; each message is logged first in
<state-dir>/sent-messages.jsonl):
  - once per run: the site name and aggregate numbers about its data (slice and subject counts,
    lesion-slice count, a 32-bin intensity histogram, voxel-size and orientation counts);
  - each round it trains: the model weights after local training and its loss terms, the number of
    examples and steps, the time taken (with DP-SGD: epsilon, delta, noise multiplier, sample rate);
  - each evaluation: aggregate scores (losses, RadFD-20/KID/precision/recall/MS-SSIM, lesion-detection
    AUROC/AUPRC/Dice, memorisation-audit distances) and ROC/PR curves; images (anomaly-map overlays,
    the memorisation audit's sample/training-slice pairs) only if the site policy's share_images is
    true AND the study asks for them;
  - a refusal or an error: its reason, with file paths and file names replaced by <path> / <file>.
Never sent: scans, masks, slices (unless share_images), file names, paths, subject identifiers, the
privacy ledger, the DP secret, the policy file."""


def default_state_dir(site: str) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "medgen" / "sites" / site


def _study_key(args: argparse.Namespace) -> Path | None:
    """The coordinator's study.pub this site checks every run against (None: --no-study-signature)."""
    from medgen.deployment.certs import CertError
    from medgen.deployment.signing import load_verify_key

    if args.no_study_signature:
        if not args.insecure:
            raise CertError("--no-study-signature is only for an --insecure test deployment: a site with TLS serves "
                            "only runs signed with the coordinator's study.pub (--study-key FILE)")
        print("WARNING: --no-study-signature: this site serves ANY run, signed or not, started by whoever reaches "
              "the server; use it only on a closed test network", file=sys.stderr, flush=True)
        return None
    path = args.study_key or (args.certs / "study.pub" if args.certs else None)
    if path is None:
        raise CertError("--study-key FILE is needed: the coordinator's study.pub (or --certs DIR with DIR/study.pub); "
                        "the site serves only runs signed with it"
                        + ("; on a closed test network, --no-study-signature serves unsigned runs" if args.insecure else ""))
    load_verify_key(path, "--study-key")
    return path.resolve()


def cmd_join(args: argparse.Namespace) -> int:
    from medgen.deployment.certs import CertError, check_cert, check_private_key, check_site_name

    site = check_site_name(args.site)
    data = args.data.resolve()
    if not data.is_dir():
        raise CertError(f"--data {args.data}: not a folder")
    state_dir = (args.state_dir or default_state_dir(site)).resolve()
    policy_file = (args.policy or state_dir / "policy.yaml").resolve()
    if args.dry_run:
        return _dry_run(site, data, policy_file, args)
    if not args.server:
        raise ConfigError("--server HOST:PORT is required (the coordinator's SuperLink)")
    ca, key = args.ca, args.key
    if args.certs:
        ca = ca or args.certs / "ca.pem"
        key = key or args.certs / "sites" / f"{site}.key"
    if args.insecure:
        ca = key = None
    else:
        if ca is None or key is None:
            raise CertError("TLS and site authentication need --ca CA.pem and --key SITE.key (or --certs DIR); "
                            "--insecure joins a server started with --insecure")
        ca, key = check_cert(ca, "--ca").resolve(), check_private_key(key).resolve()
    study_key = _study_key(args)
    from medgen.deployment.node import NodeOptions, join

    from medgen.client.policy import ensure_policy, policy_text

    policy, created = ensure_policy(policy_file)
    if created:
        print(f"site {site}: no policy file yet; wrote the safe defaults to {policy_file} (edit it to change "
              f"what this site agrees to):\n{policy_text(policy)}")
    else:
        print(f"site {site}: policy {policy_file}")
    opts = NodeOptions(site=site, server=args.server, data=data, ca=ca, key=key, state_dir=state_dir,
                       port=args.port, worker=args.clientapp == "worker", policy=policy_file, study_key=study_key,
                       allow_unsigned=args.no_study_signature)
    guard()  # the SuperNode and the ClientApp worker end with this process, even on SIGKILL
    return join(opts)


def _dry_run(site: str, data: Path, policy_file: Path, args: argparse.Namespace) -> int:
    """Check the data, show the policy and, with ``--config``, whether this site would serve that
    study; print what would be shared. Writes nothing. The exit code is the data check's, or
    REFUSED when the data are usable but the policy refuses the study."""
    from medgen.client.policy import policy_text, violations
    from medgen.config import SitePolicy, load_policy
    from medgen.data.check import check_site

    cfg = load_config(args.config, args.overrides)
    report = check_site(data, cfg.data)
    print(report.summary(cfg.data))
    policy = load_policy(policy_file) if policy_file.is_file() else SitePolicy()
    where = policy_file if policy_file.is_file() else f"{policy_file} (not written yet: the safe defaults)"
    print(f"\nsite policy {where}:\n{policy_text(policy)}")
    found = []
    if args.config is not None or args.overrides:
        found = violations(cfg, policy, site, ("", ""))
        print("this site would REFUSE that study:\n" + "\n".join(f"  - {v}" for v in found) if found
              else "this site's policy allows that study")
    print(SHARED)
    if found and report.exit_code != exitcodes.INPUT_ERROR:
        return exitcodes.REFUSED
    return report.exit_code


def cmd_sent(args: argparse.Namespace) -> int:
    """Summarise the site's sent-message log: what left this site, per kind of message."""
    from medgen.client import sent_log

    state_dir = (args.state_dir or default_state_dir(args.site)).resolve()
    entries = sent_log.read(state_dir)
    print(f"site {args.site}: {len(entries)} messages sent ({state_dir / sent_log.FILE})")
    for kind, status, n, size, keys, images in sent_log.summary(entries):
        print(f"  {kind:9s} {status:8s} x{n:<5d} {size:>12,d} bytes  images: {images}\n      {keys}")
    reasons = dict.fromkeys(f"run {e['run']} round {e['round']} {e['kind']}: {e['reason']}"
                            for e in entries if "reason" in e)
    if reasons:
        print("refusals and errors sent:\n" + "\n".join(f"  {r}" for r in reasons))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="medgen-client", description=__doc__)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    j = commands.add_parser("join", help="join a study as one site")
    j.add_argument("--site", required=True, help="this site's name, as in the study's sites.train / sites.heldout")
    j.add_argument("--server", help="the coordinator's SuperLink, HOST:PORT")
    j.add_argument("--data", type=Path, required=True, help="this site's folder of NIfTI scans")
    j.add_argument("--certs", type=Path, help="folder with ca.pem, study.pub and sites/<site>.key")
    j.add_argument("--ca", type=Path, help="the study's CA certificate (verifies the server)")
    j.add_argument("--key", type=Path, help="this site's private key (made by `medgen certs site NAME`)")
    j.add_argument("--study-key", type=Path, help="the coordinator's study.pub: only runs signed with it are "
                   "served (default <certs>/study.pub)")
    j.add_argument("--no-study-signature", action="store_true",
                   help="with --insecure only: serve unsigned runs (a closed test network)")
    j.add_argument("--state-dir", type=Path, help="where the site keeps its policy, privacy ledger, DP secret, "
                   "slice cache and logs (default ~/.local/state/medgen/sites/<site>)")
    j.add_argument("--policy", type=Path, help="the site's policy file (default <state-dir>/policy.yaml, written "
                   "with the safe defaults on first join)")
    j.add_argument("--port", type=int, help="local port of the SuperNode's Runtime API (default: a free one)")
    j.add_argument("--clientapp", choices=["worker", "per-message"], default="worker",
                   help="worker (default): one long-lived ClientApp process; per-message: Flower's default, "
                   "a fresh process (and torch import) for every message")
    j.add_argument("--dry-run", action="store_true", help="check the data and print what would be shared; do not join")
    j.add_argument("--insecure", action="store_true", help="no TLS, no authentication (server started with --insecure)")
    _config_args(j)
    add_verbosity(j)
    j.set_defaults(func=cmd_join)
    s = commands.add_parser("sent", help="what this site has sent: a summary of its sent-message log")
    s.add_argument("--site", required=True)
    s.add_argument("--state-dir", type=Path, help="the site's state folder (default ~/.local/state/medgen/sites/<site>)")
    s.set_defaults(func=cmd_sent)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, "the SuperNode is stopped")


if __name__ == "__main__":
    sys.exit(main())
