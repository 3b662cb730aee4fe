"""`medgen utility`: train a small slice classifier on real, synthetic and both, test on real
(medgen/evaluation/utility.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_utility(args: argparse.Namespace) -> int:
    from medgen.evaluation.utility import Settings, run_utility

    settings = Settings(steps=args.steps, repeats=args.repeats, test_fraction=args.test_fraction)
    out = run_utility(args.checkpoint, args.data, out=args.out, site=args.site, settings=settings,
                      overrides=args.overrides)
    print(f"utility: {out / 'utility.json'}")
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def add_parser(commands) -> None:
    from medgen.cli.main import add_verbosity
    from medgen.cli.reconstruct import _at_least
    from medgen.evaluation.utility import Settings

    d = Settings()
    p = commands.add_parser(
        "utility", help="is the generator's output worth training on? a slice classifier trained on real, "
                        "synthetic and both, tested on real slices of other subjects",
        description="Train a small healthy / lesion slice classifier on (a) the real slices of a site's training\n"
                    "subjects, (b) as many generated slices per class, (c) both; test each on real slices of other\n"
                    "subjects; write utility.json (AUROC, AUPRC per arm over seeds, the augmentation gain, chance\n"
                    "and a no-model brain-area score).")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/round-NNNN.pt file")
    p.add_argument("--data", type=Path, required=True, help="a site folder of NIfTI scans with lesion masks")
    p.add_argument("--site", help="name of the folder's site (default: the folder's name)")
    p.add_argument("--out", type=Path, help="output folder (default runs/utility-<site>-<checkpoint>)")
    p.add_argument("--steps", type=_at_least(1), default=d.steps, help=f"classifier steps per arm (default {d.steps})")
    p.add_argument("--repeats", type=_at_least(1), default=d.repeats,
                   help=f"seeds per arm; mean and std over them (default {d.repeats})")
    p.add_argument("--test-fraction", type=_fraction, default=d.test_fraction,
                   help=f"a folder that is not a training site of the run: share of its subjects tested on "
                        f"(default {d.test_fraction})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change data.*, train.device or a sampling key (the rest is the checkpoint's own config)")
    add_verbosity(p)
    p.set_defaults(func=cmd_utility)
