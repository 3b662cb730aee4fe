"""One site's bad update never corrupts or stops the study: every attack replayed against the real
server loop (the real ClientApps on LocalGrid; only site C's reply is altered on its way back)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from medgen.server.errors import FederationError
from medgen.server.federation import run_federation
from medgen.server.rundir import RunDir, load_checkpoint
from medgen.server.validation import update_norm
from test_federation import LocalGrid, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)

THREE = ["sites.train=[A,B,C]", "sites.heldout=[]", "federation.rounds=1", "federation.min_sites=2",
         "federation.samples_per_class=0", "evaluation.membership_inference=false"]


class PoisonGrid(LocalGrid):
    """LocalGrid whose ``attack`` rewrites site C's training reply (None: C does not answer)."""

    def __init__(self, n_nodes: int, attack):
        super().__init__(n_nodes)
        self.attack = attack

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        out = []
        for reply in replies:
            if reply.has_content() and "arrays" in reply.content and str(reply.content["info"]["site"]) == "C":
                reply = self.attack(reply)
            if reply is not None:
                out.append(reply)
        return out


def _scaled(factor):
    def attack(reply):
        state = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: v * factor if v.is_floating_point() else v for k, v in state.items()})
        return reply
    return attack


def _float64_huge(reply):
    state = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord({k: torch.full(v.shape, 1e300, dtype=torch.float64)
                                           if v.is_floating_point() else v for k, v in state.items()})
    return reply


def _metric(key, value):
    def attack(reply):
        metrics = dict(reply.content["metrics"])
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
        reply.content["metrics"] = MetricRecord(metrics)
        return reply
    return attack


def _zero_weights_huge_count(reply):
    state = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord({k: torch.zeros_like(v) for k, v in state.items()})
    return _metric("num-examples", 1e12)(reply)


def _no_arrays(reply):
    del reply.content["arrays"]
    return reply


def _federate(cfg, tmp_path, name, attack):
    run = RunDir(tmp_path / name)
    run.create(cfg)
    lines = []
    state = run_federation(PoisonGrid(3, attack), cfg, run, log=lines.append)
    return state, run, lines


def _distance(a, b):
    return update_norm(a, b)


@pytest.fixture(scope="module")
def clean(tiny_cohort, tmp_path_factory):
    """The global model when site C sends nothing, and every site's honest update."""
    cfg = tiny_cfg(tiny_cohort, *THREE)
    state, run, _ = _federate(cfg, tmp_path_factory.mktemp("clean"), "run", lambda reply: None)
    return state


