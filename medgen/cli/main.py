"""`medgen` command line: simulate, train, evaluate, reconstruct, synthesize, utility, report, data
synth|check|split|implant, certs, config show."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from medgen.cli import exitcodes
from medgen.config import Config, ConfigError, dump_config, load_config
from medgen.data.errors import DataError, SiteDataError
from medgen.server.errors import FederationError, StudyRefused


class Parser(argparse.ArgumentParser):
    """The argument parser of every command and subcommand: its --help ends with the exit codes."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", exitcodes.TABLE)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def add_version(parser: argparse.ArgumentParser) -> None:
    from medgen import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v / -q for a long-running command (medgen/logs.py); the result line is printed either way."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0,
                      help="also Flower's and Ray's own messages")
    loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                      help="warnings and errors only (the run's run.log still has every line)")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (see examples/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.image_size=128 (repeatable)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from medgen.data.phantom import synthesize_cohort

    flags = {"sites.train": args.sites, "sites.heldout": args.sites and "[]",
             "phantom.subjects_per_site": args.subjects, "seed": args.seed,
             "phantom.lesion_fraction": args.lesion_fraction}
    # The flags are config keys in disguise, so the schema validates them like any --set.
    cfg = load_config(args.config, args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None])
    sites, subjects, seed, fraction = (cfg.sites.all, cfg.phantom.subjects_per_site, cfg.seed,
                                       cfg.phantom.lesion_fraction)
    start = time.perf_counter()
    folders = synthesize_cohort(args.out, sites, subjects, seed, lesion_fraction=fraction)
    print(f"phantom cohort: {len(folders)} sites x {subjects} subjects (seed {seed}) "
          f"in {time.perf_counter() - start:.1f} s")
    for site, folder in folders.items():
        print(f"  site {site}: {folder}")
    print(f"  picture: {Path(args.out) / 'overview.png'}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from medgen.data.check import check_site

    cfg = _load(args)
    pictures = _picture_paths(args.folders, args.picture, args.no_picture)
    worst = 0
    for i, folder in enumerate(args.folders):
        if i:
            print()
        report = check_site(folder, cfg.data)
        print(report.summary(cfg.data))
        if pictures:
            print(_site_picture(report, pictures[i]))
        worst = max(worst, report.exit_code)
    return worst


def _picture_paths(folders: list[Path], picture: Path | None, none: bool) -> list[Path]:
    """Where `data check` draws each site: ``DIR-overview.png`` beside it; with ``--picture``, that
    file (one DIR) or ``<folder>/<DIR name>-overview.png`` (several DIRs: ``--picture`` is a folder)."""
    from medgen.data.picture import default_picture_path

    if none:
        return []
    if picture is None:
        return [default_picture_path(f) for f in folders]
    if len(folders) == 1 and not picture.is_dir():
        return [picture]
    if picture.exists() and not picture.is_dir():
        raise ConfigError(f"--picture {picture}: with {len(folders)} site folders --picture must be a folder")
    names = [default_picture_path(f).name for f in folders]
    if len(set(names)) < len(names):
        raise ConfigError(f"--picture {picture}: two site folders share a name; check them one at a time")
    return [picture / n for n in names]


def _site_picture(report, path: Path) -> str:
    from medgen.data.picture import draw_site

    if report.slices is None or len(report.slices) == 0:
        return "picture: none (no usable slice)"
    try:
        draw_site(report.slices, path, f"site folder {report.folder}")
    except OSError as e:
        return f"picture: not written ({path}: {e.strerror or e}); choose a place with --picture FILE"
    return f"picture: {path}"


def cmd_simulate(args: argparse.Namespace) -> int:
    from medgen.simulation import simulate
    from medgen.watchdog import guard

    guard()  # Ray's processes end with this one, even on SIGKILL

    started = time.time()
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; give changes with --set, not --config")
        run = simulate(resume=args.resume, overrides=args.overrides)
    else:
        run = simulate(_load(args), out=args.out)
    report = run.path / "report" / "index.html"  # the ServerApp writes it; built here if it did not
    fresh = report.is_file() and report.stat().st_mtime >= started
    print(f"run directory: {run.path}\nreport: {report if fresh else _report(run.path)}")
    return 0


def _report(run_dir: Path) -> Path:
    from medgen.evaluation.report import build_report

    return build_report(run_dir)


def cmd_report(args: argparse.Namespace) -> int:
    from medgen.evaluation.report import build_report, compare_runs

    if args.compare:
        print(f"comparison: {compare_runs(args.runs, args.out or Path('runs') / 'compare')}")
        return 0
    for run in args.runs:
        print(f"report: {build_report(run)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medgen.evaluation.evaluate import evaluate_checkpoint

    if args.config:
        raise ConfigError("evaluate uses the checkpoint's own config; change data.*, evaluation.* or "
                          "sampling / anomaly-map keys (e.g. model.anomaly_t) with --set")
    run = evaluate_checkpoint(args.checkpoint, args.data, out=args.out, site=args.site, overrides=args.overrides)
    print(f"run directory: {run.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medgen.baselines import train_baseline

    run = train_baseline(_load(args), site=args.site, out=args.out)
    print(f"run directory: {run.path}\nreport: {_report(run.path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="medgen", description=__doc__)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="show the resolved configuration")
    config_commands = config.add_subparsers(dest="action", required=True)
    show = config_commands.add_parser("show", help="print every key of the resolved config as YAML")
    _config_args(show)
    show.set_defaults(func=cmd_config_show)

    sim = commands.add_parser("simulate", help="federated training of all sites on this machine (Flower + Ray)")
    sim.add_argument("--out", type=Path, help="run directory (default: runs/<time>-<family>-<strategy>)")
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run after its last completed round")
    _config_args(sim)
    add_verbosity(sim)
    sim.set_defaults(func=cmd_simulate)

    train = commands.add_parser("train", help="baselines: one site alone, or all training sites pooled")
    where = train.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", help="train on this site only")
    where.add_argument("--centralized", action="store_true", help="train on all training sites pooled")
    train.add_argument("--out", type=Path, help="run directory (default: runs/baseline-<site>-<family>)")
    _config_args(train)
    add_verbosity(train)
    train.set_defaults(func=cmd_train)

    ev = commands.add_parser("evaluate", help="evaluate any checkpoint on any site folder, with a report")
    ev.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/round-NNNN.pt file")
    ev.add_argument("--data", type=Path, required=True, help="a site folder of NIfTI scans")
    ev.add_argument("--site", help="name to report the folder under (default: the folder's name)")
    ev.add_argument("--out", type=Path, help="output run directory (default runs/evaluate-<site>-<checkpoint>)")
    _config_args(ev)
    add_verbosity(ev)
    ev.set_defaults(func=cmd_evaluate)

    report = commands.add_parser("report", help="(re)build a run's HTML report, or compare runs")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--compare", action="store_true", help="one table and chart of the runs' held-out metrics")
    report.add_argument("--out", type=Path, help="with --compare: output folder (default runs/compare)")
    report.set_defaults(func=cmd_report)

    data = commands.add_parser("data", help="make or check site folders of NIfTI scans")
    data_commands = data.add_subparsers(dest="action", required=True)
    synth = data_commands.add_parser("synth", help="write the multi-site phantom cohort as NIfTI")
    synth.add_argument("--out", type=Path, required=True, help="folder to write (one sub-folder per site)")
    synth.add_argument("--sites", type=lambda s: f"[{s}]",
                       help="comma-separated site names (default: sites.train + sites.heldout)")
    synth.add_argument("--subjects", type=int, help="subjects per site (default: phantom.subjects_per_site)")
    synth.add_argument("--seed", type=int, help="random seed (default: seed)")
    synth.add_argument("--lesion-fraction", type=float, help="share of lesion subjects")
    _config_args(synth)
    synth.set_defaults(func=cmd_data_synth)

    check = data_commands.add_parser(
        "check", help="validate site folders and summarise them",
        description="Summarise site folders, list every problem (naming the file), and draw each site's\n"
                    f"slices as they will be trained on. Exit code: {exitcodes.DONE} usable; "
                    f"{exitcodes.SOME_FILES_BAD} usable but some files are bad;\n"
                    f"{exitcodes.INPUT_ERROR} nothing usable.")
    check.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    drawn = check.add_mutually_exclusive_group()
    drawn.add_argument("--picture", type=Path, metavar="FILE",
                       help="where to draw the site (default DIR-overview.png beside DIR); with several DIRs a "
                            "folder, holding DIR-overview.png for each")
    drawn.add_argument("--no-picture", action="store_true", help="draw no picture")
    _config_args(check)
    check.set_defaults(func=cmd_data_check)

    from medgen.cli.cohort import add_parser as add_cohort_parser

    add_cohort_parser(data_commands)

    from medgen.cli.reconstruct import add_parser as add_reconstruct_parser

    add_reconstruct_parser(commands)

    from medgen.cli.synthesize import add_parser as add_synthesize_parser

    add_synthesize_parser(commands)

    from medgen.cli.utility import add_parser as add_utility_parser

    add_utility_parser(commands)

    from medgen.cli.certs import add_parser as add_certs_parser

    add_certs_parser(commands)
    return parser


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt. A SystemExit, so that
    what stops on Ctrl-C or SystemExit (medgen.deployment.server.serve) stops cleanly on it too."""


def _on_sigterm(signum, frame):
    raise Terminated(exitcodes.TERMINATED)


def exit_code(e: Exception) -> int | None:
    """The exit code (medgen/cli/exitcodes.py) of an error whose message says what to fix; None for
    any other exception (a bug: its traceback is shown)."""
    from medgen.deployment.certs import CertError
    from medgen.deployment.link import DeploymentError, Refused

    if isinstance(e, (Refused, StudyRefused)):  # a site's policy, or the server, refused
        return exitcodes.REFUSED
    if isinstance(e, (ConfigError, DataError, SiteDataError, CertError)):
        return exitcodes.INPUT_ERROR
    if isinstance(e, (FederationError, DeploymentError)):
        return exitcodes.FAILED
    return None


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, stopped: str) -> int:
    """Parse ``argv`` and run its command; returns its exit code. An error with a code (``exit_code``)
    prints ``error: ...``; Ctrl-C and SIGTERM print what ``stopped`` says was kept or stopped."""
    from medgen import logs

    args = parser.parse_args(argv)
    logs.configure(getattr(args, "verbosity", 0))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Terminated) as e:
        ctrl_c = isinstance(e, KeyboardInterrupt)
        code = exitcodes.INTERRUPTED if ctrl_c else exitcodes.TERMINATED
        print(f"{'interrupted (Ctrl-C)' if ctrl_c else 'stopped (SIGTERM)'}: {stopped}", file=sys.stderr)
        if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # the simulation engine's own threads would keep the process waiting for ever
        return code
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, "finished rounds are kept: `medgen simulate --resume RUN_DIR` "
                                             "continues a run")


if __name__ == "__main__":
    sys.exit(main())
