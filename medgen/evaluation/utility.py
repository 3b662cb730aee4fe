"""`medgen utility`: is what the generator makes worth training on? A small healthy / lesion slice
classifier is trained on

    real            the real slices of the training subjects
    synthetic       as many generated slices of each class as there are real ones
    real+synthetic  both (augmentation)

and tested on real slices of other subjects ("train on synthetic, test on real"). Subjects:
for a training site of the checkpoint's run the generator trained on its training subjects, so the
test slices are its validation subjects (the run's own split); for any other folder its subjects are
split in two (``test_fraction``), lesion and healthy subjects each. Every arm trains from the same
initialisation, seed by seed, for the same steps with class-balanced batches; the numbers are the
mean and standard deviation over ``repeats`` seeds, beside the references on the same test slices:
chance (AUROC 0.5, AUPRC = the lesion-slice prevalence) and a score that needs no model (the
slice's brain area). With ``evaluation.utility: true`` every site runs the same test on its own
slices in the final evaluation and sends the numbers only (:func:`site_metrics`).

``medgen utility`` writes ``utility.json`` (strict JSON) to the output folder, with n and the
subjects of each part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medgen import logs, strictjson
from medgen.config import ConfigError
from medgen.data.dataset import HEALTHY, LESION, SiteSlices, load_site
from medgen.evaluation.anomaly import auroc, average_precision
from medgen.evaluation.samples import generate
from medgen.fileio import atomic_write

ARMS = ("real", "synthetic", "real+synthetic")
SAMPLE_BATCH = 64


@dataclass(frozen=True)
class Settings:
    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    repeats: int = 3
    test_fraction: float = 0.5


class SliceClassifier(nn.Module):
    """(N, 1, S, S) slices in [0, 1] -> (N,) logits of "the slice holds a lesion": three convolution
    blocks (to S/4), then the maximum and the mean over positions (a lesion is small: the
    mean alone dilutes it), then a linear layer."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, c = [], 1
        for w, stride in ((width, 2), (2 * width, 2), (2 * width, 1)):
            layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1), nn.GroupNorm(4, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1)).squeeze(1)


def split(data: SiteSlices, train_sites: list[str], val_fraction: float, test_fraction: float,
          seed: int) -> tuple[SiteSlices, SiteSlices, str]:
    """(training part, test part, how they were chosen), disjoint by subject; ConfigError naming
    --data when either part lacks a lesion or a healthy slice."""
    if data.site in train_sites:
        train, test = data.split_subjects(val_fraction, seed)
        how = "test: the validation subjects of a training site of the run (the generator never trained on them)"
    else:
        train, test = data.split_subjects(test_fraction, seed)
        how = f"the folder's subjects split {1 - test_fraction:g} / {test_fraction:g} (lesion and healthy apart)"
    for name, part in (("training", train), ("test", test)):
        held = set(part.labels.tolist())
        if held != {HEALTHY, LESION}:
            missing = "lesion" if LESION not in held else "healthy"
            raise ConfigError(f"--data {data.site}: the {name} part ({len(set(part.subjects.tolist()))} subjects) "
                              f"has no {missing} slice; the utility test needs lesion and healthy subjects on both "
                              f"sides ({len(data.lesion_subjects)} lesion subjects in the folder)")
    return train, test, how


