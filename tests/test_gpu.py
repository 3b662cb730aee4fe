"""The CUDA path: every family trains under bf16, state moves CUDA -> CPU intact, DP-SGD's
per-sample gradients on CUDA match the CPU's, and a site's GPU memory goes back after training.
Marked ``gpu``; skipped without a CUDA device (``benchmarks/gpu_check.sh`` runs them on one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.client.task import release_device, train_local
from medgen.models import build_model
from medgen._compat.opacus import FactoredGradSample
from medgen.privacy.grad_samplers import FastGradSampleModule
from test_amp import site_slices
from test_models import FAMILIES, make_cfg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() "
                                                                       "is False): run on a GPU machine")]

CUDA = ["train.device=cuda", "train.batch_size=8"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_on_cuda_under_amp(family, amp):
    cfg = make_cfg(family, *CUDA, "train.local_steps=5", f"train.amp={amp}")
    model = build_model(cfg, seed=0)
    metrics = train_local(model, site_slices(32), cfg, seed=1)
    assert np.isfinite(metrics["loss"]), metrics
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    assert metrics["gpu-peak-mb"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_state_round_trips_from_cuda_to_cpu(family):
    cfg = make_cfg(family, *CUDA, "train.local_steps=2", "train.amp=bf16")
    model = build_model(cfg, seed=0).to("cuda")
    optimizers = model.make_optimizers()
    images, labels = torch.rand(8, 1, 32, 32, device="cuda"), torch.tensor([0, 1] * 4, device="cuda")
    for step in range(2):
        with model.precision.autocast():
            model.train_step(images, labels, optimizers, step)
    state = model.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    on_cpu = build_model(make_cfg(family), seed=1)
    on_cpu.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in on_cpu.state_dict().items())
    for name, opt in on_cpu.make_optimizers().items():  # Adam moments of a CUDA run resume on the CPU
        opt.load_state_dict(optimizers[name].state_dict())  # (load_state_dict moves them to the parameters)
        for p, q in zip(opt.param_groups[0]["params"], optimizers[name].param_groups[0]["params"]):
            for key, value in optimizers[name].state.get(q, {}).items():
                assert opt.state[p][key].device.type == "cpu" or key == "step"
                assert torch.equal(opt.state[p][key].cpu(), value.cpu()), (name, key)


@pytest.fixture
def cpu_random(monkeypatch):
    """torch.randn / randn_like draw on the CPU generator and move the numbers: a step on CUDA then
    sees the same latents and noise as one on the CPU."""
    randn = torch.randn

    def on_cpu(*shape, device=None, **kw):
        return randn(*shape, **kw).to(device or "cpu")

    monkeypatch.setattr(torch, "randn", on_cpu)
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: randn(x.shape, dtype=x.dtype).to(x.device))


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_gradients_on_cuda_match_the_cpu(family, cpu_random):
    cfg = make_cfg(family, "train.batch_size=6")
    images, labels = torch.rand(6, 1, 32, 32), torch.tensor([0, 1] * 3)
    grads = []
    for device in ("cpu", "cuda"):
        model = build_model(cfg, seed=0).to(device)
        name = model.private_networks[0]
        net = FastGradSampleModule(model.networks[name], loss_reduction="mean")
        model.networks[name] = net
        torch.manual_seed(1)  # model noise drawn on the CPU generator where the family does
        opts = {k: torch.optim.SGD(v.parameters(), lr=0.0) for k, v in model.networks.items()}
        model.train_step(images.to(device), labels.to(device), opts, 0)
        grads.append([(g.materialise() if isinstance(g, FactoredGradSample) else g).detach().cpu()
                      for g in (p.grad_sample for p in net.parameters()) if g is not None])
        net.to_standard_module()
    assert len(grads[0]) == len(grads[1]) > 0
    for cpu, cuda in zip(*grads):
        # cuDNN convolutions run in TF32 by default (10-bit mantissa): relative error ~1e-3
        assert (cuda - cpu).norm() <= 2e-2 * cpu.norm() + 1e-6


def test_gpu_memory_returns_to_baseline_after_a_site_trains():
    cfg = make_cfg("ddpm", *CUDA, "train.local_steps=3", "train.amp=bf16")

    def one_round():  # what a simulated site's actor does per message
        model = build_model(cfg, seed=0)
        metrics = train_local(model, site_slices(16), cfg, seed=1)
        model.state_dict()
        del model
        release_device(cfg)
        return metrics

    one_round()  # cuBLAS / cuDNN handles and workspaces stay for the process: the baseline has them
    baseline = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(2):
        metrics = one_round()
        assert metrics["gpu-peak-mb"] * 2**20 > baseline[0] + 2**20  # the round did hold memory
        assert torch.cuda.memory_allocated() <= baseline[0] + 2**20
        assert torch.cuda.memory_reserved() <= baseline[1] + 2 * 2**20
