"""The VQ-VAE family beyond the per-family contracts of test_models.py: the quantiser, codebook usage,
the prior's causality and sampling, dead-code restarts, restored anomaly maps and federated averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from medgen.models import HEALTHY, LESION, build_model
from medgen.models.code_prior import CodePrior
from medgen.models.vqvae import Quantiser, usage
from test_models import SIZE, batch, make_cfg, seeded

CODEBOOK = "vqvae.quantiser.codebook.weight"


def test_quantiser_picks_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    quantiser = Quantiser(12, 5)
    z = torch.randn(3, 5, 4, 4, requires_grad=True)
    q, codes, codebook, commit = quantiser(z)
    unit, book = F.normalize(z, dim=1).detach(), F.normalize(quantiser.codebook.weight, dim=1).detach()
    distances = ((unit.permute(0, 2, 3, 1)[..., None, :] - book) ** 2).sum(-1)  # (3, 4, 4, 12)
    assert torch.equal(codes, distances.argmin(-1))
    torch.testing.assert_close(q, book[codes].permute(0, 3, 1, 2))  # forward: the codes' vectors
    torch.testing.assert_close(codebook, distances.min(-1).values.flatten(1).sum(1))
    torch.testing.assert_close(commit, codebook)
    # backward: the decoder's gradient reaches the encoder as if there were no quantiser ...
    upstream = torch.randn_like(q)
    (grad_z,) = torch.autograd.grad((q * upstream).sum(), z, retain_graph=True)
    (expected,) = torch.autograd.grad((F.normalize(z, dim=1) * upstream).sum(), z)
    torch.testing.assert_close(grad_z, expected)
    # ... and the codebook learns from the codebook loss alone, only the rows in use
    (q * upstream).sum().backward(retain_graph=True)
    assert quantiser.codebook.weight.grad is None or not quantiser.codebook.weight.grad.any()
    codebook.sum().backward()
    moved = quantiser.codebook.weight.grad.abs().sum(1) > 0
    assert torch.equal(moved, torch.bincount(codes.flatten(), minlength=12) > 0)


def test_usage_counts_codes():
    assert usage(torch.arange(8).repeat(5), 16) == {"perplexity": pytest.approx(8.0), "codes_used": 8.0}
    assert usage(torch.zeros(3, 4, 4, dtype=torch.long), 16) == {"perplexity": pytest.approx(1.0), "codes_used": 1.0}
    skewed = usage(torch.tensor([0] * 9 + [1]), 4)["perplexity"]
    assert 1.0 < skewed < 2.0


def test_training_logs_codebook_usage():
    model = build_model(make_cfg("vqvae"), seed=0)
    images, labels, _ = batch()
    logs = model.train_step(images, labels, model.make_optimizers(), step=0)
    ev = model.evaluate(images, labels)
    for out in (logs, ev):
        assert 1.0 <= out["perplexity"] <= out["codes_used"] <= model.cfg.model.codebook_size
        assert out["loss"] == pytest.approx(out["recon"] + 1.25 * out["vq"] + out["prior"], rel=1e-5)


def test_prior_is_causal_in_raster_order():
    torch.manual_seed(0)
    prior = CodePrior(10, 8, layers=3)
    codes, labels = torch.randint(10, (2, 9, 7)), torch.tensor([HEALTHY, LESION])
    logits = prior(codes, labels)
    assert logits.shape == (2, 10, 9, 7)
    order = torch.arange(9 * 7).view(9, 7)
    for i, j in [(0, 0), (2, 3), (8, 6), (3, 0)]:
        changed = codes.clone()
        changed[:, i, j] = (changed[:, i, j] + 1) % 10
        moved = (prior(changed, labels) - logits).abs().amax((0, 1)) > 0  # (9, 7)
        assert not moved[order <= i * 7 + j].any()  # nothing at or before the changed position
        if (i, j) != (8, 6):
            assert moved[order > i * 7 + j].any()
    first = prior(torch.zeros_like(codes), labels)[:, :, 0, 0]
    torch.testing.assert_close(first, prior(torch.randint(10, codes.shape), labels)[:, :, 0, 0])  # the label only
    assert not torch.allclose(first[0], first[1])
    torch.testing.assert_close(prior(codes[:, :3], labels), logits[:, :, :3])  # sampling crops the rows below
    top = 8 - prior.context_rows  # ... and those above its context
    torch.testing.assert_close(prior(codes[:, top:], labels)[:, :, -1], logits[:, :, -1])
    assert not torch.allclose(prior(codes[:, top + 1:], labels)[:, :, -1], logits[:, :, -1])


def test_prior_samples_code_grids():
    torch.manual_seed(0)
    prior = CodePrior(10, 8, layers=2)
    labels = torch.tensor([HEALTHY, LESION, HEALTHY])
    codes = prior.sample(labels, (4, 5), seeded(0))
    assert codes.shape == (3, 4, 5) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 10
    assert torch.equal(codes, prior.sample(labels, (4, 5), seeded(0)))
    assert not torch.equal(codes, prior.sample(labels, (4, 5), seeded(1)))


def test_prior_learns_the_code_distribution():
    """Trained on one fixed code grid per class, the prior's samples are those grids."""
    torch.manual_seed(0)
    prior = CodePrior(6, 16, layers=3)
    grids = torch.randint(6, (2, 4, 4))
    labels = torch.tensor([HEALTHY, LESION])
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        prior.nll(grids, labels).mean().backward()
        opt.step()
    assert float(prior.nll(grids, labels).mean().detach()) < 0.5
    assert torch.equal(prior.sample(labels.repeat(3), (4, 4), seeded(0)), grids.repeat(3, 1, 1))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus hooks on the input layer