def synthetic_like(model, labels: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As many generated slices of each class as ``labels`` holds: (images (n, 1, S, S), labels (n,))."""
    images, out = [], []
    for c in (HEALTHY, LESION):
        left = int((labels == c).sum())
        for k in range(0, left, SAMPLE_BATCH):
            x, y = generate(model, min(SAMPLE_BATCH, left - k), seed + 1000 * c + k, classes=(c,))
            images.append(x), out.append(y)
    return torch.cat(images).float().clamp(0, 1), torch.cat(out)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, settings: Settings, seed: int) -> SliceClassifier:
    """A :class:`SliceClassifier` trained with class-balanced batches and random flips."""
    torch.manual_seed(seed)
    net = SliceClassifier()
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr)
    weights = torch.where(labels == LESION, 1.0 / (labels == LESION).sum(), 1.0 / (labels != LESION).sum())
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(settings.steps):
        idx = torch.multinomial(weights, settings.batch_size, replacement=True, generator=generator)
        x = images[idx]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), (labels[idx] == LESION).float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def scores(net: SliceClassifier, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net(images[k:k + 256]) for k in range(0, len(images), 256)]).numpy()


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": v.tolist()}


def arm_scores(model, train: SiteSlices, test: SiteSlices, settings: Settings, seed: int) -> dict:
    """The three arms trained on ``train`` (and as many samples per class), tested on ``test``:
    per arm and metric the values over seeds, the augmentation gain, the references, the times."""
    real_x, real_y = torch.from_numpy(train.images)[:, None], torch.from_numpy(train.labels)
    test_x, test_y = torch.from_numpy(test.images)[:, None], test.labels == LESION
    start = time.perf_counter()
    syn_x, syn_y = synthetic_like(model, train.labels, seed)
    sampling_s = time.perf_counter() - start
    arms = {"real": (real_x, real_y), "synthetic": (syn_x, syn_y),
            "real+synthetic": (torch.cat([real_x, syn_x]), torch.cat([real_y, syn_y]))}
    results = {arm: {"auroc": [], "auprc": []} for arm in ARMS}
    start = time.perf_counter()
    for r in range(settings.repeats):
        for arm, (x, y) in arms.items():
            s = scores(train_classifier(x, y, settings, seed + r), test_x)
            results[arm]["auroc"].append(auroc(test_y, s))
            results[arm]["auprc"].append(average_precision(test_y, s))
    gain = [a - b for a, b in zip(results["real+synthetic"]["auroc"], results["real"]["auroc"])]
    area = test.brain.reshape(len(test), -1).sum(1).astype(np.float64)
    return {"metrics": {arm: {k: _summary(v) for k, v in m.items()} for arm, m in results.items()},
            "augmentation_gain_auroc": _summary(gain),
            "synthetic_slices": {"healthy": int((syn_y == HEALTHY).sum()), "lesion": int((syn_y == LESION).sum())},
            "references": {"chance_auroc": 0.5, "prevalence_auprc": float(test_y.mean()),
                           "brain_area_auroc": auroc(test_y, area)},
            "seconds": {"sampling": sampling_s, "training_and_testing": time.perf_counter() - start}}


def site_metrics(model, data: SiteSlices, cfg, settings: Settings = Settings()) -> dict[str, float]:
    """``evaluation.utility`` at a site: the arms on its own slices (the split of :func:`split`) as
    numbers only — ``utility-<arm>-auroc`` / ``-auprc`` (means over seeds), ``utility-gain-auroc``,
    the references and n. Empty when the site cannot hold the test (no lesion or healthy subject
    on one side)."""
    try:
        train, test, _ = split(data, cfg.sites.train, cfg.train.val_fraction, settings.test_fraction, cfg.seed)
    except ConfigError:
        return {}
    found = arm_scores(model, train, test, settings, cfg.seed)
    out = {f"utility-{arm}-{k}": m[k]["mean"] for arm, m in found["metrics"].items() for k in ("auroc", "auprc")}
    refs = found["references"]
    out.update({"utility-gain-auroc": found["augmentation_gain_auroc"]["mean"],
                "utility-reference-brain-area-auroc": refs["brain_area_auroc"],
                "utility-reference-prevalence": refs["prevalence_auprc"], "n-utility-seeds": float(settings.repeats),
                "n-utility-train-slices": float(len(train)), "n-utility-test-slices": float(len(test)),
                "n-utility-test-subjects": float(len(set(test.subjects.tolist())))})
    return out


def run_utility(checkpoint: str | Path, data_dir: str | Path, out: str | Path | None = None, site: str | None = None,
                settings: Settings = Settings(), overrides=(), log=logs.info) -> Path:
    """Train and test the three arms of the module docstring on a site folder; returns the output folder."""
    from medgen.evaluation.evaluate import load_trained, run_plan  # noqa: PLC0415  (evaluate imports site, site this)

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"--data {data_dir}: no such folder (give a site folder of NIfTI scans with lesion masks)")
    ckpt, cfg, model = load_trained(checkpoint, overrides)
    classes = run_plan(Path(checkpoint).resolve().parent.parent, cfg, int(ckpt["round"])).classes
    if LESION not in classes:
        raise ConfigError(f"--checkpoint {checkpoint}: no training site of its run held a lesion slice, so the "
                          f"lesion class never trained and its samples mean nothing")
    site = site or data_dir.resolve().name
    train, test, how = split(load_site(data_dir, cfg.data, site), cfg.sites.train, cfg.train.val_fraction,
                             settings.test_fraction, cfg.seed)
    log(f"utility of {checkpoint} ({cfg.model.family}, round {ckpt['round']}) on {data_dir}: {len(train)} real "
        f"training slices, {len(test)} test slices; sampling {len(train)} synthetic slices")
    record = {
        "checkpoint": str(checkpoint), "round": int(ckpt["round"]), "family": cfg.model.family, "data": str(data_dir),
        "site": site, "task": "healthy / lesion slice classification", "split": how,
        "parts": {name: {"slices": len(p), "lesion_slices": int((p.labels == LESION).sum()),
                         "subjects": sorted(set(p.subjects.tolist()))} for name, p in (("train", train), ("test", test))},
        "settings": vars(settings) | {"seed": cfg.seed, "classifier": SliceClassifier.__doc__},
        **arm_scores(model, train, test, settings, cfg.seed),
    }
    out = Path(out or Path("runs") / f"utility-{site}-{Path(checkpoint).stem}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "utility.json", lambda f: f.write((strictjson.dumps(record, indent=2) + "\n").encode()))
    log(table(record))
    return out


def table(record: dict) -> str:
    """The arms and the references as plain text."""
    ref = record["references"]
    lines = [f"{'arm':16}{'AUROC':>16}{'AUPRC':>16}   (test: {record['parts']['test']['slices']} slices, "
             f"{len(record['parts']['test']['subjects'])} subjects; {record['metrics']['real']['auroc']['n']} seeds)"]
    for arm, m in record["metrics"].items():
        lines.append(f"{arm:16}" + "".join(f"{m[k]['mean']:10.3f} ± {m[k]['std']:.3f}" for k in ("auroc", "auprc")))
    lines.append(f"{'chance':16}{0.5:10.3f}{'':8}{ref['prevalence_auprc']:10.3f}")
    lines.append(f"{'brain area':16}{ref['brain_area_auroc']:10.3f}")
    g = record["augmentation_gain_auroc"]
    lines.append(f"augmentation gain (real+synthetic - real), AUROC: {g['mean']:+.3f} ± {g['std']:.3f}")
    return "\n".join(lines)
