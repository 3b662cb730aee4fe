"""Secure aggregation (issue #23): the SecAgg+ protocol on numpy vectors, then the server loop and
the real ClientApp over the in-process Grid of test_federation.py (3 training sites, 1 round)."""

import subprocess

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord

from medgen.client.policy import violations
from medgen.config import ConfigError, SitePolicy, dump_config, load_config
from medgen.privacy import secagg as sa
from medgen.server.errors import FederationError
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir, load_checkpoint
from test_federation import TINY, LocalGrid, tiny_cohort  # noqa: F401  (a fixture)

ROUND = 3
Q = sa.Quantiser(clip=1.0, bits=24)


class Study:
    """n sites run the four steps on random deltas; the server's view is what it is handed."""

    def __init__(self, n=5, t=3, dim=1000, seed=0):
        rng = np.random.default_rng(seed)
        self.names, self.t = [chr(ord("A") + i) for i in range(n)], t
        self.keys = {s: sa.SiteKeys.new() for s in self.names}
        self.public = {s: self.keys[s].public() for s in self.names}
        sent = {s: sa.share_keys(s, self.keys[s], ROUND, self.public, t) for s in self.names}
        self.held = {h: {o: sent[o][h] for o in self.names} for h in self.names}
        self.deltas = {s: rng.normal(0, 0.05, dim) for s in self.names}
        self.weights = {s: int(rng.integers(10, 500)) for s in self.names}
        self.x = {s: Q.encode(self.deltas[s], self.weights[s])[0] for s in self.names}
        self.y = {s: sa.mask(s, self.keys[s], ROUND, self.x[s], self.public) for s in self.names}

    def open(self, answering, survivors):
        dropped = [s for s in self.names if s not in survivors]
        return {h: sa.open_shares(h, self.keys[h], ROUND, self.public, self.held[h], survivors, dropped, self.t)
                for h in answering}

    def total(self, survivors, answering=None):
        opened = self.open(answering or survivors, survivors)
        return sa.unmask(ROUND, self.public, {s: self.y[s] for s in survivors}, opened, self.t)


def test_masked_vectors_hide_each_update():
    """What the server holds for a site is its update plus a uniform mask: no coordinate equal, the
    masked values spread over all of [0, 2^64), and decoding it alone is refused; asking the other
    sites to unmask one site alone (the rest 'dropped') is refused by every site."""
    study = Study()
    for s in study.names:
        x, y = study.x[s], study.y[s]
        assert not np.any(x == y)
        assert 0.4 < float(np.mean(y / 2.0**64)) < 0.6 and float(np.mean(x / 2.0**64)) < 1e-9
        with pytest.raises(sa.SecAggError):
            Q.decode(y)
    with pytest.raises(sa.SecAggError, match="listed as dropped"):
        study.open(["B"], ["A"])  # "only A survived": no other site answers
    with pytest.raises(sa.SecAggError, match="2 survivors < threshold 3"):
        study.open(["B"], ["A", "B"])  # B could subtract its own update from A + B's
    with pytest.raises(sa.SecAggError, match="both survivors and dropped"):
        sa.open_shares("B", study.keys["B"], ROUND, study.public, study.held["B"], ["A", "B", "C"],
                       ["A", "D", "E"], study.t)
    with pytest.raises(sa.SecAggError, match="threshold"):
        sa.unmask(ROUND, study.public, {"A": study.y["A"]}, study.open(["A", "B"], ["A", "B", "C"]), study.t)


def test_the_sum_is_weighted_fedavg_within_the_stated_bound():
    study = Study()
    total = study.total(study.names)
    assert np.array_equal(total, sum(study.x.values()))  # the masks cancel exactly
    mean, weight = Q.decode(total)
    exact = sum(study.deltas[s] * study.weights[s] for s in study.names) / sum(study.weights.values())
    assert weight == sum(study.weights.values())
    assert np.abs(mean - exact).max() <= Q.bound * (1 + 1e-9)
    assert Q.bound == pytest.approx(1.0 / (2**24 - 1))


@pytest.mark.parametrize("dropped", [["B"], ["B", "D"]])
def test_sites_dropping_after_masking_are_recovered_exactly(dropped):
    """Their masked vectors never arrive: their mask keys are rebuilt from the survivors' shares
    and their pairwise masks removed; the sum is exactly the survivors' sum. A survivor that does
    not answer the unmasking step costs nothing while t others answer."""
    study = Study(n=5, t=3)
    survivors = [s for s in study.names if s not in dropped]
    assert np.array_equal(study.total(survivors), sum(study.x[s] for s in survivors))
    assert np.array_equal(study.total(survivors, answering=survivors[:3]), sum(study.x[s] for s in survivors))


