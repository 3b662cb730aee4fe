"""Where a family's DP-SGD step spends its time: the plain step and the DP step as medgen runs it, one copy
each, ``--steps`` steps interleaved (median), the DP optimiser's phases (``clip_and_accumulate``,
``add_noise``, ``scale_grad``, the wrapped optimiser's ``step``; mean per step), then ``torch.profiler``'s
operator table over ``--profile-steps`` more steps of each.

Usage: python benchmarks/dp_profile.py [--family vae] [--steps 15] [--profile-steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from medgen.config import load_config
from medgen.models import build_model
from medgen.privacy.dp import DPPlan, private

from families import overrides  # benchmarks/families.py
from models import batch  # benchmarks/models.py: the same synthetic batch


def _timed(obj, name: str, totals: dict) -> None:
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    setattr(obj, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="vae")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(args.family))
    images, labels, _ = batch(args.batch_size, cfg.data.image_size)
    dp = DPPlan(1.0, args.batch_size / 1000, 1, 1e-5, 1.0, "slice", 1000)
    plain, dp_model = build_model(cfg), build_model(cfg)
    plain_opt = plain.make_optimizers()
    with private(dp_model, dp_model.make_optimizers(), dp, seed=0) as dp_opt:
        for _ in range(3):  # warm-up
            plain.train_step(images, labels, plain_opt, 100)
            dp_model.train_step(images, labels, dp_opt, 100)
        totals: dict[str, float] = {}
        for name in dp_model.private_networks:
            for phase in ("clip_and_accumulate", "add_noise", "scale_grad"):
                _timed(dp_opt[name], phase, totals)
            _timed(dp_opt[name].original_optimizer, "step", totals)
        times = {"plain": [], "dp": []}
        for _ in range(args.steps):
            for kind, model, opt in (("plain", plain, plain_opt), ("dp", dp_model, dp_opt)):
                start = time.perf_counter()
                model.train_step(images, labels, opt, 100)
                times[kind].append(1000 * (time.perf_counter() - start))
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{args.family}: plain {median['plain']:.1f} ms, DP {median['dp']:.1f} ms, "
              f"DP / plain {median['dp'] / median['plain']:.2f} (medians of {args.steps})")
        for phase, total in totals.items():
            print(f"  {phase}: {1000 * total / args.steps:.1f} ms per step (mean)")
        for kind, model, opt in (("DP", dp_model, dp_opt), ("plain", plain, plain_opt)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    model.train_step(images, labels, opt, 100)
            print(f"{kind} step, {args.profile_steps} steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
