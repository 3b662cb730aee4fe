"""Mixed precision (``train.amp``): config validation, ``none`` is bitwise the float32 training it
replaced, and bf16 on the CPU (autocast) trains every family. The CUDA side is tests/test_gpu.py."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from medgen.client.task import train_local
from medgen.config import ConfigError, load_config
from medgen.data.dataset import SiteSlices
from medgen.models import build_model
from medgen.models.precision import Precision
from test_models import FAMILIES, make_cfg


def site_slices(n: int = 16, size: int = 32, subjects: int = 4, seed: int = 0) -> SiteSlices:
    """n random slices (size x size) of ``subjects`` subjects, half of them labelled lesion."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32)
    zeros = np.zeros((n, size, size), bool)
    return SiteSlices("A", images, ~zeros, zeros, np.arange(n) % 2, np.array([f"s{i % subjects}" for i in range(n)]),
                      np.arange(n))


class _Float32:
    """The calls a train_step made before train.amp existed: loss.backward(), optimizer.step()."""

    def autocast(self):
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass


def test_amp_defaults_to_none_and_validates():
    assert load_config(None).train.amp == "none"
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"  # CPU autocast
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config(None, ["train.amp=fp32"])
    with pytest.raises(ConfigError, match=r"train\.amp=fp16 is not supported on train\.device=cpu"):
        load_config(None, ["train.amp=fp16"])
    assert load_config(None, ["train.amp=fp16", "train.device=cuda"]).train.amp == "fp16"


def test_amp_is_refused_with_dp_sgd():
    with pytest.raises(ConfigError, match=r"train\.amp=bf16 with privacy\.enabled"):
        load_config(None, ["train.amp=bf16", "privacy.enabled=true"])
    assert load_config(None, ["privacy.enabled=true"]).train.amp == "none"


@pytest.mark.parametrize("family", FAMILIES)
def test_amp_none_is_bitwise_the_float32_training(family):
    cfg = make_cfg(family, "train.local_steps=3", "train.batch_size=4")
    data, states = site_slices(), []
    for precision in (None, _Float32()):
        model = build_model(cfg, seed=0)
        if precision is not None:
            model.precision = precision
        train_local(model, data, cfg, seed=1)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_on_cpu_trains_every_family(family):
    cfg = make_cfg(family, "train.local_steps=2", "train.batch_size=4", "train.amp=bf16")
    model = build_model(cfg, seed=0)
    assert model.precision.dtype is torch.bfloat16
    before = model.state_dict()
    metrics = train_local(model, site_slices(), cfg, seed=1)
    assert np.isfinite(metrics["loss"])
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay float32
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_precision_autocasts_only_with_amp():
    layer = torch.nn.Linear(4, 4)
    with Precision("none").autocast():
        assert layer(torch.ones(1, 4)).dtype is torch.float32
    with Precision("bf16", "cpu").autocast():
        assert layer(torch.ones(1, 4)).dtype is torch.bfloat16
    assert Precision("bf16").scaler is None and Precision("none").scaler is None