ATTACKS = {
    "float64 1e300 (Inf after a cast)": (_float64_huge, "dtype torch.float64"),
    "weights x 1e30": (_scaled(1e30), "max_update_ratio"),
    "weights x 1000": (_scaled(1000.0), "max_update_ratio"),
    "zero weights, num-examples 1e12": (_zero_weights_huge_count, "training slices the site declared"),
    "negative num-examples": (_metric("num-examples", -5.0), "num-examples must be a whole number >= 1"),
    "no num-examples": (_metric("num-examples", None), "num-examples must be a whole number >= 1"),
    "NaN loss": (_metric("loss", float("nan")), "metrics hold NaN"),
    "no weights": (_no_arrays, "malformed reply"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_poisoned_update_is_rejected_and_the_round_goes_on(tiny_cohort, tmp_path, clean, name):
    attack, reason = ATTACKS[name]
    cfg = tiny_cfg(tiny_cohort, *THREE)
    state, run, lines = _federate(cfg, tmp_path, "run", attack)
    assert run.status()["status"] == "completed"
    errors = [r["error"] for r in run.records() if r["site"] == "C" and "error" in r]
    assert errors and reason in errors[0], errors
    assert any("site C update REJECTED" in line or "site C update rejected" in line for line in lines)
    for key in clean:  # exactly the round without C
        assert torch.equal(state[key], clean[key]), key
    assert all(torch.isfinite(v).all() for v in load_checkpoint(run.last_checkpoint())["model"].values()
               if v.is_floating_point())


def test_clipping_bounds_a_large_update_instead(tiny_cohort, tmp_path, clean):
    cfg = tiny_cfg(tiny_cohort, *THREE, "federation.on_large_update=clip")
    state, run, _ = _federate(cfg, tmp_path, "run", _scaled(1000.0))
    warning = next(r["warning"] for r in run.records() if r["site"] == "C" and "warning" in r)
    assert "update clipped to norm" in warning
    start = tiny_cfg(tiny_cohort, *THREE)
    from medgen.models import build_model

    initial = build_model(start).state_dict()
    # C pulls the mean at most by its clipped norm / 3 sites
    bound = float(warning.split("clipped to norm ")[1].split(":")[0])
    assert _distance(state, clean) <= bound / 3 * 1.01 + _distance(clean, initial)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_hold_against_an_unbounded_attacker(tiny_cohort, tmp_path, strategy):
    """Without the norm bound, a ×1000 site moves FedAvg far; the robust rules stay within the
    honest sites' spread of the clean result (all three sites honest)."""
    extra = [f"federation.strategy={strategy}", "federation.max_update_ratio=null", "federation.trim_fraction=0.34"]
    honest_cfg = tiny_cfg(tiny_cohort, *THREE, *extra)
    honest, _, _ = _federate(honest_cfg, tmp_path, "honest", lambda reply: reply)
    poisoned, run, _ = _federate(honest_cfg, tmp_path, "poisoned", _scaled(1000.0))
    fedavg_cfg = tiny_cfg(tiny_cohort, *THREE, "federation.max_update_ratio=null")
    fedavg, _, _ = _federate(fedavg_cfg, tmp_path, "fedavg", _scaled(1000.0))
    from medgen.models import build_model

    spread = _distance(honest, build_model(honest_cfg).state_dict())  # how far one honest round moves
    assert _distance(poisoned, honest) <= spread, strategy
    assert _distance(fedavg, honest) > 50 * spread  # the attack is real


def test_bulyan_needs_enough_sites():
    from medgen.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="bulyan needs at least 4 x federation.num_malicious"):
        load_config(None, ["federation.strategy=bulyan", "sites.train=[A,B,C]"])
    cfg = load_config(None, ["federation.strategy=bulyan", "federation.num_malicious=0", "sites.train=[A,B,C]"])
    from medgen.server.strategy import Robust, Update

    current = {"w": torch.zeros(4), "n": torch.tensor(3)}
    ups = [Update(s, {"w": torch.full((4,), float(i)), "n": torch.tensor(9)}, 1) for i, s in enumerate("ABC")]
    out = Robust("bulyan", cfg.federation.num_malicious).aggregate(current, ups)
    torch.testing.assert_close(out["w"], torch.full((4,), 1.0), check_dtype=False)  # f = 0: the plain mean
    assert out["n"].item() == 3
    few = Robust("bulyan", 1)
    assert torch.equal(few.aggregate(current, ups)["w"], current["w"]) and few.round_metrics() == \
        {"aggregation-skipped": 1.0}


def test_a_non_finite_global_model_is_never_written(tiny_cohort, tmp_path):
    """Round 1 is clean; round 2's aggregate overflows (central DP noise far beyond float32): the
    round fails and round 1's checkpoint stays the one --resume uses."""
    first = tiny_cfg(tiny_cohort, *THREE)
    run = RunDir(tmp_path / "run")
    run.create(first)
    run_federation(PoisonGrid(3, lambda r: r), first, run, log=lambda _: None)
    bad = tiny_cfg(tiny_cohort, *THREE, "federation.rounds=2", "privacy.central.enabled=true",
                   "privacy.central.noise_multiplier=1e39")
    with pytest.raises(FederationError, match="NaN or Inf"):
        run_federation(PoisonGrid(3, lambda r: r), bad, run, log=lambda _: None)
    assert run.last_checkpoint().name == "round-0001.pt" and run.status()["status"] == "failed"
    assert all(math.isfinite(float(v.abs().max())) for v in load_checkpoint(run.last_checkpoint())["model"].values()
               if v.is_floating_point() and v.numel())


def test_a_node_naming_an_unknown_site_is_ignored(tiny_cohort, tmp_path):
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "federation.samples_per_class=0", "sites.train=[A]",
                   "sites.heldout=[]")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    lines = []
    grid = LocalGrid(2)  # node 101 is partition 1, which the study's one site cannot name
    grid.contexts[101].node_config.update({"site": "Z", "data-dir": str(tmp_path), "state-dir": str(tmp_path / "z")})
    run_federation(grid, cfg, run, log=lines.append)
    assert run.status()["status"] == "completed"
    assert any("says it is site 'Z'" in line and "ignored" in line for line in lines)


