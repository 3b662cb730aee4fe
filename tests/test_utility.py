"""`medgen utility` (medgen/evaluation/utility.py): the subject split, the classifier, the scores,
the command and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST_DATA, make_plain_site
from medgen import strictjson
from medgen.cli.main import main
from medgen.config import ConfigError, load_config
from medgen.data.dataset import load_site
from medgen.evaluation.anomaly import auroc, average_precision
from medgen.evaluation.utility import ARMS, Settings, scores, split, train_classifier
from medgen.models import build_model
from medgen.server.rundir import RunDir


def test_auroc_and_average_precision_by_hand():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.3, 0.1])
    # positive-negative pairs ranked right: (0.9 > 0.8), (0.9 > 0.1), (0.3 > 0.1); wrong: (0.3 < 0.8)
    assert auroc(y, s) == pytest.approx(3 / 4)
    # thresholds 0.9 (P 1, R 1/2), 0.8 (P 1/2), 0.3 (P 2/3, R 1): AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision(y, s) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(auroc(np.zeros(3), np.arange(3.0))) and np.isnan(average_precision(np.zeros(3), np.arange(3.0)))


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 32-px squares; label 1 has a bright spot at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = 0.4 + 0.1 * torch.rand(n, 1, 32, 32, generator=g)
    y = torch.arange(n) % 2
    for i in torch.nonzero(y).flatten():
        r, c = torch.randint(4, 24, (2,), generator=g).tolist()
        x[i, 0, r:r + 4, c:c + 4] = 0.95
    return x, y


def test_the_classifier_learns_a_separable_task_and_not_a_shuffled_one():
    x, y = _blobs(128, seed=0)
    test_x, test_y = _blobs(64, seed=1)
    settings = Settings(steps=60)
    assert auroc(test_y.numpy() == 1, scores(train_classifier(x, y, settings, seed=0), test_x)) > 0.9
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert auroc(test_y.numpy() == 1, scores(train_classifier(x, shuffled, settings, seed=0), test_x)) < 0.8


def _cfg(tmp_path, *more):
    return load_config(None, ["model.width=4", "model.latent_dim=8", "data.image_size=32",
                              f"data.cache_dir={tmp_path / 'cache'}", *FAST_DATA, *more])


def test_the_parts_are_disjoint_by_subject_and_hold_both_classes(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_site(make_plain_site(tmp_path / "E", n_healthy=4, n_lesion=4), cfg.data, "E")
    for train_sites in (["A"], ["E"]):  # another folder; a training site of the run (its validation subjects)
        train, test, how = split(data, train_sites, val_fraction=0.5, test_fraction=0.5, seed=0)
        assert not set(train.subjects.tolist()) & set(test.subjects.tolist())
        assert len(train) + len(test) == len(data) and set(train.labels.tolist()) == set(test.labels.tolist()) == {0, 1}
        assert ("validation subjects" in how) == (train_sites == ["E"])
    healthy = load_site(make_plain_site(tmp_path / "F", n_healthy=4, n_lesion=0), cfg.data, "F")
    with pytest.raises(ConfigError, match="--data F: the training part .* has no lesion slice"):
        split(healthy, ["A"], 0.5, 0.5, seed=0)


def _checkpoint(tmp_path, lesion_slices: int | None = None):
    cfg = _cfg(tmp_path)
    run = RunDir(tmp_path / "run")
    path = run.save_checkpoint(1, build_model(cfg).state_dict(), {}, cfg)
    if lesion_slices is not None:  # what the run's training site said when it connected
        run.log(0, "A", "query", {"train-examples": 100, "train-lesion-slices": lesion_slices})
    return path


def test_utility_writes_every_arm_beside_its_references(tmp_path, capsys):
    site = make_plain_site(tmp_path / "E", n_healthy=4, n_lesion=4)
    out = tmp_path / "out"
    assert main(["utility", "--checkpoint", str(_checkpoint(tmp_path, lesion_slices=20)), "--data", str(site),
                 "--out", str(out), "--steps", "3", "--repeats", "2", "-q"]) == 0
    record = strictjson.loads((out / "utility.json").read_text())
    assert list(record["metrics"]) == list(ARMS) and record["family"] == "vae"
    for arm in ARMS:
        assert record["metrics"][arm]["auroc"]["n"] == 2 and 0 <= record["metrics"][arm]["auroc"]["mean"] <= 1
    train, test = record["parts"]["train"], record["parts"]["test"]
    assert not set(train["subjects"]) & set(test["subjects"]) and len(test["subjects"]) == 4
    assert record["synthetic_slices"]["lesion"] == train["lesion_slices"]
    assert record["synthetic_slices"]["healthy"] == train["slices"] - train["lesion_slices"]
    refs = record["references"]
    assert refs["chance_auroc"] == 0.5 and refs["prevalence_auprc"] == pytest.approx(test["lesion_slices"] / test["slices"])
    assert 0 <= refs["brain_area_auroc"] <= 1
    gain = record["augmentation_gain_auroc"]["values"]
    assert gain == pytest.approx(np.subtract(record["metrics"]["real+synthetic"]["auroc"]["values"],
                                             record["metrics"]["real"]["auroc"]["values"]).tolist())
    assert "utility.json" in capsys.readouterr().out


def test_utility_refuses_a_lesion_class_that_never_trained_and_a_missing_folder(tmp_path, capsys):
    site = make_plain_site(tmp_path / "E", n_healthy=2, n_lesion=2)
    checkpoint = _checkpoint(tmp_path, lesion_slices=0)
    assert main(["utility", "--checkpoint", str(checkpoint), "--data", str(site), "--out", str(tmp_path / "o")]) == 3
    assert "lesion class never trained" in capsys.readouterr().err
    assert main(["utility", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")]) == 3
    assert f"--data {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_site_sends_the_utility_numbers_only_when_asked_and_able(tmp_path):
    from medgen.evaluation.site import evaluate_site
    from medgen.evaluation.utility import site_metrics

    cfg = _cfg(tmp_path, "evaluation.max_samples=4", "evaluation.membership_inference=false")
    model = build_model(cfg)
    data = load_site(make_plain_site(tmp_path / "E", n_healthy=4, n_lesion=4), cfg.data, "E")
    found = site_metrics(model, data, cfg, Settings(steps=2, repeats=1))
    assert {f"utility-{arm}-auroc" for arm in ARMS} <= set(found) and found["n-utility-seeds"] == 1
    assert all(isinstance(v, float) for v in found.values())  # numbers only
    assert found["n-utility-train-slices"] + found["n-utility-test-slices"] == len(data)
    healthy = load_site(make_plain_site(tmp_path / "F", n_healthy=4, n_lesion=0), cfg.data, "F")
    assert site_metrics(model, healthy, cfg) == {}
    asked = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"utility": True})})
    with_utility, _ = evaluate_site(model, data, asked)
    without, _ = evaluate_site(model, data, cfg)
    assert "utility-real-auroc" in with_utility and not any(k.startswith("utility-") for k in without)
