"""`medgen reconstruct`: super-resolution / inpainting of held-out slices with a trained generator as
the prior (medgen/reconstruction/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from medgen.reconstruction.command import reconstruct
    from medgen.reconstruction.solve import Settings

    settings = Settings(steps=args.steps, lr=args.lr, lambda_feat=args.lambda_feat, lambda_prior=args.lambda_prior,
                        starts=args.starts)
    out = reconstruct(args.checkpoint, args.task, args.data, out=args.out, site=args.site, n_slices=args.slices,
                      settings=settings, overrides=args.overrides)
    print(f"reconstruction: {out / 'metrics.json'}")
    return 0


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_parser(commands) -> None:
    from medgen.cli.main import add_verbosity
    from medgen.models.base import GENERATOR_PRIOR_FAMILIES
    from medgen.reconstruction.solve import Settings

    d = Settings()
    rec = commands.add_parser(
        "reconstruct", help="super-resolution / inpainting of held-out slices with a trained generator as the prior",
        description="MAP reconstruction with a trained generator (BRGM): w* = argmin |y - f(G(w))|^2 + lambda_feat "
                    "|phi(y) - phi(f(G(w)))|^2 + lambda_prior (-log p(w)), scored (PSNR, SSIM, RMSE) against the "
                    f"trivial baselines. Families with a generator prior: {', '.join(GENERATOR_PRIOR_FAMILIES)}.")
    rec.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/round-NNNN.pt file")
    rec.add_argument("--task", required=True, metavar="TASK",
                     help="superres:K (K x K area downsampling), inpaint:box[:F] (centred square hole of side F*S, "
                          "default 0.5), inpaint:random[:P] (each pixel missing with probability P, default 0.5), "
                          "inpaint:MASK.nii.gz (non-zero = missing, on the slice grid)")
    rec.add_argument("--data", type=Path, required=True, help="a site folder of NIfTI scans")
    rec.add_argument("--site", help="name of the folder's site (default: the folder's name)")
    rec.add_argument("--out", type=Path, help="output folder (default runs/reconstruct-<site>-<task>-<checkpoint>)")
    rec.add_argument("--slices", type=_at_least(1), default=32, help="held-out slices to reconstruct (default 32)")
    rec.add_argument("--steps", type=_at_least(0), default=d.steps, help=f"Adam steps (default {d.steps})")
    rec.add_argument("--lr", type=_non_negative, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    rec.add_argument("--lambda-feat", type=_non_negative, default=d.lambda_feat,
                     help=f"weight of the random-feature term (default {d.lambda_feat}; 0: pixels only)")
    rec.add_argument("--lambda-prior", type=_non_negative, default=d.lambda_prior,
                     help=f"weight of the latent prior (default {d.lambda_prior})")
    rec.add_argument("--starts", type=_at_least(1), default=d.starts,
                     help=f"candidate starting latents, the best is optimised (default {d.starts})")
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change data.* or train.device (the rest is the checkpoint's own config)")
    add_verbosity(rec)
    rec.set_defaults(func=cmd_reconstruct)
