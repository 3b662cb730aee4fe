"""Central (server-side, site-level) DP: clipping, noise, adaptive clipping, accounting, a run."""

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from medgen.config import ConfigError, load_config
from medgen.evaluation.report import build_report
from medgen.privacy import central
from medgen.privacy.central import CentralDP
from medgen.server.rundir import RunDir, load_checkpoint
from medgen.server.strategy import FedAvg, Update
from test_federation import federate, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)


def dp_cfg(*extra, sites="[A,B,C]"):
    return load_config(None, ["privacy.central.enabled=true", f"sites.train={sites}", "sites.heldout=[]", *extra])


def global_state(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"net.w": torch.randn(n, generator=g), "net.b": torch.randn(3, 4, generator=g),
            "net.steps": torch.tensor(7)}


def moved(state, norm, seed):
    """``state`` moved by a random delta of L2 norm ``norm`` over its floating tensors."""
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(v.shape, generator=g) for k, v in state.items() if v.is_floating_point()}
    scale = norm / float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())))
    return {k: v + scale * deltas[k] if k in deltas else v + 1 for k, v in state.items()}


def test_clipping_bounds_each_sites_delta():
    dp = CentralDP(FedAvg(), dp_cfg("privacy.central.clipping_norm=1.0", "privacy.central.noise_multiplier=1.0"))
    current = global_state()
    updates = [Update(s, moved(current, norm, i), 10 * (i + 1)) for i, (s, norm) in enumerate(zip("ABC", (0.5, 2, 10)))]
    deltas, norms, clipped = dp.clip(current, updates)
    assert norms == pytest.approx([0.5, 2, 10], rel=1e-5) and clipped == 2
    after = [float(np.sqrt(sum((a ** 2).sum() for a in d))) for d in deltas]
    assert after == pytest.approx([0.5, 1.0, 1.0], rel=1e-6)
    # an unclipped delta is unchanged; a clipped one keeps its direction
    np.testing.assert_allclose(deltas[0][0], (updates[0].state["net.w"].double() - current["net.w"].double()).numpy())
    direction = (updates[2].state["net.w"].double() - current["net.w"].double()).numpy() / 10
    np.testing.assert_allclose(deltas[2][0], direction, rtol=1e-6, atol=1e-12)


def test_noise_std_is_z_c_over_m_and_weights_are_equal():
    z, c = 1.3, 0.5
    dp = CentralDP(FedAvg(), dp_cfg(f"privacy.central.noise_multiplier={z}", f"privacy.central.clipping_norm={c}"))
    current = global_state(n=300_000)
    # identical updates, very different example counts: with equal weights the mean is that update
    updates = [Update(s, moved(current, 0.2, seed=5), n) for s, n in zip("ABC", (1, 10, 1000))]
    new = dp.aggregate(current, updates)
    noise = (new["net.w"].double() - updates[0].state["net.w"].double()).numpy()
    assert noise.std() == pytest.approx(z * c / 3, rel=0.01) and abs(noise.mean()) < 0.01 * z * c / 3
    assert new["net.steps"] == current["net.steps"]  # counters are not noised, they come from the global model
    metrics = dp.round_metrics()
    assert metrics["central-noise-std"] == pytest.approx(z * c / 3)
    assert metrics["central-clipped-fraction"] == 0.0 and metrics["central-mean-norm"] == pytest.approx(0.2, rel=1e-5)


def test_epsilon_is_opacus_rdp_grows_with_rounds_falls_with_noise():
    def eps_after(rounds, z):
        dp = CentralDP(FedAvg(), dp_cfg(f"privacy.central.noise_multiplier={z}"))
        current = global_state(n=10)
        for _ in range(rounds):
            current = dp.aggregate(current, [Update(s, moved(current, 1.0, i), 1) for i, s in enumerate("ABC")])
        return dp.round_metrics()["central-epsilon"], dp

    eps, dp = eps_after(4, 2.0)
    independent = RDPAccountant()
    independent.history = [(2.0, 1.0, 4)]  # q = 3 sites asked / 3 training sites, one step per round
    assert eps == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert eps_after(2, 2.0)[0] < eps < eps_after(8, 2.0)[0]
    assert eps_after(4, 4.0)[0] < eps < eps_after(4, 1.0)[0]
    restored = CentralDP(FedAvg(), dp_cfg("privacy.central.noise_multiplier=2.0"))
    restored.load_state(dp.state())  # a resumed run carries on composing
    assert restored.epsilon() == pytest.approx(eps)
    # noise solved from the target: all planned rounds together spend target_epsilon
    solved = central.noise_multiplier(dp_cfg("privacy.central.target_epsilon=4", "federation.rounds=10"))
    assert central.epsilon([(solved, 1.0, 10)], 1e-5) == pytest.approx(4, rel=0.01)


