"""Secure aggregation's cost: the SecAgg+ protocol alone (``medgen/privacy/secagg.py``) against
the clear exchange it replaces, at the default model's size, for 3 and 20 sites, in one run.

Each site's update is a random delta of the default VAE's floating parameters. Measured, all in
this process (every site's work is done one after the other, as CPU seconds):

  - clear: what a site sends (its float32 weights) and the server's example-weighted mean;
  - secaggplus: per site, its four steps (keys, shares, quantise + mask, open shares) and the
    bytes it sends; at the server, unmasking and decoding the sum (with no and with 1 dropped
    site, whose pairwise masks the server then has to regenerate for every survivor);
  - the baseline a site pays each round anyway: local training of the default model for the
    default ``train.local_steps`` (100 steps, batch 32, 64 px), timed over 20 steps and scaled.

With ``--central``: instead, the cost of distributed central DP at a site (``privacy.central`` with
secaggplus: clip the delta to C, add z C / sqrt(t) Gaussian noise from an os.urandom-seeded
generator, ``medgen/privacy/central.py`` ``site_release``) against the same site's four SecAgg+
steps at 3 sites and its local training, in one run (written to results/secagg_central.json).

Usage: python benchmarks/secagg.py [--central] [--out benchmarks/results/secagg.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medgen.config import load_config
from medgen.models import build_model
from medgen.privacy import secagg as sa


def _payload(record: dict | list | bytes) -> int:
    if isinstance(record, bytes):
        return len(record)
    values = record.values() if isinstance(record, dict) else record
    return sum(_payload(v) if isinstance(v, (dict, list)) else len(v) for v in values)


def protocol(n: int, dim: int, drop: int = 0, seed: int = 0) -> dict:
    """One round of SecAgg+ among n sites on vectors of ``dim`` floats; ``drop`` sites never send
    their masked vector. Times in seconds, bytes per site (uploads) and at the server."""
    rng = np.random.default_rng(seed)
    names = [f"S{i:02d}" for i in range(n)]
    t = n // 2 + 1
    q = sa.Quantiser(1.0, 24)
    site_time = dict.fromkeys(names, 0.0)
    up = dict.fromkeys(names, 0)

    def timed(site, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        site_time[site] += time.perf_counter() - start
        return out

    keys = {s: timed(s, sa.SiteKeys.new) for s in names}
    public = {s: timed(s, keys[s].public) for s in names}
    for s in names:
        up[s] += _payload(public[s])
    sent = {s: timed(s, sa.share_keys, s, keys[s], 1, public, t) for s in names}
    for s in names:
        up[s] += _payload({h: c for h, c in sent[s].items() if h != s})
    held = {h: {o: sent[o][h] for o in names} for h in names}
    deltas = {s: rng.normal(0, 0.01, dim) for s in names}
    masked = {}
    for s in names:
        x, _ = timed(s, q.encode, deltas[s], 100)
        masked[s] = timed(s, sa.mask, s, keys[s], 1, x, public)
        up[s] += masked[s].nbytes
    survivors, dropped = names[drop:], names[:drop]
    opened = {}
    for s in survivors:
        opened[s] = timed(s, sa.open_shares, s, keys[s], 1, public, held[s], survivors, dropped, t)
        up[s] += _payload(opened[s])
    start = time.perf_counter()
    total = sa.unmask(1, public, {s: masked[s] for s in survivors}, opened, t)
    mean, _ = q.decode(total)
    server = time.perf_counter() - start
    exact = np.mean([deltas[s] for s in survivors], axis=0)
    first = survivors[0]  # what the server sends one site besides the weights: the key list, its ciphertexts, the lists
    down = _payload(public) + _payload([held[first][o] for o in names if o != first]) + 4 * n
    return {"sites": n, "dropped": drop, "threshold": t, "site-s-max": max(site_time[s] for s in survivors),
            "site-s-mean": float(np.mean([site_time[s] for s in survivors])), "server-s": server,
            "site-upload-bytes": int(np.mean([up[s] for s in survivors])), "site-extra-download-bytes": down,
            "max-error": float(np.abs(mean - exact).max()), "bound": q.bound}


def clear(n: int, dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.1, dim).astype(np.float32) for _ in range(n)]
    start = time.perf_counter()
    total = sum(w.astype(np.float64) * 100 for w in weights) / (100 * n)
    server = time.perf_counter() - start
    assert total.size == dim
    return {"sites": n, "server-s": server, "site-upload-bytes": 4 * dim}


def training_baseline(steps: int = 20) -> float:
    """Seconds for the default ``train.local_steps`` of the default model, from ``steps`` steps."""
    cfg = load_config(None, [])
    model = build_model(cfg)
    optimizers = model.make_optimizers()
    images = torch.rand(cfg.train.batch_size, 1, cfg.data.image_size, cfg.data.image_size)
    labels = torch.zeros(cfg.train.batch_size, dtype=torch.long)
    model.train()
    model.train_step(images, labels, optimizers, 0, None)  # warm-up
    start = time.perf_counter()
    for step in range(steps):
        model.train_step(images, labels, optimizers, step, None)
    return (time.perf_counter() - start) / steps * cfg.train.local_steps


def central(dim: int, train_s: float, repeats: int = 5) -> dict:
    """A site's distributed central DP step (clip + noise) on a delta of ``dim`` floats, against its
    four SecAgg+ steps at 3 sites and its local training (``train_s``)."""
    from medgen.privacy.central import site_release

    cfg = load_config(None, ["federation.secure_aggregation=secaggplus", "sites.train=[A,B,C]", "sites.heldout=[]",
                             "privacy.central.enabled=true", "privacy.central.noise_multiplier=1.0",
                             "federation.secagg_clip=8.1"])
    delta = np.random.default_rng(0).normal(0, 0.01, dim)
    site_release(cfg, delta, 2)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        site_release(cfg, delta, 2)
    release_s = (time.perf_counter() - start) / repeats
    secure = protocol(3, dim)
    return {"sites": 3, "threshold": 2, "central-dp-site-s": release_s, "secagg-site-s-max": secure["site-s-max"],
            "central-vs-secagg-steps": release_s / secure["site-s-max"], "central-vs-training": release_s / train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--central", action="store_true", help="distributed central DP's cost at a site")
    args = parser.parse_args()
    torch.set_num_threads(2)
    state = build_model(load_config(None, [])).state_dict()
    dim = sum(v.numel() for v in state.values() if v.is_floating_point())
    train_s = training_baseline()
    if args.central:
        protocol(3, 1000)  # warm-up
        row = central(dim, train_s)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                  f"torch threads", "parameters": dim, "training-100-steps-s": train_s, "row": row}
        out = args.out or Path("benchmarks/results/secagg_central.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return
    args.out = args.out or Path("benchmarks/results/secagg.json")
    protocol(3, 1000)  # warm-up: imports, first AES and Shamir calls
    rows = []
    for n in (3, 20):
        base = clear(n, dim)
        for drop in (0, 1):
            secure = protocol(n, dim, drop)
            rows.append({**secure, "clear-server-s": base["server-s"], "clear-site-upload-bytes": base["site-upload-bytes"],
                         "site-overhead-vs-training": secure["site-s-max"] / train_s,
                         "upload-ratio": secure["site-upload-bytes"] / base["site-upload-bytes"]})
            print(json.dumps(rows[-1]))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch "
              f"threads", "parameters": dim, "training-100-steps-s": train_s, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"training baseline: {train_s:.2f} s per round; written {args.out}")


if __name__ == "__main__":
    main()
