"""`medgen synthesize`: lesion slices where masks say, from a mask-conditioned checkpoint (medgen/synthesize.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_synthesize(args: argparse.Namespace) -> int:
    from medgen.synthesize import run_synthesis, summary_line

    result = run_synthesis(args.checkpoint, args.out, masks_dir=args.masks, from_site=args.from_site, n=args.n,
                           seed=args.seed, overrides=args.overrides)
    print(summary_line(result))
    print(f"samples: {result.out / 'samples.png'}\ntest: {result.out / 'synthesis.json'}")
    return 0


def add_parser(commands) -> None:
    from medgen.cli.main import add_verbosity

    p = commands.add_parser(
        "synthesize", help="lesion slices where given masks say (a checkpoint with model.mask_conditioning=true)",
        description="Synthesise one lesion slice per mask with a mask-conditioned checkpoint; write NIfTI slices\n"
                    "with their masks, a PNG grid with the masks' outlines and synthesis.json (does the lesion\n"
                    "appear where the mask is: intensity inside vs a ring outside, against healthy samples).")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/round-NNNN.pt file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks", type=Path, metavar="DIR", help="a folder of NIfTI lesion masks")
    source.add_argument("--from-site", type=Path, metavar="SITE_DIR",
                        help="draw masks from a site folder's own lesion masks, deformed and placed inside its brains")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, help="masks to use (--masks: the first N mask slices, default all; "
                                         "--from-site: default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the drawn masks (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change data.*, train.device or a sampling key (e.g. model.ddim_steps=20)")
    add_verbosity(p)
    p.set_defaults(func=cmd_synthesize)