def test_adaptive_clipping_tracks_the_median_update_norm():
    dp = CentralDP(FedAvg(), dp_cfg("privacy.central.adaptive=true", "privacy.central.noise_multiplier=0.01",
                                    "privacy.central.clipped_count_stddev=0.01", "privacy.central.clipping_norm=0.1",
                                    "privacy.central.clip_norm_lr=0.5"))
    assert dp.update_noise_multiplier > dp.noise_multiplier  # part of the budget pays for the clipped count
    current = global_state(n=50)
    norms = []
    for r in range(40):
        dp.aggregate(current, [Update(s, moved(current, n, r * 3 + i), 1) for i, (s, n) in enumerate(zip("ABC", (1, 2, 3)))])
        norms.append(dp.round_metrics()["central-clipping-norm"])
    assert norms[0] == 0.1 and 1.0 < norms[-1] < 3.0  # up from 0.1 to between the norms, around the median 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="privacy.central.clipped_count_stddev"):
        dp_cfg("privacy.central.adaptive=true", "privacy.central.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="privacy.central.enabled: federation.strategy=fedbn"):
        dp_cfg("federation.strategy=fedbn")
    with pytest.raises(ConfigError, match="privacy.central.clipping_norm"):
        dp_cfg("privacy.central.clipping_norm=0")


def test_federation_with_central_dp(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=2", "privacy.central.enabled=true",
                   "privacy.central.noise_multiplier=0.5", "privacy.central.clipping_norm=0.01")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    federate(cfg, run.path)
    rounds = [r for r in run.records() if r["phase"] == "train" and r["site"] == "global"]
    eps = [r["central-epsilon"] for r in rounds]
    assert [r["round"] for r in rounds] == [1, 2] and 0 < eps[0] < eps[1]
    assert eps[1] == pytest.approx(central.epsilon([(0.5, 1.0, 2)], 1e-5))
    assert all(r["central-clipped-fraction"] == 1.0 for r in rounds)  # 3 local steps move weights by more than 0.01
    assert load_checkpoint(run.last_checkpoint())["aggregator"]["central"]["history"] == [(0.5, 1.0, 2)]
    build_report(run.path)
    privacy = json.loads((run.path / "report" / "metrics.json").read_text())["privacy"]
    assert privacy["global"] == {"round": 2, "central-epsilon": eps[1], "central-delta": 1e-5}
    assert f"Central DP at the server: site-level (ε = {eps[1]:.3g}" in (run.path / "report" / "index.html").read_text()


def test_sampled_sites_fixed_denominator_noise_and_amplified_accounting():
    """federation.fraction_train = q < 1 with central DP: the mean is over q N (DP-FedAvg's fixed
    denominator), so the noise std is z C / (q N) with 1 site or none drawn; the accountant runs at
    sample rate q, and a target epsilon needs less noise than with every site every round."""
    z, c, q = 1.1, 0.5, 0.5
    dp = CentralDP(FedAvg(), dp_cfg(f"privacy.central.noise_multiplier={z}", f"privacy.central.clipping_norm={c}",
                                    f"federation.fraction_train={q}", sites="[A,B,C,D]"))
    current = global_state(n=300_000)
    one = moved(current, 0.2, seed=5)
    new = dp.aggregate(current, [Update("A", one, 10)])
    delta = (new["net.w"].double() - current["net.w"].double()).numpy()
    signal = (one["net.w"].double() - current["net.w"].double()).numpy() / (q * 4)  # the one update over q N = 2
    assert (delta - signal).std() == pytest.approx(z * c / (q * 4), rel=0.01)
    assert dp.round_metrics()["central-mean-norm"] == pytest.approx(0.2 / (q * 4), rel=1e-5)
    none = dp.aggregate(current, [])  # no site drawn: noise alone, same std
    assert (none["net.w"].double() - current["net.w"].double()).numpy().std() == pytest.approx(z * c / 2, rel=0.01)
    assert np.isnan(dp.round_metrics()["central-clipped-fraction"])
    assert dp.state()["central"]["history"] == [(z, q, 2)]
    assert dp.epsilon() == pytest.approx(central.epsilon([(z, q, 2)], 1e-5))
    assert dp.epsilon() < central.epsilon([(z, 1.0, 2)], 1e-5)
    every = central.noise_multiplier(dp_cfg("privacy.central.target_epsilon=4", "federation.rounds=10"))
    sampled = central.noise_multiplier(dp_cfg("privacy.central.target_epsilon=4", "federation.rounds=10",
                                              "federation.fraction_train=0.5"))
    assert sampled < every and central.epsilon([(sampled, 0.5, 10)], 1e-5) == pytest.approx(4, rel=0.01)
    with pytest.raises(ConfigError, match="privacy.central.adaptive"):
        dp_cfg("privacy.central.adaptive=true", "federation.fraction_train=0.5")


def test_site_sampling_draws():
    """Without central DP: ceil(q n) sites, without replacement, by (seed, round); with it: each site
    with probability q, independently (what the accountant assumes)."""
    from medgen.server.sampling import sample_sites

    sites = list("ABCDEFGHIJ")
    plain = load_config(None, [f"sites.train=[{','.join(sites)}]", "sites.heldout=[]", "federation.fraction_train=0.25"])
    draws = [sample_sites(sites, plain, r) for r in range(1, 201)]
    assert all(len(d) == 3 and len(set(d)) == 3 and d == sorted(d) for d in draws)
    assert sample_sites(sites, plain, 7) == draws[6] and len({tuple(d) for d in draws}) > 50
    assert sample_sites(sites, plain.model_copy(update={"seed": 1}), 7) != draws[6] or \
        sample_sites(sites, plain.model_copy(update={"seed": 1}), 8) != draws[7]
    poisson = dp_cfg("federation.fraction_train=0.3", sites=f"[{','.join(sites)}]")
    counts = [len(sample_sites(sites, poisson, r)) for r in range(1, 2001)]
    assert np.mean(counts) == pytest.approx(3.0, abs=0.15) and min(counts) == 0 and max(counts) >= 6
    assert sample_sites(sites, dp_cfg(sites=f"[{','.join(sites)}]"), 3) == sites  # q = 1: everyone
    with pytest.raises(ConfigError, match="federation.fraction_train=0.5: federation.strategy=krum"):
        load_config(None, ["federation.fraction_train=0.5", "federation.strategy=krum"])
