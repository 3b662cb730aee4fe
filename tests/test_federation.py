"""The server loop and the ClientApp together, without Ray: a Grid that hands each message to the
real ClientApp in this process (the transport is the only thing replaced), plus the aggregators
against hand computations. The real Ray simulation is in test_simulation.py."""

import json
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from conftest import FAST_DATA
from medgen._compat.flwr import TaskIdentity, set_message_id
from medgen.client.app import app as client_app
from medgen.config import load_config
from medgen.server.errors import FederationError
from medgen.server.federation import run_federation
from medgen.server.validation import check_update
from medgen.server.rundir import RunDir, load_checkpoint
from medgen.server.strategy import FedAdam, FedAvg, FedBN, FedYogi, Update
from medgen.simulation import resolve_data


class LocalGrid(Grid):
    """Delivers each message to the ClientApp of its node, synchronously, in this process."""

    def __init__(self, n_nodes: int):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # set by Flower's runtime in a real ServerApp
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": n_nodes})
                         for i in range(n_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            set_message_id(msg, uuid.uuid4().hex)
            try:
                replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:  # what Flower's runtime does with a raising ClientApp
                replies.append(Message(Error(code=1, reason=str(e)), reply_to=msg))
        return replies

    def set_run(self, run):
        pass

    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


TINY = ["sites.train=[A,B]", "sites.heldout=[C]", "phantom.subjects_per_site=3", "train.local_steps=3",
        "train.batch_size=8", "model.width=8", "model.latent_dim=16", "data.image_size=32",
        "federation.samples_per_class=2", *FAST_DATA]


@pytest.fixture(scope="module")
def tiny_cohort(shared_cache):
    """The tiny phantom cohort's data settings (root, and the session's shared cache)."""
    return resolve_data(load_config(None, TINY + [f"data.cache_dir={shared_cache}"]), log=lambda _: None).data


def tiny_cfg(tiny_cohort, *extra):
    cfg = load_config(None, TINY + list(extra))
    return cfg.model_copy(update={"data": tiny_cohort})


def federate(cfg, run_dir):
    return run_federation(LocalGrid(len(cfg.sites.all)), cfg, RunDir(run_dir), log=lambda _: None)


def test_rounds_write_metrics_checkpoints_samples(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=2")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    state = federate(cfg, run.path)
    records = run.records()
    train = [r for r in records if r["phase"] == "train" and r["site"] in ("A", "B")]
    assert [(r["round"], r["site"]) for r in train] == [(1, "A"), (1, "B"), (2, "A"), (2, "B")]
    assert all(np.isfinite(r["loss"]) and r["steps"] == 3 and r["num-examples"] > 0 for r in train)
    heldout = [r for r in records if r["phase"] == "evaluate" and r["site"] == "C"]
    assert [r["round"] for r in heldout] == [1, 2] and heldout[0]["num-examples"] > 0
    # the full evaluation runs after the last round, at the site: distances and lesion detection
    assert "radfd-healthy" not in heldout[0] and "pixel-auroc" not in heldout[0]
    final = heldout[1]
    assert {"radfd-healthy", "kid-lesion", "ms-ssim-lesion", "pixel-auroc", "slice-auroc"} <= final.keys()
    assert 0.0 <= final["pixel-auroc"] <= 1.0 and final["radfd-healthy"] >= 0
    with np.load(run.path / "evaluation" / "round-0002" / "C.npz") as arrays:
        assert "roc-fpr" in arrays and "overlay-images" not in arrays  # images stay unless shared
    assert {r["site"] for r in records if r["phase"] == "evaluate"} >= {"C", "global"}
    assert not [r for r in records if r["phase"] == "train" and r["site"] == "C"]  # held out: never trains
    ckpt = load_checkpoint(run.last_checkpoint())
    assert ckpt["round"] == 2 and sorted(ckpt["model"]) == sorted(state)
    assert all(torch.equal(ckpt["model"][k], state[k]) for k in state)
    assert (run.samples / "round-0002.png").stat().st_size > 100
    assert run.status()["status"] == "completed"


def test_a_round_asks_the_sampled_sites_only(tiny_cohort, tmp_path):
    """federation.fraction_train=0.5 of 2 training sites: one site per round, the one sample_sites
    draws for that round; the global record says how many were asked; the held-out site evaluates."""
    from medgen.server.sampling import sample_sites

    cfg = tiny_cfg(tiny_cohort, "federation.rounds=3", "federation.fraction_train=0.5")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    federate(cfg, run.path)
    records = run.records()
    for round_ in (1, 2, 3):
        trained = [r["site"] for r in records if r["round"] == round_ and r["phase"] == "train" and "loss" in r]
        assert trained == sample_sites(["A", "B"], cfg, round_) and len(trained) == 1
        glob = next(r for r in records if r["round"] == round_ and r["phase"] == "train" and r["site"] == "global")
        assert glob["sites"] == 1 and glob["sites-asked"] == 1
        evaluated = {r["site"] for r in records if r["round"] == round_ and r["phase"] == "evaluate"}
        assert {"C", "global"} <= evaluated
    assert run.status()["status"] == "completed"


def test_the_first_query_has_its_own_timeout(tiny_cohort, tmp_path):
    """federation.query_timeout_s bounds the queries (a site's first answer: it loads its data then),
    round_timeout_s the training and evaluation; a site silent at the query is named with the key."""

    class Silent(LocalGrid):
        timeouts: list

        def send_and_receive(self, messages, *, timeout=None):
            self.timeouts.append((messages[0].metadata.message_type, timeout))
            return [r for r in super().send_and_receive(messages, timeout=timeout)
                    if not (r.metadata.message_type == "query" and r.metadata.src_node_id == 101)]

    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "federation.min_sites=1", "federation.round_timeout_s=30",
                   "federation.query_timeout_s=300")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    grid, lines = Silent(3), []
    grid.timeouts = []
    run_federation(grid, cfg, run, lines.append)
    assert ("query", 300.0) in grid.timeouts and ("train", 30.0) in grid.timeouts
    assert {t for kind, t in grid.timeouts if kind != "query"} == {30.0}
    assert any("site node 101 FAILED (query): no answer within federation.query_timeout_s=300" in x for x in lines), lines


def test_fedavg_is_the_example_weighted_mean(tiny_cohort, tmp_path):
    """The global model after one round equals the weighted mean of what the two sites sent."""
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "federation.samples_per_class=0")
    grid = LocalGrid(3)
    sent = {}
    real = grid.send_and_receive

    def spy(messages, *, timeout=None):
        replies = real(messages, timeout=timeout)
        for r in replies:
            if "arrays" in r.content:
                sent[str(r.content["info"]["site"])] = (r.content["arrays"].to_torch_state_dict(),
                                                         r.content["metrics"]["num-examples"])
        return replies

    grid.send_and_receive = spy
    state = run_federation(grid, cfg, RunDir(tmp_path / "run"), log=lambda _: None)
    (a, na), (b, nb) = sent["A"], sent["B"]
    for key in state:
        expected = (a[key].double() * na + b[key].double() * nb) / (na + nb)
        torch.testing.assert_close(state[key], expected.float(), rtol=1e-5, atol=1e-6)


