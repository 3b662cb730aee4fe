"""The faster per-sample gradients give Opacus' numbers: per layer against brute force, and one DP-SGD
step of every family against Opacus' own GradSampleModule."""

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from medgen.config import load_config
from medgen.models import build_model
from medgen.privacy.dp import DPPlan, private
from medgen.privacy.grad_samplers import MIN_POSITIONS, conv2d_grad_sample


@pytest.mark.parametrize("stride,dilation,bias,size", [(1, 1, True, 20), (1, 2, False, 20), (2, 1, True, 20),
                                                       (1, 1, True, 8)])
def test_conv2d_per_sample_gradients_equal_brute_force(stride, dilation, bias, size):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    x = torch.randn(4, 3, size, size)
    out = layer(x)
    backprops = torch.randn_like(out)
    got = conv2d_grad_sample(layer, [x], backprops)
    for i in range(len(x)):  # one sample at a time through autograd
        layer.zero_grad()
        (layer(x[i: i + 1]) * backprops[i: i + 1]).sum().backward()
        torch.testing.assert_close(got[layer.weight][i], layer.weight.grad, rtol=1e-4, atol=1e-5)
        if bias:
            torch.testing.assert_close(got[layer.bias][i], layer.bias.grad, rtol=1e-4, atol=1e-5)
    assert (out.shape[-1] ** 2 >= MIN_POSITIONS) == (size == 20 and stride == 1)  # both paths are covered


@pytest.mark.parametrize("family, space", [("vae", "pixel"), ("cevae", "pixel"), ("gan", "pixel"), ("ddpm", "pixel"),
                                           ("ddpm", "latent"), ("vqvae", "pixel"), ("flow", "pixel")])
def test_dp_step_equals_opacus_grad_sample_module(family, space):
    cfg = load_config(None, [f"model.family={family}", "data.image_size=32", "model.width=8", "model.latent_dim=16",
                             "model.timesteps=50", "model.anomaly_t=20", f"model.space={space}"])
    torch.manual_seed(0)
    images, labels = torch.rand(6, 1, 32, 32), torch.tensor([0, 1] * 3)
    dp = DPPlan(noise_multiplier=0.7, sample_rate=0.1, steps=1, delta=1e-5, max_grad_norm=0.5, unit="slice", units=60)
    init, states = build_model(cfg).state_dict(), []
    for wrapper in (GradSampleModule, None):
        model = build_model(cfg)
        model.load_state_dict(init)
        torch.manual_seed(1)  # the same model noise (latents, time steps) in both runs
        with private(model, model.make_optimizers(), dp, seed=3, **({"wrapper": wrapper} if wrapper else {})) as opt:
            for step in range(2):
                model.train_step(images, labels, opt, step)
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(states[0][k], init[k]) for k in init)  # it trained