def test_fewer_survivors_than_the_threshold_is_refused():
    study = Study(n=5, t=3)
    with pytest.raises(sa.SecAggError, match="2 survivors < threshold 3"):
        study.open(["A", "B"], ["A", "B"])
    with pytest.raises(sa.SecAggError, match="opened their shares < threshold"):
        sa.unmask(ROUND, study.public, {s: study.y[s] for s in "ABC"}, study.open(["A", "B"], ["A", "B", "C"]),
                  study.t)


def test_a_site_that_lies_in_the_protocol_is_caught():
    """A bad share fails the rebuilt seed's commitment (or the rebuilt key's public key); a changed
    ciphertext does not decrypt; a vector that is not an encoding fails the decoded sum's checks."""
    study = Study(n=4, t=3)
    opened = study.open(["A", "B", "C", "D"], study.names)
    share = bytearray(opened["A"]["B"])
    share[5] ^= 1
    opened["A"]["B"] = bytes(share)
    with pytest.raises(sa.SecAggError, match="site B's rebuilt self-mask seed does not match"):
        sa.unmask(ROUND, study.public, dict(study.y), opened, study.t)
    held = dict(study.held["C"])
    held["A"] = held["A"][:-1] + bytes([held["A"][-1] ^ 1])
    with pytest.raises(sa.SecAggError, match="share from site A does not decrypt"):
        sa.open_shares("C", study.keys["C"], ROUND, study.public, held, study.names, [], study.t)
    garbage = sa.prg(b"k" * 32, study.y["D"].size)
    garbage[0] = 0
    study.y["D"] = study.y["D"] + garbage  # D masks a vector that is not an encoding (its weight is right)
    with pytest.raises(sa.SecAggError, match="not an encoded update"):
        Q.decode(study.total(study.names))
    study.y["D"][0] += np.uint64(2**50)  # and a weight no site could have (the loop also compares it with the
    # num-examples the sites reported)
    with pytest.raises(sa.SecAggError, match="not a sum of site weights"):
        Q.decode(study.total(study.names))
    with pytest.raises(sa.SecAggError, match="majority"):
        sa.share_keys("A", study.keys["A"], ROUND, study.public, 2)


# ---------------------------------------------------------------------- config and policy
SECURE = ["federation.secure_aggregation=secaggplus", "sites.train=[A,B,C]", "sites.heldout=[]"]


@pytest.mark.parametrize("setting, named", [
    ("federation.strategy=fedmedian", "federation.strategy=fedmedian"),
    ("federation.strategy=krum", "federation.strategy=krum"),
    ("privacy.central.enabled=true", "federation.secagg_clip=1: with privacy.central"),
    ("federation.max_update_ratio=10", "federation.max_update_ratio"),
    ("sites.train=[A,B]", "use at least 3"),
    ("federation.secagg_threshold=1", "secagg_threshold"),
])
def test_what_secure_aggregation_cannot_go_with_is_refused(setting, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, SECURE + [setting])


def test_a_secure_study_that_would_ask_fewer_than_three_sites_a_round_is_refused_at_load():
    four = SECURE + ["sites.train=[A,B,C,D]"]
    with pytest.raises(ConfigError, match=r"federation\.fraction_train=0\.5 asks 2 of the 4 .* at least 3/4 = 0\.75"):
        load_config(None, four + ["federation.fraction_train=0.5"])
    assert load_config(None, four + ["federation.fraction_train=0.75"]).federation.fraction_train == 0.75


def test_a_secure_study_goes_without_the_default_update_bound():
    """federation.max_update_ratio (default 10) needs each site's update; a secure study left at the
    default runs without it, and the config the sites receive says so."""
    cfg = load_config(None, SECURE)
    assert cfg.federation.max_update_ratio is None
    assert load_config(None, []).federation.max_update_ratio == 10.0
    assert yaml.safe_load(dump_config(cfg))["federation"]["max_update_ratio"] is None
    assert load_config(None, SECURE + ["federation.secure_aggregation=off"]).federation.max_update_ratio == 10.0


def test_yaml_off_and_the_default_are_off():
    assert load_config(None, []).federation.secure_aggregation == "off"
    assert load_config(None, ["federation.secure_aggregation=off"]).federation.secure_aggregation == "off"


def test_a_site_that_requires_secure_aggregation_refuses_a_clear_study():
    policy = SitePolicy(require_dp=False, require_secure_aggregation=True)
    clear = load_config(None, ["sites.train=[A,B,C]"])
    found = violations(clear, policy, "A", ("study", "0" * 16))
    assert found == ["require_secure_aggregation: the study sends clear updates (federation.secure_aggregation=off)"]
    assert violations(load_config(None, SECURE), policy, "A", ("study", "0" * 16)) == []