def _updates():
    g = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(3, generator=g), "norm.weight": torch.ones(2), "count": torch.tensor(5)}
    ups = [Update("A", {"w": torch.randn(3, generator=g), "norm.weight": torch.tensor([2.0, 2.0]),
                        "count": torch.tensor(9)}, 1),
           Update("B", {"w": torch.randn(3, generator=g), "norm.weight": torch.tensor([5.0, 5.0]),
                        "count": torch.tensor(7)}, 3)]
    return current, ups


def test_aggregators_against_hand_computation():
    current, ups = _updates()
    mean_w = (ups[0].state["w"] * 1 + ups[1].state["w"] * 3) / 4
    out = FedAvg().aggregate(current, ups)
    torch.testing.assert_close(out["w"], mean_w)
    torch.testing.assert_close(out["norm.weight"], torch.tensor([4.25, 4.25]))
    assert out["count"].item() == 5  # integer counters are not averaged

    delta = mean_w - current["w"]
    adam = FedAdam(lr=0.1, betas=(0.9, 0.99), tau=1e-3)
    m, v = 0.1 * delta, 0.01 * delta**2
    torch.testing.assert_close(adam.aggregate(current, ups)["w"], current["w"] + 0.1 * m / (v.sqrt() + 1e-3))

    yogi = FedYogi(lr=0.1, betas=(0.9, 0.99), tau=1e-3)
    v = -0.01 * delta**2 * torch.sign(-delta**2)
    torch.testing.assert_close(yogi.aggregate(current, ups)["w"], current["w"] + 0.1 * m / (v.sqrt() + 1e-3))


