"""Per-sample clipping of one Linear layer two ways: Opacus' (materialise the B per-sample gradients
g_i a_iᵀ by einsum, their norms, the clip-weighted einsum over them) and medgen's factored one
(``FactoredGradSample``: norms ||a_i|| ||g_i||, clipped sum (c * g)ᵀ a by one matmul), batch 32, for the
Linear shapes of medgen's networks at the default config. Each timed as the median of ``--repeats``
after a warm-up, the two interleaved; sets the same malloc thresholds as DP training.

Usage: python benchmarks/dp_linear.py [--repeats 50] [--threads 1] [--out benchmarks/results/dp_linear.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from medgen._compat.opacus import FactoredGradSample, opacus_grad_sampler
from medgen.client.allocator import keep_large_allocations

SHAPES = {"gan D head 2048->1": (2048, 1), "ddpm time mlp 32->128": (32, 128), "ddpm 128->128": (128, 128),
          "ddpm block emb 128->256": (128, 256), "vae from_z 80->2048": (80, 2048), "vae to_stats 2048->128": (2048, 128)}


def opacus_way(layer, a, g, clip):
    gs = opacus_grad_sampler(nn.Linear)(layer, [a], g)[layer.weight]
    norms = gs.reshape(len(gs), -1).norm(2, dim=-1)
    return norms, torch.einsum("i,i...", clip, gs)


def factored_way(a, g, clip):
    f = FactoredGradSample(len(a))
    f.passes.append((a, g))
    return f.norms(), f.clipped_sum(clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_linear.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_large_allocations()
    results = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": args.batch_size,
               "repeats": args.repeats}
    g0 = torch.Generator().manual_seed(0)
    for name, (d, p) in SHAPES.items():
        layer = nn.Linear(d, p)
        a = torch.randn(args.batch_size, d, generator=g0)
        g = torch.randn(args.batch_size, p, generator=g0)
        clip = torch.rand(args.batch_size, generator=g0)
        n1, s1 = opacus_way(layer, a, g, clip)
        n2, s2 = factored_way(a, g, clip)
        agree = bool(torch.allclose(n1, n2, rtol=1e-5) and torch.allclose(s1, s2, rtol=1e-4, atol=1e-5))
        times = {"opacus": [], "factored": []}
        for _ in range(args.repeats + 1):
            for kind, fn in (("opacus", lambda: opacus_way(layer, a, g, clip)), ("factored", lambda: factored_way(a, g, clip))):
                start = time.perf_counter()
                fn()
                times[kind].append(1000 * (time.perf_counter() - start))
        med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}  # the first round is the warm-up
        results[name] = {"weight": d * p, "opacus_ms": round(med["opacus"], 4), "factored_ms": round(med["factored"], 4),
                         "agree": agree}
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
