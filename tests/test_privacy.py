"""DP-SGD at the sites: the ledger's accounting, budgets, and that private training still learns."""

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from medgen.client.task import evaluate_local, site_data, train_local
from medgen.models import build_model
from medgen.config import load_config
from medgen.privacy.dp import DPPlan, noise_only_step, plan, poisson_batches, private
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger
from medgen.server.rundir import RunDir
from test_federation import LocalGrid, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)

from medgen.server.federation import run_federation


def rdp_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def test_ledger_composes_across_rounds_and_restarts(tmp_path):
    ledger = PrivacyLedger(tmp_path, "A")
    for round_ in (1, 2):
        ledger.record(1.1, 0.25, 40, round=round_)
    restarted = PrivacyLedger(tmp_path, "A")  # a new process reads the same state directory
    restarted.record(1.1, 0.25, 40, round=3)
    # three rounds of 40 steps compose like one accountant run over 120 steps
    assert restarted.epsilon(1e-3) == pytest.approx(rdp_epsilon([(1.1, 0.25, 120)], 1e-3), rel=1e-9)
    assert PrivacyLedger(tmp_path, "A").epsilon(1e-3) == restarted.epsilon(1e-3)
    with pytest.raises(ValueError, match="ledger of site 'A'"):
        PrivacyLedger(tmp_path, "B")