# ---------------------------------------------------------------------- the loop, with the real ClientApp
class DroppingGrid(LocalGrid):
    """Site nodes in ``fail`` raise when a message of that type reaches them (a site that crashes
    at that step); ``corrupt`` replaces a site's masked vector with a shorter one."""

    def __init__(self, n_nodes, fail=None, corrupt=()):
        super().__init__(n_nodes)
        self.fail, self.corrupt = fail or {}, set(corrupt)

    def send_and_receive(self, messages, *, timeout=None):
        kept = []
        for msg in messages:
            node = msg.metadata.dst_node_id - 100
            if msg.metadata.message_type in self.fail.get(node, ()):
                continue  # no answer: a site that dropped at this step
            kept.append(msg)
        replies = super().send_and_receive(kept, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id - 100 in self.corrupt and "arrays" in reply.content:
                vector = reply.content["arrays"]["masked"].numpy()
                reply.content["arrays"] = ArrayRecord({"masked": Array(vector[:-1].copy())})
        return replies


def _federate(cfg, path, grid=None):
    run = RunDir(path)
    run.create(cfg)
    run_federation(grid or LocalGrid(len(cfg.sites.all)), cfg, run, log=lambda _: None)
    return run


def _cfg(cohort, *extra, sites="A,B,C"):
    base = [x for x in TINY if not x.startswith("sites.")] + ["federation.samples_per_class=0",
                                                              "evaluation.max_samples=4",
                                                              "evaluation.max_anomaly_slices=4",
                                                              "evaluation.membership_inference=false"]
    cfg = load_config(None, base + ["federation.max_update_ratio=null", f"sites.train=[{sites}]", "sites.heldout=[]",
                                    *extra])
    return cfg.model_copy(update={"data": cohort})


@pytest.fixture(scope="module")
def cohort4(shared_cache):
    """The tiny phantom cohort with a fourth site D: a round that loses one site still sums 3."""
    from medgen.simulation import resolve_data

    sets = [x for x in TINY if not x.startswith("sites.")] + ["sites.train=[A,B,C,D]", "sites.heldout=[]",
                                                              f"data.cache_dir={shared_cache}"]
    return resolve_data(load_config(None, sets), log=lambda _: None).data


def _weights(run):
    return load_checkpoint(run.last_checkpoint())["model"]


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def clear_run(tiny_cohort, tmp_path_factory):  # noqa: F811
    return _weights(_federate(_cfg(tiny_cohort, "federation.rounds=1"), tmp_path_factory.mktemp("clear") / "run"))


def test_secure_round_matches_the_clear_fedavg(tiny_cohort, clear_run, tmp_path):  # noqa: F811
    """One round of 3 sites through the four steps; the global model equals plain FedAvg's within
    the quantisation bound (plus float32 rounding), and the server logged no site's weights."""
    cfg = _cfg(tiny_cohort, "federation.rounds=1", "federation.secure_aggregation=secaggplus")
    run = _federate(cfg, tmp_path / "run")
    secure = _weights(run)
    bound = sa.Quantiser(cfg.federation.secagg_clip, cfg.federation.secagg_bits).bound
    diff = _max_diff(secure, clear_run)
    assert 0 < diff <= bound + 1e-6, diff
    rec = next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")
    assert rec["sites"] == 3 and rec["secagg-sites"] == 3 and rec["secagg-dropped"] == 0
    train = [r for r in run.records() if r["phase"] == "train" and r["site"] in "ABC"]
    assert sorted(r["site"] for r in train) == ["A", "B", "C"] and all("error" not in r for r in train)
    assert run.status()["status"] == "completed"


def test_fedbn_under_secure_aggregation_keeps_the_site_norms_at_the_sites(tiny_cohort, tmp_path):  # noqa: F811
    """fedbn with secaggplus: the server sees only sums, so each site keeps its own normalisation
    parameters in its node context — exactly those the clear fedbn server keeps for it — and
    trains the next round from them; a 2-round study completes."""
    import torch

    from medgen.client.secure import NORMS, keep_norms, own_norms
    from medgen.models import build_model

    fedbn = ["federation.rounds=1", "federation.strategy=fedbn"]
    clear = load_checkpoint(_federate(_cfg(tiny_cohort, *fedbn), tmp_path / "clear").last_checkpoint())
    cfg = _cfg(tiny_cohort, *fedbn, "federation.secure_aggregation=secaggplus")
    grid = LocalGrid(len(cfg.sites.all))
    _federate(cfg, tmp_path / "secure", grid)
    for node, context in grid.contexts.items():
        site = cfg.sites.all[int(context.node_config["partition-id"])]
        kept = context.state[NORMS].to_torch_state_dict()
        server_kept = clear["aggregator"]["site_norms"][site]
        assert set(kept) == set(server_kept) and all(torch.equal(kept[k], server_kept[k]) for k in kept), site
    # the next round starts from them: own_norms puts a site's kept norms into the global weights
    global_model, site_model = build_model(cfg), build_model(cfg)
    for p in site_model.networks["vae"].parameters():
        p.data.add_(1.0)
    context = next(iter(grid.contexts.values()))
    keep_norms(context, site_model)
    own_norms(context, global_model)
    norms, after, before = set(site_model.norm_keys()), global_model.state_dict(), build_model(cfg).state_dict()
    assert all(torch.equal(after[k], site_model.state_dict()[k]) for k in norms)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in norms)
    run = _federate(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})}),
                    tmp_path / "two")
    assert run.status()["status"] == "completed" and load_checkpoint(run.last_checkpoint())["round"] == 2


