"""How far the diffusion model gets in a CPU budget: pixel space with plain eps-MSE, pixel space
with EDM preconditioning, latent space (the default).

The variants (``model.space`` / ``model.preconditioning``, everything else at the default config)
train the same number of steps on the pooled training sites of the phantom cohort, with a fresh
Adam every ``--round-steps`` as a federated site has. Measured for each, in the same run: the
image-space error of the EMA network's one-step prediction of x_0 on held-out slices at several
noise levels (decoded in latent space; against the mean training image, which a useless model
would match), RadFD-20 of DDIM samples against real slices, step time, and a grid of samples
(``--out``/ddpm-<space>-<preconditioning>.png).

Usage: python benchmarks/ddpm_training.py [--steps 500] [--round-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medgen.client.task import site_data, train_local
from medgen.config import load_config
from medgen.data.dataset import concat_slices
from medgen.evaluation.distances import radfd, radiomics_features
from medgen.models import build_model
from medgen.simulation import resolve_data

LEVELS = (50, 200, 400, 600, 800, 950)
VARIANTS = (("pixel", "none"), ("pixel", "edm"), ("latent", "edm"))


@torch.no_grad()
def x0_errors(model, images: np.ndarray, labels: np.ndarray, mean_image: torch.Tensor) -> dict[str, float]:
    """MSE, in image intensities scaled to [-1, 1], of the one-step x_0 prediction (decoded) at each
    step t of LEVELS (T = 1000), and of the mean training image."""
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    model.eval()
    x0, _ = model._to_x0(model._ema.net, x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = {"mean-image": float(((mean_image - (2 * x - 1)) ** 2).mean())}
    for t in LEVELS:
        a = float(model.abar[t])
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        x0_hat, _ = model._x0(x_t, t, model._eps(x_t, t, y, 1.0))
        out[f"t={t}"] = float(((2 * model._to_images(x0_hat) - 1 - (2 * x - 1)) ** 2).mean())
    return out


def run(space: str, preconditioning: str, steps: int, round_steps: int, out_dir: Path) -> dict:
    cfg = resolve_data(load_config(None, ["model.family=ddpm", f"model.space={space}",
                                          f"model.preconditioning={preconditioning}"]))
    parts = [site_data(cfg, s, cfg.data.root / s) for s in cfg.sites.train]
    train = concat_slices([p[0] for p in parts], "pool")
    val = concat_slices([p[1] for p in parts], "pool-val")
    model = build_model(cfg)
    start = time.perf_counter()
    for r in range(steps // round_steps):
        train_local(model, train, cfg, seed=r, steps=round_steps)
    step_ms = 1000 * (time.perf_counter() - start) / steps
    mean_image = 2 * torch.from_numpy(train.images).mean(0) - 1
    pick = np.random.default_rng(0).choice(len(val), min(128, len(val)), replace=False)
    errors = x0_errors(model, val.images[pick], val.labels[pick], mean_image)
    labels = torch.tensor([0] * 32 + [1] * 32)
    fakes = model.sample(labels, torch.Generator().manual_seed(0))[:, 0].numpy()
    reals = train.images[np.random.default_rng(1).choice(len(train), 256, replace=False)]
    grid = np.concatenate([np.concatenate(list(fakes[i * 8:(i + 1) * 8]), 1) for i in range(8)], 0)
    Image.fromarray((grid * 255).astype(np.uint8)).save(out_dir / f"ddpm-{space}-{preconditioning}.png")
    return {"train_step_ms": round(step_ms, 1), "x0_mse": {k: round(v, 4) for k, v in errors.items()},
            "radfd": round(radfd(radiomics_features(reals), radiomics_features(fakes)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="500: a site's steps in the default 5 x 100 run")
    parser.add_argument("--round-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "ddpm_training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "round_steps": args.round_steps}
    for space, preconditioning in VARIANTS:
        name = f"{space}-{preconditioning}"
        results[name] = run(space, preconditioning, args.steps, args.round_steps, args.out)
        print(name, json.dumps(results[name]), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