def test_epsilon_grows_with_steps_and_shrinks_with_noise(tmp_path):
    ledger = PrivacyLedger(tmp_path, "A")
    eps = [ledger.epsilon(1e-4, [(1.0, 0.1, steps)]) for steps in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    noisy = [ledger.epsilon(1e-4, [(noise, 0.1, 100)]) for noise in (0.8, 1.5, 3.0)]
    assert noisy[0] > noisy[1] > noisy[2]


def test_budget_refusal(tmp_path):
    ledger = PrivacyLedger(tmp_path, "A")
    ledger.record(1.0, 0.5, 50)
    spent = ledger.epsilon(1e-3)
    with pytest.raises(BudgetExceeded, match=r"privacy.max_epsilon=") as e:
        ledger.check_budget((1.0, 0.5, 50), 1e-3, max_epsilon=spent * 1.01)
    assert "site A" in str(e.value)
    assert ledger.check_budget((1.0, 0.5, 50), 1e-3, max_epsilon=None) > spent


def test_plan_and_poisson_sampling_per_subject(tiny_cohort):
    cfg = tiny_cfg(tiny_cohort, "privacy.enabled=true", "train.batch_size=2")
    data, _ = site_data(cfg, "A", tiny_cohort.root / "A")
    dp = plan(cfg, data, steps=200)
    n_subjects = len(set(data.subjects.tolist()))
    assert dp.unit == "subject" and dp.units == n_subjects and dp.sample_rate == pytest.approx(2 / n_subjects)
    assert dp.delta == pytest.approx(1 / (10 * n_subjects))
    # the solved noise reaches the target over all planned rounds
    total = rdp_epsilon([(dp.noise_multiplier, dp.sample_rate, dp.steps * cfg.federation.rounds)], dp.delta)
    assert total == pytest.approx(cfg.privacy.target_epsilon, rel=0.02)
    sizes, per_subject = [], []
    for idx in poisson_batches(data, dp, torch.Generator().manual_seed(0)):
        subjects = data.subjects[idx.numpy()]
        per_subject.append(len(subjects) == len(set(subjects.tolist())))  # at most one slice per subject
        sizes.append(len(idx))
    assert all(per_subject) and len(sizes) == 200
    assert np.mean(sizes) == pytest.approx(2, rel=0.25)  # E[batch] = q * n_subjects


def test_dp_training_learns_and_keeps_clean_keys(tiny_cohort):
    cfg = tiny_cfg(tiny_cohort, "privacy.enabled=true", "privacy.noise_multiplier=0.3", "privacy.unit=slice",
                   "train.batch_size=16", "train.lr=0.003")
    data, val = site_data(cfg, "A", tiny_cohort.root / "A")
    model = build_model(cfg)
    keys = sorted(model.state_dict())
    before = evaluate_local(model, data, cfg)["loss"]
    metrics = train_local(model, data, cfg, seed=0, dp=plan(cfg, data, steps=60))
    assert sorted(model.state_dict()) == keys  # no "_module." prefix leaks into what is aggregated
    assert metrics["steps"] == 60
    assert evaluate_local(model, data, cfg)["loss"] < 0.8 * before
    # the network is unwrapped and hook-free again: plain training still works
    train_local(model, data, cfg, seed=1, steps=2)


def test_federation_accounts_epsilon_and_stops_exhausted_site(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=3", "privacy.enabled=true", "privacy.target_epsilon=4",
                   "federation.min_sites=1", "federation.samples_per_class=0")
    first = plan(cfg, site_data(cfg, "A", tiny_cohort.root / "A")[0], cfg.train.local_steps)
    one_round = rdp_epsilon([(first.noise_multiplier, first.sample_rate, first.steps)], first.delta)
    two_rounds = rdp_epsilon([(first.noise_multiplier, first.sample_rate, 2 * first.steps)], first.delta)
    budget = (one_round + two_rounds) / 2  # site A can afford exactly one round
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=3", "privacy.enabled=true", "privacy.target_epsilon=4",
                   "federation.min_sites=1", "federation.samples_per_class=0", f"privacy.max_epsilon={{A: {budget}}}")
    run = RunDir(tmp_path / "run")
    lines = []
    run_federation(LocalGrid(3), cfg, run, log=lines.append)
    records = [r for r in run.records() if r["phase"] == "train" and r["site"] in "AB"]
    a = [r for r in records if r["site"] == "A"]
    assert "refused" not in a[0] and a[0]["epsilon"] == pytest.approx(one_round, rel=1e-6)
    assert "refused" in a[1] and "privacy.max_epsilon" in a[1]["refused"] and len(a) == 2  # not asked again
    b = [r for r in records if r["site"] == "B"]
    assert len(b) == 3 and b[0]["epsilon"] < b[1]["epsilon"] < b[2]["epsilon"]
    # every logged epsilon equals an independent accountant run over the logged parameters
    for i, r in enumerate(b, start=1):
        expected = rdp_epsilon([(r["noise-multiplier"], r["sample-rate"], r["dp-steps"] * i)], r["delta"])
        assert r["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert b[2]["epsilon"] == pytest.approx(cfg.privacy.target_epsilon, rel=0.02)
    assert run.status()["status"] == "completed"
    assert any("site A refused to train" in line for line in lines)
    assert (run.path / "sites" / "A" / "privacy-ledger.json").is_file()


@pytest.mark.parametrize("family, space", [("gan", "pixel"), ("gan+mask", "pixel"), ("ddpm", "pixel"),
                                           ("ddpm", "latent"), ("vqvae", "pixel")])
def test_dp_wraps_only_the_private_networks(tiny_cohort, family, space):
    family, plus, _ = family.partition("+")
    mask = ["model.mask_conditioning=true"] if plus else []  # the SPADE GAN: synthetic fake masks under DP
    cfg = tiny_cfg(tiny_cohort, f"model.family={family}", f"model.space={space}", *mask, "privacy.enabled=true",
                   "privacy.noise_multiplier=1.0",
                   "privacy.unit=slice", "train.batch_size=8", "model.timesteps=100", "model.anomaly_t=20")
    data, _ = site_data(cfg, "A", tiny_cohort.root / "A")
    model = build_model(cfg)
    assert not plus or model.synthetic_fakes  # under DP the generator is fed data-independent masks
    keys = sorted(model.state_dict())
    seen = {}
    real_step = model.train_step

    def spy(images, labels, optimizers, step, extra_loss=None, masks=None):
        out = real_step(images, labels, optimizers, step, extra_loss, masks=masks)
        for name, net in model.networks.items():  # inside the DP block, after a full step
            seen[name] = (isinstance(net, GradSampleModule),
                          any(getattr(p, "grad_sample", None) is not None for p in net.parameters()))
        return out

    model.train_step = spy
    train_local(model, data, cfg, seed=0, dp=plan(cfg, data, steps=3))
    assert sorted(model.state_dict()) == keys
    for name, (wrapped, has_grad_sample) in seen.items():
        private = name in model.private_networks
        assert wrapped == private, name
        if not private:
            assert not has_grad_sample, f"{name} must not carry per-sample gradients"


def test_each_private_network_draws_its_own_noise():
    """A family with two private networks (here: the VAE and an identical copy of it, both private)
    gets two independent noise streams from one round seed: one noise-only DP step moves the two
    copies differently; the same seed draws the same noise again (a resumed round), another seed
    other noise."""
    dp = DPPlan(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5, max_grad_norm=1.0, unit="slice",
                units=100)

    def noise_step(seed):
        model = build_model(load_config(None, ["model.family=vae"]))
        model.networks["twin"] = copy.deepcopy(model.networks["vae"])
        model.private_networks = ("vae", "twin")
        start = {n: [p.detach().clone() for p in model.networks[n].parameters()] for n in ("vae", "twin")}
        optimizers = {n: torch.optim.SGD(model.networks[n].parameters(), lr=1.0) for n in ("vae", "twin")}
        with private(model, optimizers, dp, seed) as opt:
            for name in model.private_networks:
                noise_only_step(opt[name])
        return {n: torch.cat([(p.detach() - s).flatten() for p, s in zip(model.networks[n].parameters(), start[n])])
                for n in ("vae", "twin")}

    a = noise_step(seed=12345)
    assert a["vae"].abs().sum() > 0 and a["twin"].abs().sum() > 0  # noise was added to both
    assert not torch.allclose(a["vae"], a["twin"])  # not the same stream twice
    assert abs(torch.corrcoef(torch.stack([a["vae"], a["twin"]]))[0, 1]) < 0.05
    again, other = noise_step(seed=12345), noise_step(seed=54321)
    assert torch.equal(again["vae"], a["vae"]) and torch.equal(again["twin"], a["twin"])
    assert not torch.allclose(other["vae"], a["vae"])


def test_the_apps_import_opacus_only_when_dp_is_used():
    """Importing Opacus takes seconds (it imports torch.distributed.tensor and sympy) in every site
    process and in Flower's simulation process; a study without DP-SGD never needs it."""
    import subprocess
    import sys

    def opacus_modules(imports: str) -> str:
        code = f"import sys, {imports}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert opacus_modules("medgen.client.app, medgen.server.app, medgen.cli.main").strip() == "[]"
    assert "opacus.accountants" in opacus_modules("medgen.client.app, opacus")  # the check sees it when imported