# ----------------------------------------------------------------------------- run directories
def test_a_refused_resume_leaves_the_run_directory_as_it_was(tiny_cohort, tmp_path):
    from medgen.data.errors import DataError
    from medgen.server.rundir import open_run

    cfg = tiny_cfg(tiny_cohort, *THREE)
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run_federation(PoisonGrid(3, lambda r: r), cfg, run, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    with pytest.raises(DataError, match="do not fit"):
        open_run(None, None, run.path, ["model.width=32"])
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before
    cfg2, again = open_run(None, None, run.path, ["federation.rounds=2"])  # a plain resume still works
    assert cfg2.federation.rounds == 2 and again.path == run.path


def test_a_cut_metrics_line_and_a_damaged_checkpoint_are_survived(tiny_cohort, tmp_path, capsys):
    cfg = tiny_cfg(tiny_cohort, *THREE, "federation.rounds=2")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    run_federation(PoisonGrid(3, lambda r: r), cfg, run, log=lambda _: None)
    n = len(run.records())
    with run.metrics_file.open("a") as f:
        f.write('{"round": 3, "site": "A", "pha')  # a crash mid-write
    assert len(run.records()) == n and "the last line is cut" in capsys.readouterr().err
    from medgen.cli.main import main

    assert main(["report", str(run.path)]) == 0  # the report command reads past it too
    assert "report:" in capsys.readouterr().out
    (run.checkpoints / "round-0002.pt").write_bytes(b"torn")  # the newest checkpoint is damaged
    (run.checkpoints / ".round-0003.pt.abc.tmp").write_bytes(b"partial")
    lines = []
    from medgen.server.rundir import open_run

    resumed_cfg, resumed = open_run(None, None, run.path, [])
    assert not (run.checkpoints / ".round-0003.pt.abc.tmp").exists()
    run_federation(PoisonGrid(3, lambda r: r), resumed_cfg.model_copy(update={"data": cfg.data}), resumed,
                   log=lines.append)
    assert any("round-0002.pt" in line and "using the one before" in line for line in lines)
    assert any("resuming after round 1" in line for line in lines)
    assert load_checkpoint(run.last_checkpoint())["round"] == 2 and run.status()["status"] == "completed"


def test_a_file_as_out_and_a_missing_device_are_clear_errors(tiny_cohort, tmp_path):
    from medgen.client.task import check_device
    from medgen.config import ConfigError, load_config

    (tmp_path / "file").write_text("x")
    with pytest.raises(FederationError, match="a file, not a run directory"):
        RunDir(tmp_path / "file").create(tiny_cfg(tiny_cohort))
    with pytest.raises(ConfigError, match="train.device: a torch device"):
        load_config(None, ["train.device=tpu:9"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda:7: this machine has"):
            check_device(load_config(None, ["train.device=cuda:7"]))
    (tmp_path / "bad.yaml").write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bad.yaml")


def test_a_damaged_slice_cache_entry_is_rebuilt(tmp_path):
    import numpy as np

    from conftest import FAST_DATA, make_plain_site
    from medgen.config import load_config
    from medgen.data.dataset import load_site

    folder = make_plain_site(tmp_path / "site", n_healthy=1, n_lesion=0)
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *FAST_DATA]).data
    first = load_site(folder, cfg)
    entry = next((tmp_path / "cache").rglob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:200])  # a zip cut short: BadZipFile
    again = load_site(folder, cfg)
    np.testing.assert_array_equal(again.images, first.images)
    with np.load(entry) as z:
        assert z["images"].shape == first.images.shape


def test_skipped_files_are_counted_in_the_log_status_and_report(tiny_cohort, tmp_path, capfd):
    """With data.on_bad_file=skip a site trains on its good scans; the server learns how many it
    skipped (never their names), in its terminal, status.json and the report; the site's own log
    names them."""
    folder = tmp_path / "cohort"
    for site in "ABC":
        (folder / site).mkdir(parents=True)
        for f in (tiny_cohort.root / site).iterdir():
            if f.name != "manifest.csv":
                (folder / site / f.name).symlink_to(f)
    (folder / "B" / "sub-099.nii.gz").write_bytes(b"not a nifti")
    cfg = tiny_cfg(tiny_cohort, *THREE)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": folder, "on_bad_file": "skip"})})
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    lines = []
    run_federation(PoisonGrid(3, lambda r: r), cfg, run, log=lines.append)
    assert run.status()["skipped-files"] == {"B": 1}
    assert any("site B: connected" in line and "1 bad file(s) skipped" in line for line in lines)
    assert not any("sub-099" in line for line in lines)
    assert "site B: skipped:" in capfd.readouterr().err
    from medgen.evaluation.report import build_report

    assert "bad files skipped" in build_report(run.path).read_text()
