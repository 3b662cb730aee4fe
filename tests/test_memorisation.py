"""The memorisation audit: exact nearest neighbours, a copying generator is flagged, a generator of
fresh slices is not, and the audit reaches the run's metrics and report."""

import json

import numpy as np
import pytest
import torch

from medgen.config import ConfigError, load_config
from medgen.data.dataset import load_site
from medgen.data.errors import DataError
from medgen.data.phantom import synthesize_cohort
from medgen.evaluation import memorisation
from medgen.evaluation.evaluate import evaluate_checkpoint
from medgen.evaluation.report import build_report
from medgen.models.base import GenerativeModel
from medgen.server.rundir import RunDir
from test_federation import TINY, federate
from test_report import Page


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One phantom site (A) of 5 subjects."""
    root = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(root, ["A"], 5, seed=3)
    return root


def small_cfg(cohort, *extra):
    return load_config(None, TINY + ["sites.train=[A]", "sites.heldout=[]", f"data.root={cohort}",
                                     f"data.cache_dir={cohort / 'cache'}", *extra])


@pytest.fixture(scope="module")
def splits(cohort):
    """Site A at 32 x 32: 3 training subjects, 1 held-out, 1 'fresh' (in neither set)."""
    data = load_site(cohort / "A", small_cfg(cohort).data)
    subjects = sorted(set(data.subjects.tolist()))
    part = lambda names: data.subset(np.isin(data.subjects, names))  # noqa: E731
    return part(subjects[:3]), part(subjects[3:4]), part(subjects[4:])


class StoredSlices(GenerativeModel):
    """A generator that returns (noisy) copies of the slices it stores; its loss on an image is the
    squared distance to the nearest stored slice: a perfect memoriser of its set."""

    family, private_networks = "stored", ()

    def __init__(self, images, noise=0.0):
        self.images, self.noise, self.networks = torch.from_numpy(images), noise, {}

    def sample(self, labels, generator=None):
        idx = torch.randint(len(self.images), (len(labels),), generator=generator)
        out = self.images[idx] + self.noise * torch.randn(self.images[idx].shape, generator=generator)
        return out.clamp(0, 1).unsqueeze(1)

    def evaluate(self, images, labels):
        d2 = ((images[:, 0, None] - self.images[None]) ** 2).flatten(2).mean(2)
        return {"loss": float(d2.min(1).values.mean())}

    def make_optimizers(self):
        return {}

    def train_step(self, *args, **kwargs):
        raise NotImplementedError

    def anomaly_map(self, images, brain=None, **setting):
        raise NotImplementedError


def _samples(model, n=48):
    return model.sample(torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(0)).numpy()[:, 0]


def test_nearest_neighbours_equal_brute_force():
    rng = np.random.default_rng(0)
    queries, reference = rng.random((37, 12, 12)), rng.random((300, 12, 12))
    reference[5] = queries[2]  # an exact copy: distance 0
    dist, index = memorisation.nearest(queries, reference, chunk=10)
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).mean((2, 3)))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-9, atol=1e-7)
    np.testing.assert_array_equal(index, brute.argmin(1))
    assert index[2] == 5 and dist[2] < 1e-6
    with pytest.raises(ValueError, match="at least one reference"):
        memorisation.nearest(queries, reference[:0])


def test_membership_auc_is_mann_whitney():
    assert memorisation.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert memorisation.auc([0, 1], [2, 3]) == 0.0
    assert memorisation.auc([1, 2], [1, 2]) == 0.5  # ties count one half
    members, others = np.random.default_rng(1).random(30), np.random.default_rng(2).random(40)
    pairs = (members[:, None] > others[None]).mean()
    assert memorisation.auc(members, others) == pytest.approx(pairs)


def test_copying_generator_is_flagged_fresh_one_is_not(splits):
    train, heldout, fresh = splits
    copier = StoredSlices(train.images)
    metrics, arrays = memorisation.audit(_samples(copier), train, heldout, ratio=0.5, share_images=True)
    assert metrics["memorisation-fraction"] == 1.0 and metrics["nn-train-rms"] < 1e-6
    assert metrics["memorisation-baseline"] < 0.1  # real unseen slices are not flagged
    assert memorisation.membership_auc(copier, train, heldout, n=40, seed=0) == 1.0
    assert arrays["memorisation-generated"].shape == (memorisation.PAIRS, 32, 32)
    np.testing.assert_array_equal(arrays["memorisation-generated"], arrays["memorisation-train"])
    np.testing.assert_allclose(arrays["memorisation-pair-d-train"], 0, atol=1e-6)

    near_copies = StoredSlices(train.images, noise=0.01)  # a copy plus a little noise is still a copy
    assert memorisation.audit(_samples(near_copies), train, heldout, 0.5)[0]["memorisation-fraction"] > 0.9

    fresh_gen = StoredSlices(fresh.images)
    metrics, arrays = memorisation.audit(_samples(fresh_gen), train, heldout, ratio=0.5)
    assert metrics["memorisation-fraction"] <= 0.1 and metrics["memorisation-ratio-median"] > 0.6
    assert "memorisation-generated" not in arrays  # numbers only unless the site shares images
    assert 0.2 < memorisation.membership_auc(fresh_gen, train, heldout, n=40, seed=0) < 0.8


def test_audit_in_the_sites_evaluation_metrics_and_report(cohort, tmp_path):
    cfg = small_cfg(cohort, "federation.rounds=1", "evaluation.share_images=true", "evaluation.max_samples=8")
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    federate(cfg, run.path)
    record = [r for r in run.records() if r["phase"] == "evaluate" and r["site"] == "A"][-1]
    for key in ("memorisation-fraction", "memorisation-baseline", "mia-auc", "nn-train-rms"):
        assert 0.0 <= record[key] <= (1.0 if key != "nn-train-rms" else 2.0), key
    arrays = np.load(run.path / "evaluation" / "round-0001" / "A.npz")
    assert arrays["memorisation-generated"].shape[1:] == (32, 32)
    assert len(arrays["memorisation-ratios"]) == record["memorisation-samples"]
    build_report(run.path)
    final = json.loads((run.path / "report" / "metrics.json").read_text())["final"]
    assert final["A"]["memorisation-fraction"] == record["memorisation-fraction"]
    page = Page((run.path / "report" / "site-A.html").read_text())
    assert "Privacy and memorisation" in page.headings and f"{record['mia-auc']:.4g}" in page.cells
    assert page.images >= 3  # ratio histogram + closest pairs (+ curves)

    # `medgen evaluate` on the training site's folder: the run's own split gives the same audit
    with pytest.raises(ConfigError, match=r"--set model.width=32: .*model.anomaly_t"):
        evaluate_checkpoint(run.last_checkpoint(), cohort / "A", overrides=["model.width=32"], log=lambda _: None)
    scored = evaluate_checkpoint(run.last_checkpoint(), cohort / "A", out=tmp_path / "eval", log=lambda _: None,
                                 overrides=["model.inversion_steps=3"])  # inference-only: allowed
    assert "inversion_steps: 3" in (scored.path / "config.yaml").read_text()
    foreign = torch.load(run.last_checkpoint(), weights_only=True)  # e.g. written by another medgen version
    foreign["model"] = {k: v for k, v in foreign["model"].items() if k != "vae.stem.weight"}
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match=r"foreign.pt: its weights do not fit the vae model .*Missing key"):
        evaluate_checkpoint(tmp_path / "foreign.pt", cohort / "A", out=tmp_path / "e2", log=lambda _: None)
    assert not (tmp_path / "e2").exists()
    again = [r for r in scored.records() if r["phase"] == "evaluate"][-1]
    assert again["site"] == "A" and again["memorisation-baseline"] == record["memorisation-baseline"]
    assert "Privacy and memorisation" in Page((scored.path / "report" / "site-A.html").read_text()).headings
