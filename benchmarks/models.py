"""Cost of each model family at the default config, and of DP-SGD against the plain step.

For every family that builds: one training step (batch 32 at 64x64), the same step under DP-SGD
(per-sample gradients, clipping and noise on the family's private networks) as medgen runs it and
with Opacus' own GradSampleModule — one step of each in turn, ``--rounds`` times, the ratios taken
per round and their median — sampling time (for the DDPM: DDIM with ddim_steps vs
ancestral DDPM over all timesteps), and anomaly-map time per slice.

``--baseline PATH`` adds a fourth copy in the same rounds: DP-SGD with the ``FastGradSampleModule``
of another checkout's ``medgen/privacy/grad_samplers.py`` (e.g. the main branch's, to measure a
change side by side) and the optimiser it names (its ``DP_OPTIMIZER``; Opacus' ``DPOptimizer`` where it
names none); its ratio to plain and the per-round ratio of medgen's step to it are reported.

Usage: python benchmarks/models.py [--families vae,gan,ddpm,ddpm:pixel] [--repeats 10] [--rounds 30] [--threads 1]
                                   [--baseline /path/to/other/checkout] [--dp-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from contextlib import nullcontext
import time
from pathlib import Path

import torch

from medgen.config import load_config
from medgen.models import build_model
from opacus import GradSampleModule

from medgen.privacy.dp import DPPlan, private
from medgen.privacy.grad_samplers import FastGradSampleModule

from families import overrides as family_overrides  # benchmarks/families.py (the script's folder)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # the median: robust to a busy machine


def batch(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    brain = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float()
    images = (brain * 0.7 + 0.05 * torch.randn(n, 1, size, size, generator=g) * brain).clamp(0, 1)
    return images, torch.arange(n) % 2, brain.expand(n, 1, size, size).bool()


def baseline_wrapper(checkout: Path):
    """``FastGradSampleModule`` from ``checkout``'s ``medgen/privacy/grad_samplers.py``, loaded under another name."""
    spec = importlib.util.spec_from_file_location("baseline_grad_samplers",
                                                  checkout / "medgen" / "privacy" / "grad_samplers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FastGradSampleModule


def quartiles(xs: list[float]) -> list[float]:
    return [round(sorted(xs)[i * len(xs) // 4], 3) for i in (1, 3)]


def measure(family: str, repeats: int, batch_size: int, rounds: int = 30, baseline=None, dp_only: bool = False) -> dict:
    cfg = load_config(None, family_overrides(family))
    images, labels, brain = batch(batch_size, cfg.data.image_size)
    model = build_model(cfg)
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    optimizers = model.make_optimizers()
    dp = DPPlan(noise_multiplier=1.0, sample_rate=batch_size / 1000, steps=1, delta=1e-5, max_grad_norm=1.0,
                unit="slice", units=1000)
    # three copies: plain, DP with Opacus' own GradSampleModule, DP as medgen runs it (a fourth with --baseline).
    # One step of each in turn, `rounds` times: a busy machine slows the copies of a round alike; ratios per
    # round, then the median
    opacus_model, medgen_model = build_model(cfg), build_model(cfg)
    baseline_model = build_model(cfg) if baseline is not None else None
    times: dict[str, list[float]] = {"plain": [], "opacus": [], "medgen": []}
    with private(opacus_model, opacus_model.make_optimizers(), dp, seed=0, wrapper=GradSampleModule) as opacus_opt, \
            private(medgen_model, medgen_model.make_optimizers(), dp, seed=0, wrapper=FastGradSampleModule) as medgen_opt, \
            (private(baseline_model, baseline_model.make_optimizers(), dp, seed=0, wrapper=baseline)
             if baseline is not None else nullcontext()) as baseline_opt:
        steps = {"plain": lambda: model.train_step(images, labels, optimizers, 100),
                 "opacus": lambda: opacus_model.train_step(images, labels, opacus_opt, 100),
                 "medgen": lambda: medgen_model.train_step(images, labels, medgen_opt, 100)}
        if baseline is not None:
            times["baseline"] = []
            steps["baseline"] = lambda: baseline_model.train_step(images, labels, baseline_opt, 100)
        for kind, step in steps.items():
            step()  # warm-up
        for _ in range(rounds):
            for kind, step in steps.items():
                start = time.perf_counter()
                step()
                times[kind].append(1000 * (time.perf_counter() - start))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ratio = {k: [d / p for d, p in zip(times[k], times["plain"])] for k in ("opacus", "medgen")}
    out["train_step_ms"] = median(times["plain"])
    out["dp_train_step_ms"] = median(times["medgen"])
    out["dp_opacus_hooks_step_ms"] = median(times["opacus"])
    out["dp_over_plain"] = median(ratio["medgen"])
    out["dp_opacus_hooks_over_plain"] = median(ratio["opacus"])
    out["dp_over_plain_quartiles"] = quartiles(ratio["medgen"])
    if baseline is not None:
        base = [d / p for d, p in zip(times["baseline"], times["plain"])]
        ours = [d / b for d, b in zip(times["medgen"], times["baseline"])]
        out["dp_baseline_step_ms"] = median(times["baseline"])
        out["dp_baseline_over_plain"] = median(base)
        out["dp_baseline_over_plain_quartiles"] = quartiles(base)
        out["dp_over_baseline"] = median(ours)
        out["dp_over_baseline_quartiles"] = quartiles(ours)
    if dp_only:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    n = 16
    out["sample_16_s"] = _time(lambda: model.sample(labels[:n].repeat(2)[:n]), max(1, repeats // 5))
    if cfg.model.family == "ddpm":
        ancestral = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"sampler": "ddpm"})}))
        ancestral.load_state_dict(model.state_dict())
        out["sample_4_ddpm_all_steps_s"] = _time(lambda: ancestral.sample(labels[:4]), 1)
        out["sample_4_ddim_s"] = _time(lambda: model.sample(labels[:4]), 1)
        out["ddpm_over_ddim"] = out["sample_4_ddpm_all_steps_s"] / out["sample_4_ddim_s"]
    k = 8
    out["anomaly_ms_per_slice"] = 1000 * _time(lambda: model.anomaly_map(images[:k], brain[:k]), max(1, repeats // 5)) / k
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="vae,gan,ddpm,ddpm:pixel")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved plain / DP steps per family")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = what one simulated site gets)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose DP-SGD path runs beside medgen's")
    parser.add_argument("--dp-only", action="store_true", help="only the interleaved DP / plain steps (no sampling "
                                                                 "or anomaly-map timing)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "models.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    baseline = None
    if args.baseline is not None:
        baseline = baseline_wrapper(args.baseline)
        results["baseline"] = str(args.baseline)
    for family in args.families.split(","):
        try:
            results[family] = measure(family, args.repeats, args.batch_size, args.rounds, baseline, args.dp_only)
        except NotImplementedError as e:
            results[family] = {"skipped": str(e)}
        print(family, json.dumps(results[family]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