def test_a_site_dropping_while_training_is_recovered(cohort4, tmp_path):
    """D answers the key steps, then never sends its masked vector: A, B and C (t = 3 of 4) still
    get their sum unmasked — the same model as a clear run of A, B and C alone, within the bound."""
    cfg = _cfg(cohort4, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
               "federation.min_sites=3", sites="A,B,C,D")
    run = _federate(cfg, tmp_path / "run", DroppingGrid(4, fail={3: {"train"}}))
    rec = next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")
    assert rec["secagg-sites"] == 3 and rec["secagg-dropped"] == 1
    alone = _cfg(cohort4, "federation.rounds=1", sites="A,B,C")
    alone = alone.model_copy(update={"sites": alone.sites.model_copy(update={"heldout": ["D"]})})
    clear = _weights(_federate(alone, tmp_path / "clear"))
    assert _max_diff(_weights(run), clear) <= sa.Quantiser(1.0, 24).bound + 1e-6


def test_a_malformed_masked_vector_is_rejected_and_the_round_goes_on(cohort4, tmp_path):
    cfg = _cfg(cohort4, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
               "federation.min_sites=3", sites="A,B,C,D")
    run = _federate(cfg, tmp_path / "run", DroppingGrid(4, corrupt={1}))
    bad = [r for r in run.records() if r["site"] == "B" and r["phase"] == "train"]
    assert len(bad) == 1 and "update rejected: masked vector is uint64 of shape" in bad[0]["error"]
    rec = next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")
    assert rec["secagg-sites"] == 3 and rec["secagg-dropped"] == 1


def test_the_server_publishes_no_sum_of_two(tiny_cohort, tmp_path):  # noqa: F811
    """3 sites, t = 2: C drops while training, and the 2 survivors' sum (each could subtract its own
    update from it) is not unmasked; a study that would ask only 2 of the 3 sites a round is refused
    at load."""
    cfg = _cfg(tiny_cohort, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
               "federation.min_sites=2")
    run = RunDir(tmp_path / "dropped")
    run.create(cfg)
    with pytest.raises(FederationError, match="round 1: secure aggregation: 2 sites left after training < 3: no "
                                              "sum of fewer sites' updates is published"):
        run_federation(DroppingGrid(3, fail={2: {"train"}}), cfg, run, log=lambda _: None)
    assert run.last_checkpoint() is None and not any(r["phase"] == "secagg-unmask" for r in run.records())
    with pytest.raises(ConfigError, match=r"federation\.fraction_train=0\.5 asks 2 of the 3"):  # ceil(1.5) = 2
        _cfg(tiny_cohort, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
             "federation.min_sites=2", "federation.fraction_train=0.5")


def test_a_site_opens_no_shares_for_fewer_survivors_than_its_policy_allows(cohort4, tmp_path):
    """A's policy: min_secagg_sites=4. D drops while training; the server (t = 3) would unmask the
    sum of A, B and C, but A refuses to open its shares, naming the key, so the sum stays masked.
    The study cannot lower the site's minimum: a study of 3 training sites is refused up front."""
    from medgen.client import sent_log

    policy = "sites.policies={A: {require_dp: false, min_secagg_sites: 4}}"
    cfg = _cfg(cohort4, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
               "federation.min_sites=3", policy, sites="A,B,C,D")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    with pytest.raises(FederationError, match="2 sites left after unmasking < federation.secagg_threshold=3"):
        run_federation(DroppingGrid(4, fail={3: {"train"}}), cfg, run, log=lambda _: None)
    refused = [r for r in run.records() if r["site"] == "A" and r["phase"] == "secagg-unmask"]
    assert len(refused) == 1 and "min_secagg_sites: survivors whose sum the shares would unmask: 3 sites < 4" \
        in refused[0]["error"], refused
    last = sent_log.read(run.path / "sites" / "A")[-1]
    assert last["kind"] == "train.secagg_unmask" and last["status"] == "error" and "min_secagg_sites" in last["reason"]
    assert run.last_checkpoint() is None
    three = _cfg(cohort4, "federation.secure_aggregation=secaggplus", sites="A,B,C")
    found = violations(three, SitePolicy(require_dp=False, min_secagg_sites=4), "A", ("study", "0" * 16))
    assert found == ["min_secagg_sites: the study's secure sums hold at most 3 sites' updates (sites.train) < 4"]
    assert violations(three, SitePolicy(require_dp=False), "A", ("study", "0" * 16)) == []
    assert SitePolicy().min_secagg_sites == 3