def test_dead_codes_restart_without_dp_only():
    images, labels, _ = batch()
    plain = build_model(make_cfg("vqvae", "model.restart_every=1"), seed=0)
    before = plain.state_dict()[CODEBOOK]
    net = plain.networks["vqvae"]
    with torch.no_grad():
        used = torch.bincount(net.quantiser.nearest(net.encode(images, labels)).flatten(), minlength=len(before)) > 0
    assert 0 < used.sum() < len(before)
    plain.train_step(images, labels, plain.make_optimizers(), step=0)
    after = plain.state_dict()[CODEBOOK]
    dead = ~used
    assert (after[dead] - before[dead]).abs().amax(1).min() > 1e-3  # every dead code was re-initialised ...
    cosine = F.normalize(after[dead], dim=1) @ F.normalize(after[used], dim=1).T
    assert cosine.amax(1).min() > 0.9  # ... next to a code in use
    wrapped = build_model(make_cfg("vqvae", "model.restart_every=1"), seed=0)
    inner = wrapped.networks["vqvae"]
    wrapped.networks["vqvae"] = GradSampleModule(inner)  # as under DP-SGD
    wrapped.train_step(images, labels, wrapped.make_optimizers(), step=0)
    wrapped.networks["vqvae"] = inner
    torch.testing.assert_close(wrapped.state_dict()[CODEBOOK][dead], before[dead], rtol=0, atol=0)


def test_restored_map_replaces_codes_the_prior_finds_unlikely():
    images, labels, brain = batch(4)
    model = build_model(make_cfg("vqvae", "model.restore_threshold=1e-9"), seed=0)
    assert model.anomaly_sweep() == [{"score": "recon"}, {"score": "restored"}]
    recon = model.anomaly_map(images, brain, score="recon")
    assert torch.equal(recon, model.anomaly_map(images, brain))
    assert torch.equal(model.anomaly_map(images, brain, score="restored"), recon)  # nothing that unlikely
    eager = build_model(make_cfg("vqvae", "model.restore_threshold=0.999"), seed=0)
    net, healthy = eager.networks["vqvae"], torch.full((4,), HEALTHY)
    with torch.no_grad():
        codes = net.quantiser.nearest(net.encode(images, healthy))
        restored = eager.restore(codes, healthy)
        best = net.prior(codes, healthy).argmax(1)
    assert torch.equal(restored, best)  # every code below 0.999: the prior's choice everywhere
    assert not torch.equal(eager.anomaly_map(images, brain, score="restored"), recon)
    with pytest.raises(TypeError):
        model.anomaly_map(images, score="kl")


def _round(cfg, state, site_batches, steps):
    sites = []
    for images, labels in site_batches:
        site = build_model(cfg, seed=123)  # a different init, overwritten by the global weights
        site.load_state_dict(state)
        optimizers = site.make_optimizers()
        for step in range(steps):
            site.train_step(images, labels, optimizers, step)
        sites.append(site.state_dict())
    return sites


def _mean(states):
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def test_averaged_sites_keep_codebook_usage():
    """Two sites start each round from the same global weights, train on their own data, and their
    weights are averaged (plain mean, FedAvg with equal counts). Code k means the same at both sites,
    so over three rounds the averaged model uses about as many codes, reconstructs about as well and
    gives most probe positions the same code as each site did (measured: 80-97 %). Misaligned
    codebooks (site B's codes relabelled, as independent initialisations would give) average into a
    model that agrees with neither (13-33 %): the test can fail."""
    cfg = make_cfg("vqvae")
    a, b = batch(16, seed=0), batch(16, seed=1)
    site_batches = [(a[0], a[1]), (b[0].flip(-1), b[1])]
    probe, probe_labels, _ = batch(16, seed=2)

    def scored(state):
        model = build_model(cfg, seed=0)
        model.load_state_dict(state)
        net = model.networks["vqvae"].eval()
        with torch.no_grad():
            codes = net.quantiser.nearest(net.encode(probe, probe_labels))
        return model.evaluate(probe, probe_labels), codes

    state = build_model(cfg, seed=0).state_dict()
    for _ in range(3):
        sites = _round(cfg, state, site_batches, steps=25)
        before, state = [scored(s) for s in sites], _mean(sites)
        after, codes = scored(state)
        assert after["perplexity"] >= 0.8 * min(s["perplexity"] for s, _ in before)
        assert after["codes_used"] >= 0.8 * min(s["codes_used"] for s, _ in before)
        assert after["recon"] <= 1.25 * max(s["recon"] for s, _ in before)
        assert min(float((codes == site_codes).float().mean()) for _, site_codes in before) > 0.7
    shuffled = dict(sites[1])
    shuffled[CODEBOOK] = shuffled[CODEBOOK][torch.randperm(cfg.model.codebook_size, generator=seeded(0))]
    _, mixed = scored(_mean([sites[0], shuffled]))
    assert max(float((mixed == site_codes).float().mean()) for _, site_codes in before) < 0.5


def test_label_conditions_prior_and_decoder():
    model = build_model(make_cfg("vqvae"), seed=0)
    net, grid = model.networks["vqvae"], (SIZE // 4,) * 2
    healthy, lesion = torch.full((4,), HEALTHY), torch.full((4,), LESION)
    codes = net.prior.sample(healthy, grid, seeded(0))
    assert not torch.equal(codes, net.prior.sample(lesion, grid, seeded(0)))
    with torch.no_grad():
        assert (net.decode_codes(codes, healthy) - net.decode_codes(codes, lesion)).abs().max() > 1e-4
