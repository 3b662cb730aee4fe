"""A picture of mask-conditioned synthesis: the masks beside the samples (not a test).

Row 1: the masks themselves (white); rows 2-4: ``medgen synthesize``'s three arms for them (the
lesion class given the mask, the healthy reference from the same noise, the lesion label without
the mask), each with the mask's outline in red. The masks are drawn as ``medgen synthesize
--from-site`` draws them (the site's own lesions, deformed, placed inside its brains); the intensity
test of the same samples is printed with n.

    python benchmarks/synthesis_grid.py --checkpoint RUN/checkpoints/round-0005.pt \\
        --from-site runs/phantom/D --n 8 --out benchmarks/results/synthesize-phantom-gan-spade.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from medgen.data.lesion_masks import read_site_masks
    from medgen.evaluation.synthesis import ARMS, mask_test, save_outlined_grid, synthesize
    from medgen.synthesize import load_mask_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--from-site", type=Path, required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args()
    model, cfg = load_mask_model(args.checkpoint)
    masks = read_site_masks(args.from_site, cfg.data, args.n, args.seed).masks
    samples = synthesize(model, masks, args.seed)
    save_outlined_grid(args.out, [masks.astype(np.float32), *(samples[a] for a in ARMS)], masks)
    test = mask_test(samples, masks)
    print(json.dumps({"png": str(args.out), "rows": ["mask", *ARMS], "contrast": test["contrast"],
                      "change-ratio": test["change-ratio"], "n": test["n"]}, indent=1))


if __name__ == "__main__":
    main()