def test_fewer_survivors_than_the_threshold_fails_the_round_and_keeps_the_finished_ones(
        tiny_cohort, tmp_path):  # noqa: F811
    """Round 2: B and C drop while training; 1 < t = 2 survivors: the round fails naming the
    threshold, round 1's checkpoint stays."""

    class LateDrops(DroppingGrid):
        trains = 0

        def send_and_receive(self, messages, *, timeout=None):
            if messages and messages[0].metadata.message_type == "train":
                LateDrops.trains += 1
                self.fail = {1: {"train"}, 2: {"train"}} if LateDrops.trains == 2 else {}
            return super().send_and_receive(messages, timeout=timeout)

    cfg = _cfg(tiny_cohort, "federation.rounds=2", "federation.secure_aggregation=secaggplus")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    with pytest.raises(FederationError, match="round 2: secure aggregation: 1 sites left after training < "
                                              "federation.secagg_threshold=2"):
        run_federation(LateDrops(3), cfg, run, log=lambda _: None)
    assert run.status()["status"] == "failed" and load_checkpoint(run.last_checkpoint())["round"] == 1
    assert torch.isfinite(next(iter(_weights(run).values()))).all()


def test_medgen_simulate_with_secure_aggregation_matches_the_clear_run(tmp_path, shared_cache):
    """`medgen simulate` on Flower's Ray engine, 3 sites, 1 round, with and without
    --set federation.secure_aggregation=secaggplus: the same global model within the bound (the
    sites' secrets live in each node's context.state between the four messages)."""
    from test_simulation import MEDGEN

    sets = [*[x for x in TINY if not x.startswith("sites.")], "sites.train=[A,B,C]", "sites.heldout=[]",
            "federation.rounds=1", "federation.samples_per_class=0",
            f"data.cache_dir={shared_cache}"]
    runs = {}
    for name, extra in (("clear", []), ("secure", ["federation.secure_aggregation=secaggplus"])):
        args = [x for kv in sets + extra for x in ("--set", kv)]
        out = subprocess.run([MEDGEN, "simulate", "--out", str(tmp_path / name), *args], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs[name] = RunDir(tmp_path / name)
    secure = next(r for r in runs["secure"].records() if r["site"] == "global" and r["phase"] == "train")
    assert secure["secagg-sites"] == 3 and secure["secagg-bound"] == pytest.approx(sa.Quantiser(1.0, 24).bound)
    assert _max_diff(_weights(runs["secure"]), _weights(runs["clear"])) <= secure["secagg-bound"] + 1e-6


def test_a_simulated_site_that_requires_it_refuses_a_clear_study_and_serves_a_secure_one(
        tiny_cohort, tmp_path):  # noqa: F811
    """A's policy requires secure aggregation: in a clear study it refuses when asked, naming the
    key, and never trains; in a secure one it takes part, and its sent-message log shows the four
    steps, the training reply holding one uint64 vector and no weights."""
    from medgen.client import sent_log

    policy = "sites.policies={A: {require_secure_aggregation: true, require_dp: false}}"
    lines = []
    cfg = _cfg(tiny_cohort, "federation.rounds=1", "federation.min_sites=2", policy)
    run = RunDir(tmp_path / "clear")
    run.create(cfg)
    run_federation(LocalGrid(3), cfg, run, log=lines.append)
    refused = [r for r in run.records() if r["site"] == "A" and "refused" in r]
    assert refused and all("require_secure_aggregation" in r["refused"] for r in refused)
    assert not any(r["site"] == "A" and r["phase"] == "train" and "loss" in r for r in run.records())
    assert any("site A: REFUSED the study" in line for line in lines)

    cfg = _cfg(tiny_cohort, "federation.rounds=1", "federation.secure_aggregation=secaggplus", policy)
    run = _federate(cfg, tmp_path / "secure")
    assert next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")["secagg-sites"] == 3
    sent = sent_log.read(run.path / "sites" / "A")
    assert [e["kind"] for e in sent] == ["query", "train.secagg_keys", "train.secagg_shares", "train",
                                         "train.secagg_unmask", "evaluate"]
    assert sent[3]["records"]["arrays"]["keys"] == ["masked"]


# ---------------------------------------------------------------------- central DP, noise added by the sites
Z, C = 0.05, 0.01
CENTRAL = [f"privacy.central.noise_multiplier={Z}", f"privacy.central.clipping_norm={C}", "federation.secagg_clip=0.02"]


def _central_cfg(*extra):
    return load_config(None, SECURE + ["privacy.central.enabled=true", *CENTRAL, *extra])


def test_secure_central_dp_is_accepted_and_what_it_cannot_do_is_refused():
    """secaggplus + privacy.central is a config; its limits are refused naming the key: a quantiser
    range too narrow for the noised update (C + 10 per-site noise stds, t = 2 at worst, or the
    configured threshold), adaptive clipping, sampling (no amplification against the server that
    draws the sample), fedbn."""
    cfg = _central_cfg()
    assert cfg.privacy.central.enabled and cfg.federation.secure_aggregation == "secaggplus"
    need = C + 10 * Z * C / np.sqrt(2)
    with pytest.raises(ConfigError, match=rf"federation\.secagg_clip >= {need:.4g} .*at t = 2"):
        _central_cfg("federation.secagg_clip=0.013")
    five = SECURE[:1] + ["sites.train=[A,B,C,D,E]", "sites.heldout=[]", "privacy.central.enabled=true", *CENTRAL]
    assert load_config(None, five + ["federation.secagg_threshold=4", "federation.secagg_clip=0.0126"])
    with pytest.raises(ConfigError, match=r"federation\.secagg_clip=0\.0126.*at t = 2"):
        load_config(None, five + ["federation.secagg_clip=0.0126"])
    for setting, named in (("privacy.central.adaptive=true", r"privacy\.central\.adaptive: with federation"),
                           ("federation.fraction_train=0.5", r"federation\.fraction_train=0\.5: with privacy\.central"),
                           ("federation.strategy=fedbn", r"privacy\.central\.enabled: federation\.strategy=fedbn")):
        with pytest.raises(ConfigError, match=named):
            _central_cfg(setting, "privacy.central.clipped_count_stddev=1")


def test_each_site_clips_its_delta_then_adds_its_share_of_the_noise(monkeypatch):
    """site_release: the delta clipped to L2 norm C (a small one unchanged, a big one scaled onto the
    sphere, same direction), then N(0, (z C / sqrt(t))^2) added per coordinate; nothing about the
    delta in the numbers it returns (they are sent in the clear)."""
    from medgen.privacy import central

    cfg = _central_cfg()
    rng = np.random.default_rng(1)
    big, small = rng.normal(0, 1, 5000), rng.normal(0, 1e-5, 5000)
    monkeypatch.setattr(central, "gaussian", lambda size, std: np.zeros(size))
    clipped, numbers = central.site_release(cfg, big, threshold=2)
    assert np.linalg.norm(clipped) == pytest.approx(C, rel=1e-12)
    np.testing.assert_allclose(clipped, big * C / np.linalg.norm(big), rtol=1e-12)
    assert np.array_equal(central.site_release(cfg, small, 2)[0], small)
    assert numbers == {"central-site-noise-std": pytest.approx(Z * C / np.sqrt(2))}
    monkeypatch.undo()
    noised, _ = central.site_release(cfg, big, threshold=2)
    noise = noised - clipped
    assert noise.std() == pytest.approx(Z * C / np.sqrt(2), rel=0.05) and abs(noise.mean()) < 0.1 * Z * C
    assert not np.array_equal(central.site_release(cfg, big, 2)[0], noised)  # fresh noise, never replayed


@pytest.mark.parametrize("survivors", [3, 5])
def test_the_noise_of_a_sum_of_at_least_t_sites_has_std_at_least_z_c(survivors):
    """t = 3: each site adds std z C / sqrt(3); the sum of 3 sites' noise has std z C (within 1% on
    400k coordinates: the sample std's own error is 0.11%, so 1% is 9 of its stds), the sum of 5 more:
    z C sqrt(5 / 3), never less."""
    from medgen.privacy import central

    cfg = _central_cfg()
    d = 400_000
    total = sum(central.site_release(cfg, np.zeros(d), threshold=3)[0] for _ in range(survivors))
    assert total.std() == pytest.approx(Z * C * np.sqrt(survivors / 3), rel=0.01)
    assert total.std() >= 0.99 * Z * C


def test_the_decoded_secure_mean_is_the_mean_of_the_noised_clipped_deltas():
    """Four sites, t = 3, one drops after masking: the three survivors' clipped, noised deltas go
    through the protocol with weight 1; the decoded mean equals their mean within the quantisation
    bound, and the total weight is the number of survivors."""
    from medgen.privacy import central

    cfg = _central_cfg()
    q = sa.Quantiser(cfg.federation.secagg_clip, cfg.federation.secagg_bits)
    names, t = list("ABCD"), 3
    keys = {s: sa.SiteKeys.new() for s in names}
    public = {s: keys[s].public() for s in names}
    sent = {s: sa.share_keys(s, keys[s], ROUND, public, t) for s in names}
    rng = np.random.default_rng(2)
    released = {s: central.site_release(cfg, rng.normal(0, 0.01, 3000), t)[0] for s in names}
    assert all(np.abs(v).max() < cfg.federation.secagg_clip for v in released.values())  # nothing clipped
    y = {s: sa.mask(s, keys[s], ROUND, q.encode(released[s], 1)[0], public) for s in names}
    survivors = list("ABC")
    opened = {h: sa.open_shares(h, keys[h], ROUND, public, {o: sent[o][h] for o in names}, survivors, ["D"], t)
              for h in survivors}
    mean, weight = q.decode(sa.unmask(ROUND, public, {s: y[s] for s in survivors}, opened, t))
    assert weight == 3
    assert np.abs(mean - sum(released[s] for s in survivors) / 3).max() <= q.bound * (1 + 1e-9)


def test_secure_central_dp_accounts_like_the_clear_mechanism():
    """Same z, rounds and q = 1: the distributed mechanism's central-epsilon is the clear one's
    (Opacus' RDP accountant, one step per round), and it passes the secure mean on unchanged."""
    from medgen.privacy.central import CentralDP
    from medgen.server.strategy import FedAvg, Update

    state = {"w": torch.zeros(10, dtype=torch.float64)}
    distributed = CentralDP(FedAvg(), _central_cfg())
    clear = CentralDP(FedAvg(), load_config(None, ["privacy.central.enabled=true", *CENTRAL[:2],
                                                   "sites.train=[A,B,C]", "sites.heldout=[]"]))
    for r in range(3):
        secure_mean = {"w": torch.full((10,), 0.001 * (r + 1), dtype=torch.float64)}
        out = distributed.aggregate(state, [Update("secure-sum", secure_mean, 30)])
        assert torch.equal(out["w"], secure_mean["w"])
        clear.aggregate(state, [Update(s, state, 10) for s in "ABC"])
    metrics = distributed.round_metrics()
    assert metrics["central-epsilon"] == pytest.approx(clear.round_metrics()["central-epsilon"], rel=1e-12)
    from opacus.accountants import RDPAccountant
    independent = RDPAccountant()
    independent.history = [(Z, 1.0, 3)]
    assert metrics["central-epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert metrics["central-distributed"] == 1.0 and distributed.state()["central"]["history"] == [(Z, 1.0, 3)]


def test_a_site_policy_sets_the_least_noise_it_adds():
    """min_central_noise_multiplier: a study whose z (fixed, or solved from target_epsilon) is
    below the site's minimum is refused, naming the key, before any data is read; the noise the
    site adds is computed from the same checked config (site_release uses its z)."""
    from medgen.privacy import central

    policy = SitePolicy(require_dp=False, min_central_noise_multiplier=1.0)
    found = violations(_central_cfg(), policy, "A", ("study", "0" * 16))
    assert found == [f"min_central_noise_multiplier: privacy.central.noise_multiplier={Z:g} < 1 (the noise this "
                     f"site adds to its update under secure aggregation)"]
    solved = load_config(None, SECURE + ["privacy.central.enabled=true", "privacy.central.target_epsilon=50",
                                         "federation.rounds=1", "federation.secagg_clip=100"])
    z = central.noise_multiplier(solved)
    assert z < 1.0
    assert [f.split(" (")[0] for f in violations(solved, policy, "A", ("study", "0" * 16))] == [
        f"min_central_noise_multiplier: the noise multiplier solved from privacy.central.target_epsilon=50={z:.4g} < 1"]
    strong = load_config(None, SECURE + ["privacy.central.enabled=true", "privacy.central.noise_multiplier=2",
                                         "federation.secagg_clip=100"])
    assert violations(strong, policy, "A", ("study", "0" * 16)) == []
    assert SitePolicy().min_central_noise_multiplier == 0.0


@pytest.fixture
def recorded(monkeypatch):
    """What each site's ClientApp computes under distributed central DP, in the order the sites
    run: its delta, the noise it drew, the vector it quantised (weight 1) and the global weights."""
    from medgen.client import secure
    from medgen.privacy import central

    seen = {"delta": [], "noise": [], "encoded": [], "reference": []}
    flat, gaussian = secure.flat_delta, central.gaussian

    def record_flat(local, reference):
        seen["reference"].append({k: v.clone() for k, v in reference.items()})
        seen["delta"].append(flat(local, reference))
        return seen["delta"][-1]

    def record_noise(size, std):
        seen["noise"].append(gaussian(size, std))
        return seen["noise"][-1]

    class Recording(sa.Quantiser):
        def encode(self, delta, weight):
            assert weight == 1
            seen["encoded"].append(np.array(delta))
            return super().encode(delta, weight)

    monkeypatch.setattr(secure, "flat_delta", record_flat)
    monkeypatch.setattr(central, "gaussian", record_noise)
    monkeypatch.setattr(secure, "Quantiser", Recording)
    return seen


def _moved(run, reference):
    from medgen.client.secure import floating_keys

    new = _weights(run)
    return np.concatenate([(new[k].double() - reference[k].double()).numpy().ravel() for k in floating_keys(reference)])


def test_a_secure_round_with_central_dp_sends_clipped_noised_deltas(tiny_cohort, tmp_path, recorded):  # noqa: F811
    """One round, 3 sites (t = 2), the real ClientApp: what each site quantises is its delta clipped
    to norm C plus noise of std z C / sqrt(2) (weight 1); the new global model is the global model
    plus the mean of those within the quantisation bound (and float32 rounding); the round is
    accounted as the clear mechanism's; no site sends its clipped-coordinate count."""
    from medgen.privacy import central

    seen = recorded
    cfg = _cfg(tiny_cohort, "federation.rounds=1", "federation.secure_aggregation=secaggplus",
               "privacy.central.enabled=true", *CENTRAL)
    run = _federate(cfg, tmp_path / "run")
    assert len(seen["encoded"]) == 3
    for delta, noise, encoded in zip(seen["delta"], seen["noise"], seen["encoded"]):
        assert np.linalg.norm(delta) > C  # 3 local steps move the weights by more than C = 0.01
        assert np.linalg.norm(encoded - noise) == pytest.approx(C, rel=1e-9)
        np.testing.assert_allclose(encoded - noise, delta * C / np.linalg.norm(delta), rtol=1e-6, atol=1e-15)
        assert noise.std() == pytest.approx(Z * C / np.sqrt(2), rel=0.05)
    mean = sum(seen["encoded"]) / 3
    moved = _moved(run, seen["reference"][0])
    bound = sa.Quantiser(cfg.federation.secagg_clip, cfg.federation.secagg_bits).bound
    assert np.abs(moved - mean).max() <= bound + 1e-6
    rec = next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")
    assert rec["central-epsilon"] == pytest.approx(central.epsilon([(Z, 1.0, 1)], 1e-5))
    assert rec["central-distributed"] == 1.0 and rec["secagg-sites"] == 3 and rec["secagg-threshold"] == 2
    assert rec["central-noise-std"] == pytest.approx(Z * C / np.sqrt(2) * np.sqrt(3) / 3)
    train = [r for r in run.records() if r["phase"] == "train" and r["site"] in "ABC"]
    assert len(train) == 3 and not any("secagg-clipped-coordinates" in r for r in train)
    assert all(r["central-site-noise-std"] == pytest.approx(Z * C / np.sqrt(2)) for r in train)


def test_a_site_dropping_under_central_dp_leaves_more_noise_per_survivor_not_less(cohort4, tmp_path, recorded):
    """4 sites, t = 3: each adds z C / sqrt(3); D never sends its masked vector. The other three's sum
    is still unmasked and is the mean of their clipped, noised deltas (D's noise is not in it, and is
    not needed: 3 >= t shares make std z C); the record says 3 sites, 1 dropped."""
    from medgen.privacy import central

    cfg = _cfg(cohort4, "federation.rounds=1", "federation.secure_aggregation=secaggplus", "federation.min_sites=3",
               "privacy.central.enabled=true", *CENTRAL, sites="A,B,C,D")
    run = _federate(cfg, tmp_path / "run", DroppingGrid(4, fail={3: {"train"}}))
    assert len(recorded["encoded"]) == 3  # D's train message never reached it
    assert all(n.std() == pytest.approx(Z * C / np.sqrt(3), rel=0.05) for n in recorded["noise"])
    bound = sa.Quantiser(cfg.federation.secagg_clip, cfg.federation.secagg_bits).bound
    assert np.abs(_moved(run, recorded["reference"][0]) - sum(recorded["encoded"]) / 3).max() <= bound + 1e-6
    rec = next(r for r in run.records() if r["site"] == "global" and r["phase"] == "train")
    assert rec["secagg-sites"] == 3 and rec["secagg-dropped"] == 1 and rec["secagg-threshold"] == 3
    assert rec["central-noise-std"] == pytest.approx(Z * C / 3)  # sqrt(3) shares of z C / sqrt(3), over 3
    assert rec["central-epsilon"] == pytest.approx(central.epsilon([(Z, 1.0, 1)], 1e-5))


def test_medgen_simulate_with_secure_aggregation_and_central_dp(tmp_path, shared_cache):
    """`medgen simulate` on Flower's Ray engine, 3 sites, 2 rounds, secaggplus + privacy.central:
    it completes, and the global train records and the report carry the clear mechanism's
    central-epsilon for the same z and rounds."""
    import json

    from medgen.privacy import central
    from test_simulation import MEDGEN

    sets = [*[x for x in TINY if not x.startswith("sites.")], "sites.train=[A,B,C]", "sites.heldout=[]",
            "federation.rounds=2", "federation.samples_per_class=0", f"data.cache_dir={shared_cache}",
            "federation.secure_aggregation=secaggplus", "privacy.central.enabled=true", *CENTRAL]
    out = subprocess.run([MEDGEN, "simulate", "--out", str(tmp_path / "run"),
                          *[x for kv in sets for x in ("--set", kv)]], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    rounds = [r for r in run.records() if r["site"] == "global" and r["phase"] == "train"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["secagg-sites"] == 3 for r in rounds)
    eps = central.epsilon([(Z, 1.0, 2)], 1e-5)
    assert rounds[-1]["central-epsilon"] == pytest.approx(eps) and rounds[0]["central-epsilon"] < eps
    privacy = json.loads((run.path / "report" / "metrics.json").read_text())["privacy"]
    assert privacy["global"]["central-epsilon"] == pytest.approx(eps)
    assert "noise added by the sites under secure aggregation" in (run.path / "report" / "index.html").read_text()
