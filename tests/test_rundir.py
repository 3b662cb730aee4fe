"""Checkpoints: what they hold, and that older ones still load."""

from importlib.metadata import version

import torch

from medgen.config import dump_config, load_config
from medgen.server.rundir import RunDir, load_checkpoint


def test_a_checkpoint_says_what_software_wrote_it_and_an_older_one_still_loads(tmp_path):
    cfg = load_config(None)
    run = RunDir(tmp_path / "run")
    weights = {"w": torch.arange(4.0)}
    written = load_checkpoint(run.save_checkpoint(1, weights, {}, cfg))
    assert written["provenance"]["medgen"] == version("medgen")
    assert written["provenance"]["libraries"]["torch"] == version("torch") == torch.__version__
    assert written["provenance"]["python"].count(".") == 2

    # as medgen wrote them before checkpoints held their provenance
    old = {"round": 2, "model": weights, "aggregator": {}, "config": dump_config(cfg), "family": cfg.model.family}
    torch.save(old, run.checkpoints / "round-0002.pt")
    path, loaded = run.last_good_checkpoint()
    assert path.name == "round-0002.pt" and loaded["round"] == 2 and "provenance" not in loaded
    assert torch.equal(loaded["model"]["w"], weights["w"])
