"""The faster per-sample gradients give Opacus' numbers: per layer against brute force, and one DP-SGD
step of every family against Opacus' own GradSampleModule."""

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from medgen.config import load_config
from medgen.models import build_model
from medgen.privacy.dp import DPPlan, private
from medgen._compat.opacus import FactoredDPOptimizer, FactoredGradSample
from medgen.privacy.grad_samplers import MIN_FACTORED_WEIGHT, FastGradSampleModule, _path, conv2d_grad_sample


@pytest.mark.parametrize("cin,cout,stride,dilation,bias,size,path", [
    (3, 5, 1, 1, True, 20, "per-sample"), (3, 5, 1, 2, False, 20, "per-sample"), (3, 5, 2, 1, True, 20, "opacus"),
    (3, 5, 1, 1, True, 8, "opacus"), (8, 9, 1, 1, True, 20, "grouped"), (9, 8, 2, 2, False, 20, "grouped"),
    (8, 8, 2, 1, True, 8, "opacus")])
def test_conv2d_per_sample_gradients_equal_brute_force(cin, cout, stride, dilation, bias, size, path):
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    x = torch.randn(4, cin, size, size)
    out = layer(x)
    backprops = torch.randn_like(out)
    got = conv2d_grad_sample(layer, [x], backprops)
    for i in range(len(x)):  # one sample at a time through autograd
        layer.zero_grad()
        (layer(x[i: i + 1]) * backprops[i: i + 1]).sum().backward()
        torch.testing.assert_close(got[layer.weight][i], layer.weight.grad, rtol=1e-4, atol=1e-5)
        if bias:
            torch.testing.assert_close(got[layer.bias][i], layer.bias.grad, rtol=1e-4, atol=1e-5)
    assert _path(layer, out.shape[-1] * out.shape[-2]) == path  # every path is covered


def test_no_summed_conv_weight_gradient_while_the_hooks_run():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 2))
    x = torch.randn(4, 1, 6, 6, requires_grad=True)
    expected = torch.autograd.grad(net(x).square().sum(), x)[0]  # the plain input gradient
    wrapped = FastGradSampleModule(net, loss_reduction="sum")
    conv = net[2]
    x.grad = None
    wrapped(x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected)  # the input gradient is the convolution's own
    assert conv.weight.grad is None and conv.bias.grad is None and net[0].weight.grad is None  # only per-sample ones
    assert conv.weight.grad_sample.shape == (4, *conv.weight.shape) and net[4].weight.grad is not None
    wrapped.disable_hooks()  # hooks off: an ordinary convolution with its summed gradient
    wrapped(x).square().sum().backward()
    assert conv.weight.grad is not None
    wrapped.to_standard_module()
    assert "forward" not in vars(conv) and "forward" not in vars(net[0])  # the class's forward again


@pytest.mark.parametrize("passes", [[6], [6, 6], [6, 4]])
def test_factored_linear_clipping_equals_opacus(passes):
    """Book-keeping Linear clipping: the per-sample norms and the clipped sum from the factors (a, g) equal
    Opacus' from materialised per-sample gradients, for one pass, two passes of the same examples in one loss
    (a GAN discriminator's real and fake) and passes of different sizes; then the same noised update."""
    from opacus.optimizers import DPOptimizer

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(160, 128), nn.SiLU(), nn.Linear(128, 160, bias=False), nn.SiLU(),
                             nn.Linear(160, 3))  # two factored weights (>= MIN_FACTORED_WEIGHT), one not

    torch.manual_seed(1)
    xs = [torch.randn(n, 160) for n in passes]
    seen, results = {}, []
    for wrapper, optimizer in ((GradSampleModule, DPOptimizer), (FastGradSampleModule, FactoredDPOptimizer)):
        inner = net()
        model = wrapper(inner, loss_reduction="mean")
        opt = optimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.3, max_grad_norm=0.05,
                        expected_batch_size=6, loss_reduction="mean", generator=torch.Generator().manual_seed(5))
        sum(model(x).square().mean() for x in xs).backward()
        seen[optimizer] = {name: p.grad_sample for name, p in inner.named_parameters()}
        norms = [opt._get_flat_grad_sample(p) for p in opt.params]
        norms = [g.norms() if isinstance(g, FactoredGradSample) else g.reshape(len(g), -1).norm(2, dim=-1) for g in norms]
        opt.pre_step()
        results.append(({n: p.summed_grad.clone() for n, p in inner.named_parameters()}, norms,
                        {n: p.grad.clone() for n, p in inner.named_parameters()}))
    reference, factored = seen[DPOptimizer], seen[FactoredDPOptimizer]
    assert isinstance(factored["0.weight"], FactoredGradSample) and isinstance(factored["2.weight"], FactoredGradSample)
    assert inner[4].weight.numel() < MIN_FACTORED_WEIGHT and isinstance(factored["4.weight"], torch.Tensor)
    for name in ("0.weight", "2.weight"):  # the factored norms are the materialised per-sample gradients' norms
        torch.testing.assert_close(factored[name].norms(), reference[name].flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(factored[name].materialise(), reference[name], rtol=1e-5, atol=1e-7)
    (sums, norms, grads), (sums_f, norms_f, grads_f) = results
    for a, b in zip(norms, norms_f):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for name in sums:  # the clipped sum and the clipped noised, scaled gradient
        torch.testing.assert_close(sums_f[name], sums[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.stack(norms, 1).norm(dim=1).max() > 0.05  # clipping was active


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


def test_allocator_tuning_is_idempotent_and_can_be_switched_off(monkeypatch):
    from medgen.client import allocator
    first = allocator.keep_large_allocations()
    assert allocator.keep_large_allocations() is first  # set once per process
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("MEDGEN_MALLOC_TUNING", "0")
    assert allocator.keep_large_allocations() is False
    monkeypatch.setattr(allocator, "_done", first)
