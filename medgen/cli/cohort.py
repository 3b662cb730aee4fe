"""`medgen data split` / `medgen data implant`: site folders made from other site folders (see
medgen/data/cohort.py): a cohort split into sites by subject, and the real-anatomy lesion
benchmark (synthetic lesions implanted into healthy scans)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_split(args: argparse.Namespace) -> int:
    from medgen.cli.main import _load
    from medgen.data.cohort import split_site

    cfg = _load(args)
    folders = split_site(args.source, args.out, args.sites.split(","), cfg.data, seed=args.seed,
                         brain_masks=args.brain_masks)
    for site, folder in folders.items():
        print(f"site {site}: {folder} ({sum(1 for _ in (folder / 'scans').iterdir())} scans)")
    print(f"assignment: {Path(args.out) / 'split.json'}")
    return 0


def cmd_implant(args: argparse.Namespace) -> int:
    from medgen.cli.main import _load
    from medgen.data.cohort import implant_site

    cfg = _load(args)
    start = time.perf_counter()
    folder = implant_site(args.source, args.out, cfg.data, seed=args.seed, fraction=args.fraction, kind=args.kind)
    n = sum(1 for _ in (folder / "masks").iterdir())
    print(f"{folder}: {n} scans with implanted lesions, the others linked unchanged "
          f"({time.perf_counter() - start:.1f} s); what was drawn: {folder / 'implant.json'}")
    return 0


def add_parser(data_commands) -> None:
    from medgen.cli.main import _config_args

    split = data_commands.add_parser("split", help="split a site folder's subjects into several site folders")
    split.add_argument("source", type=Path, metavar="DIR", help="a site folder (any layout)")
    split.add_argument("--out", type=Path, required=True, help="folder for the new site folders")
    split.add_argument("--sites", required=True, help="comma-separated site names, e.g. A,B,C,D")
    split.add_argument("--brain-masks", type=Path, metavar="DIR",
                       help="brain masks for scans without one, paired by name (<id>_T1 takes <id>_*)")
    split.add_argument("--seed", type=int, default=0)
    _config_args(split)
    split.set_defaults(func=cmd_split)

    implant = data_commands.add_parser(
        "implant", help="a copy of a healthy site folder with synthetic lesions in some subjects")
    implant.add_argument("source", type=Path, metavar="DIR", help="a site folder of healthy scans")
    implant.add_argument("--out", type=Path, required=True, help="the new site folder")
    implant.add_argument("--fraction", type=float, default=0.5, help="share of subjects given lesions")
    implant.add_argument("--kind", choices=("hypo", "hyper", "mixed"), default="mixed")
    implant.add_argument("--seed", type=int, default=0)
    _config_args(implant)
    implant.set_defaults(func=cmd_implant)