def test_fedbn_keeps_norm_parameters_per_site():
    current, ups = _updates()
    bn = FedBN(["norm.weight"])
    glob = bn.aggregate(current, ups)
    torch.testing.assert_close(glob["norm.weight"], torch.tensor([4.25, 4.25]))  # global: the mean
    torch.testing.assert_close(bn.payload("A", glob)["norm.weight"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(bn.payload("B", glob)["norm.weight"], torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(bn.payload("A", glob)["w"], glob["w"])
    restored = FedBN(["norm.weight"])
    restored.load_state(bn.state())
    torch.testing.assert_close(restored.payload("B", glob)["norm.weight"], torch.tensor([5.0, 5.0]))


def test_check_update_rejects_bad_updates():
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert check_update({"a": torch.ones(2, 3), "b": torch.ones(4)}, ref) is None
    assert "NaN or Inf" in check_update({"a": torch.full((2, 3), float("nan")), "b": torch.ones(4)}, ref)
    assert "NaN or Inf" in check_update({"a": torch.ones(2, 3), "b": torch.tensor([1, float("inf"), 0, 0])}, ref)
    assert "shape (3, 2)" in check_update({"a": torch.ones(3, 2), "b": torch.ones(4)}, ref)
    assert "missing ['b']" in check_update({"a": torch.ones(2, 3)}, ref)


@pytest.mark.parametrize("strategy", ["fedadam", "fedbn"])
def test_resume_equals_uninterrupted(tiny_cohort, tmp_path, strategy):
    full = tiny_cfg(tiny_cohort, "federation.rounds=2", f"federation.strategy={strategy}")
    straight = federate(full, tmp_path / "straight")

    first = tiny_cfg(tiny_cohort, "federation.rounds=1", f"federation.strategy={strategy}")
    federate(first, tmp_path / "resumed")
    run = RunDir(tmp_path / "resumed")
    with run.metrics_file.open("a") as f:  # a round 2 that crashed before its checkpoint
        f.write(json.dumps({"round": 2, "site": "A", "phase": "train", "loss": 1.0}) + "\n")
    resumed = federate(full, run.path)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)
    train_rounds = [(r["round"], r["site"]) for r in run.records() if r["phase"] == "train" and r["site"] != "global"]
    assert train_rounds == [(1, "A"), (1, "B"), (2, "A"), (2, "B")]  # round 1 not trained again


def test_failing_site_is_logged_and_survived(tiny_cohort, tmp_path):
    # site B's folder holds only a broken file from now on: its ClientApp raises
    broken = tmp_path / "cohort"
    for site in "ABC":
        (broken / site).mkdir(parents=True)
    for site in "AC":
        for f in (tiny_cohort.root / site).iterdir():
            (broken / site / f.name).symlink_to(f)
    (broken / "B" / "scan.nii.gz").write_bytes(b"not a nifti")
    data = tiny_cohort.model_copy(update={"root": broken})
    cfg = load_config(None, TINY + ["federation.rounds=1", "federation.min_sites=1"]).model_copy(update={"data": data})
    lines = []
    run_federation(LocalGrid(3), cfg, RunDir(tmp_path / "run"), log=lines.append)
    failed = [r for r in RunDir(tmp_path / "run").records() if "error" in r]
    assert failed and all(r["site"] == "B" for r in failed)
    assert any("site B" in line and "<path>" in line for line in lines)  # the problem, not the path
    assert not any("scan.nii.gz" in line or str(broken) in line for line in lines)

    strict = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_sites": 2})})
    with pytest.raises(FederationError, match="only 1 of 2 training sites are usable"):
        run_federation(LocalGrid(3), strict, RunDir(tmp_path / "strict"), log=lambda _: None)
    status = RunDir(tmp_path / "strict").status()
    assert status["status"] == "failed" and "min_sites=2" in status["error"]
    assert RunDir(tmp_path / "strict").last_checkpoint() is None


def test_client_that_raises_while_training(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "train.device=cuda:7")  # no such device: training raises
    lines = []
    with pytest.raises(FederationError, match="only 0 of 2 training sites sent a usable update"):
        run_federation(LocalGrid(3), cfg, RunDir(tmp_path / "run"), log=lines.append)
    failed = [r for r in RunDir(tmp_path / "run").records() if "error" in r]
    assert {(r["round"], r["site"], r["phase"]) for r in failed} == {(1, "A", "train"), (1, "B", "train")}
    assert all(r["error"].startswith(f"site {r['site']}: ") for r in failed)
    assert any(line.startswith("round 1: site A FAILED (train)") for line in lines)
