"""What a site does with a model: load its slices, train locally, evaluate. No Flower here, so the
same functions serve the ClientApp, `medgen train` and the benchmarks."""

from __future__ import annotations

import gc
import math
import time
import zlib
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from medgen.client.allocator import keep_large_allocations
from medgen.config import Config, ConfigError, DataConfig
from medgen.data.dataset import SiteSlices, load_site
from medgen.models import GenerativeModel
from medgen.privacy.dp import DPPlan, noise_only_step, poisson_batches, private
from medgen.progress import track


@lru_cache(maxsize=8)
def _load_split(folder: str, data_cfg_json: str, site: str, val_fraction: float, seed: int):
    slices = load_site(folder, DataConfig.model_validate_json(data_cfg_json), site)
    return slices.split_subjects(val_fraction, seed)


def site_data(cfg: Config, site: str, folder: str | Path, heldout: bool = False) -> tuple[SiteSlices, SiteSlices]:
    """(train, validation) slices of a site. A held-out site never trains: everything is for
    evaluation, returned as (empty, all). Cached per process (a simulated site's actor, or a
    SuperNode's ClientApp process, keeps its data between rounds)."""
    fraction = 0.0 if heldout else cfg.train.val_fraction
    train, val = _load_split(str(folder), cfg.data.model_dump_json(), site, fraction, cfg.seed)
    return (train.subset(np.zeros(len(train), bool)), train) if heldout else (train, val)


def site_seed(cfg: Config, site: str, round_: int) -> int:
    """A seed for (run seed, site, round): the same in every process, so a resumed run draws the
    same batches as an uninterrupted one. Known to the server: DP-SGD uses
    ``privacy.dp.secret_seed`` instead."""
    return zlib.crc32(f"{cfg.seed}/{site}/{round_}".encode())


def check_device(cfg: Config) -> None:
    """ConfigError naming train.device when this machine does not have it (checked before a run
    starts, not in the middle of its first round)."""
    kind, _, index = cfg.train.device.partition(":")
    if kind == "cuda" and torch.cuda.device_count() <= int(index or 0):
        raise ConfigError(f"train.device={cfg.train.device}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={cfg.train.device}: MPS is not available on this machine")
    if kind == "cuda" and cfg.train.amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.amp=bf16: {torch.cuda.get_device_name(int(index or 0))} has no bfloat16; use "
                          f"train.amp=fp16 or none")


def local_steps(cfg: Config, n_examples: int) -> int:
    if cfg.train.local_steps is not None:
        return cfg.train.local_steps
    return max(1, math.ceil(cfg.train.local_epochs * n_examples / cfg.train.batch_size))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches from successive shuffled passes over n examples."""
    order = torch.randperm(n, generator=generator)
    at = 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = torch.randperm(n, generator=generator), 0
        yield order[at: at + batch_size]
        at += batch_size


def proximal_term(model: GenerativeModel, global_state: dict[str, torch.Tensor], mu: float):
    """FedProx: mu/2 * ||w - w_global||^2 over the trained parameters."""
    anchors = [(p, global_state[f"{name}.{k}"].to(p.device))
               for name, net in model.networks.items() for k, p in net.named_parameters()]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in anchors)

    return term


def train_local(model: GenerativeModel, data: SiteSlices, cfg: Config, seed: int,
                steps: int | None = None, extra_loss=None, dp: DPPlan | None = None) -> dict[str, float]:
    """Train ``model`` in place on ``data`` for ``steps`` optimiser steps (default: from
    ``cfg.train``; ``dp.steps`` under DP-SGD, with Poisson-sampled batches). Returns the mean of
    each loss term, ``num-examples``, ``steps`` and ``train-time-s``."""
    keep_large_allocations()  # a new site process trains as fast as a long-lived one (allocator.py)
    start = time.perf_counter()
    device = torch.device(cfg.train.device)
    held = gpu_memory(device)  # what this process still held on the GPU before this round's model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).train()
    optimizers = model.make_optimizers()
    steps = dp.steps if dp else steps or local_steps(cfg, len(data))
    images = torch.from_numpy(data.images).unsqueeze(1)
    labels = torch.from_numpy(data.labels)
    masks = torch.from_numpy(data.lesion).unsqueeze(1)  # (N, 1, S, S) bool: a mask-conditioned model's condition
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the model's own noise (reparameterisation, diffusion time steps)
    if dp:
        batches = poisson_batches(data, dp, generator)
        if extra_loss is not None:  # DP optimisers use per-sample gradients only: the term would be lost
            raise ValueError("fedprox's proximal term is not supported with privacy.enabled")
    else:
        batches = _batches(len(data), min(cfg.train.batch_size, len(data)), steps, generator)
    totals: dict[str, float] = {}
    taken = 0
    with private(model, optimizers, dp, seed) if dp else nullcontext(optimizers) as optimizers:
        for step, idx in enumerate(track(batches, "local training", total=steps, unit="steps")):
            if len(idx) == 0:  # an empty Poisson batch: the private networks release noise alone
                for name in model.private_networks:
                    noise_only_step(optimizers[name])
                continue
            with model.precision.autocast():
                losses = model.train_step(images[idx].to(device), labels[idx].to(device), optimizers, step, extra_loss,
                                          masks=masks[idx].to(device))
            model.precision.update()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v
            taken += 1
    metrics = {k: v / max(taken, 1) for k, v in totals.items()}
    metrics.update({"num-examples": len(data), "steps": steps, "train-time-s": time.perf_counter() - start})
    if device.type == "cuda":
        metrics.update({f"gpu-{k}-start-mb": v for k, v in held.items()})
        metrics["gpu-peak-mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return metrics


def gpu_memory(device: torch.device) -> dict[str, float]:
    """{"allocated", "reserved"}: MiB of CUDA memory this process holds in tensors / in the caching
    allocator on ``device``; empty off CUDA."""
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.memory_allocated(device) / 2**20,
            "reserved": torch.cuda.memory_reserved(device) / 2**20}


def release_device(cfg: Config) -> None:
    """After a site's message: hand the CUDA memory the caching allocator keeps back to the driver,
    so sites sharing a GPU do not each hold their peak between rounds (flower #1376, #5855)."""
    if torch.device(cfg.train.device).type == "cuda":
        gc.collect()  # the round's model, optimisers and batches, when a reference cycle holds them
        torch.cuda.empty_cache()


@torch.no_grad()
def evaluate_local(model: GenerativeModel, data: SiteSlices, cfg: Config) -> dict[str, float]:
    """Example-weighted mean of the model's evaluation terms over all of ``data``."""
    device = torch.device(cfg.train.device)
    model.to(device).eval()
    totals: dict[str, float] = {}
    for at in range(0, len(data), 256):
        images = torch.from_numpy(data.images[at: at + 256]).unsqueeze(1).to(device)
        labels = torch.from_numpy(data.labels[at: at + 256]).to(device)
        masks = torch.from_numpy(data.lesion[at: at + 256]).unsqueeze(1).to(device)
        for k, v in model.evaluate(images, labels, masks).items():
            totals[k] = totals.get(k, 0.0) + v * len(images)
    metrics = {k: v / len(data) for k, v in totals.items()}
    metrics["num-examples"] = len(data)
    return metrics
