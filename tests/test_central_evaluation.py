"""Central evaluation on a dataset the server holds (evaluation.server_data): scored exactly as a
held-out site scores its own data, recorded as site "server", kept out of the sites' mean."""

import numpy as np
import pytest

from medgen.evaluation.report import build_report
from medgen.server.errors import FederationError
from medgen.server.rundir import RunDir
from test_federation import federate, tiny_cfg, tiny_cohort  # noqa: F401  (fixture)


def test_server_data_is_scored_like_a_heldout_site(tiny_cohort, tmp_path):
    # the server holds a copy of held-out site C's folder: same data, same model, same numbers
    cfg = tiny_cfg(tiny_cohort, "federation.rounds=1", "train.val_fraction=0.5",
                   f"evaluation.server_data={tiny_cohort.root / 'C'}")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    federate(cfg, run.path)
    evaluated = {r["site"]: r for r in run.records() if r["phase"] == "evaluate"}
    server, site_c, mean = evaluated["server"], evaluated["C"], evaluated["global"]
    for key in ("loss", "num-examples", "pixel-auroc", "radfd-healthy", "slice-auroc"):
        assert server[key] == pytest.approx(site_c[key], rel=1e-6), key
    assert mean["sites"] == 3  # A, B, C: the server's own data is not a site
    assert mean["num-examples"] == sum(evaluated[s]["num-examples"] for s in "ABC")
    # the sample sizes behind each distance: per site, and added up (not averaged) in the mean
    assert server["n-real-healthy"] == site_c["n-real-healthy"] == site_c["n-generated-healthy"] >= 4
    assert mean["n-real-healthy"] == sum(evaluated[s]["n-real-healthy"] for s in "ABC")
    assert 0 <= site_c["ms-ssim-real-healthy"] <= 1
    with np.load(run.path / "evaluation" / "round-0001" / "server.npz") as arrays:
        assert "overlay-images" in arrays  # its images are at the server already
    with np.load(run.path / "evaluation" / "round-0001" / "C.npz") as arrays:
        assert "overlay-images" not in arrays  # site C does not share images
    build_report(run.path)
    assert "does not share images" not in (run.path / "report" / "site-server.html").read_text()


def test_unusable_server_data_stops_before_any_round(tiny_cohort, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_cfg(tiny_cohort, f"evaluation.server_data={empty}")
    with pytest.raises(FederationError, match=f"evaluation.server_data={empty}"):
        federate(cfg, tmp_path / "run")
    assert RunDir(tmp_path / "run").last_checkpoint() is None
