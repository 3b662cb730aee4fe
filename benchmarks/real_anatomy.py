"""Lesion detection on real anatomy: synthetic lesions implanted into held-apart IXI heads, beside
the same benchmark on the phantom, with every trivial reference on the same pixels.

    python benchmarks/real_anatomy.py [--families vae,ddpm] [--cohorts ixi,phantom] [--out DIR] [--train-seed N]
    python benchmarks/real_anatomy.py --references-only [--cohorts ixi,phantom]

``--references-only`` trains nothing: it builds the same sites and scores the same slices of D
with the no-model references only, the intensity outlier both two-sided (the reference since
2026-12-03) and symmetric (|x - median|, before), into benchmarks/results/real_anatomy_outlier.json.

Per cohort: three training sites (healthy) and one held-out site D; on IXI, D's subjects are
split apart by subject (`medgen data split`) and half of them get implanted lesions (`medgen
data implant`). Each family trains federated (`medgen simulate`, the config of examples/ixi.yaml:
the default CPU budget). Its final global model then scores D's slices: the threshold is fixed on
half of D's healthy subjects (never on a mask), the other subjects are scored. That split (and the
600-slice draws) comes from the seed of examples/ixi.yaml, never from the seed a model trained with:
``--train-seed N`` trains with ``seed=N`` (weights' initialisation, batches, each site's train/val
subjects, the model's own noise) into the results key FAMILY-seedN, scored on the same slices of D
with the same implanted lesions as the seed-0 rows (sites and lesions come from `medgen data split`
and `implant` at their own seed 0). Every
post-processing variant is scored on the same slices, and so are the references:

- chance: AUROC 0.5; AUPRC = the lesion prevalence among the scored brain pixels;
- all-brain: the Dice of calling every brain pixel lesion; brain area as a slice score;
- intensity outlier (no model), post-processed like each variant: each side's deviation from the
  median healthy brain intensity over that side's healthy quantile (two-sided since 2026-12-03;
  |x - median| before), the score a threshold on the image itself would give — a model that
  does not beat it has learnt nothing about anatomy that helps.

(``medgen.evaluation.anomaly.references``, the same numbers every report shows.)

Needs ../shared/data/ixi-t1 for the IXI cohort. Results: benchmarks/results/real_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from families import overrides as family_overrides  # noqa: E402

from medgen.config import load_config, load_config_text  # noqa: E402
from medgen.data.dataset import load_site  # noqa: E402
from medgen.evaluation import anomaly  # noqa: E402
from medgen.evaluation.site import split_for_threshold  # noqa: E402
from medgen.models import build_model  # noqa: E402
from medgen.server.rundir import load_checkpoint, load_weights  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi-t1"
MEDGEN = [sys.executable, "-m", "medgen.cli.main"]
VARIANTS = {"as configured": (0, 0), "median 5": (5, 0), "eroded 2": (0, 2), "median 5 + eroded 2": (5, 2)}
MAX_SLICES = 600  # per set (calibration, scored): bounds the GAN's latent inversion


def make_sites(cohort: str, out: Path) -> Path:
    sites = out / cohort / "sites"
    if sites.exists():
        return sites
    if cohort == "ixi":
        subprocess.run([*MEDGEN, "data", "split", str(IXI / "scans"), "--brain-masks", str(IXI / "brainmasks"),
                        "--out", str(sites), "--sites", "A,B,C,D-healthy"], check=True)
        subprocess.run([*MEDGEN, "data", "implant", str(sites / "D-healthy"), "--out", str(sites / "D")], check=True)
    else:
        subprocess.run([*MEDGEN, "data", "synth", "--out", str(sites), "--config", str(ROOT / "examples/phantom.yaml")],
                       check=True)
    return sites


def train(cohort: str, family: str, sites: Path, out: Path, extra: list[str], tag: str) -> Path:
    run = out / cohort / f"run-{family.replace(':', '-')}{'-' + tag if tag else ''}"
    if (run / "status.json").exists() and json.loads((run / "status.json").read_text()).get("status") == "completed":
        return run
    sets = [f"data.root={sites}", "evaluation.share_images=false", *family_overrides(family), *extra]
    start = time.perf_counter()
    subprocess.run([*MEDGEN, "simulate", "--config", str(ROOT / "examples/ixi.yaml"), "--out", str(run),
                    *[a for s in sets for a in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
    (run / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run


def maps_of(model, images, brain) -> np.ndarray:
    out = []
    for at in range(0, len(images), 32):
        x = torch.from_numpy(images[at: at + 32]).unsqueeze(1)
        b = torch.from_numpy(brain[at: at + 32]).unsqueeze(1)
        out.append(model.anomaly_map(x, b).numpy()[:, 0])
    return np.concatenate(out)


def score(maps_calib, maps, data, calib_idx, idx, quantile: float) -> dict:
    threshold = anomaly.threshold_from_healthy(maps_calib, data.brain[calib_idx], quantile)
    report = anomaly.anomaly_report(maps, data.lesion[idx], data.brain[idx], data.labels[idx], threshold)
    return {k: round(float(v), 4) for k, v in report.items()}


def split_seed() -> int:
    """The seed of the evaluation split of D: examples/ixi.yaml's, whatever seed the model trained with."""
    return load_config(str(ROOT / "examples/ixi.yaml")).seed


def evaluate(run: Path, sites: Path) -> dict:
    checkpoint = sorted((run / "checkpoints").glob("round-*.pt"))[-1]
    ckpt = load_checkpoint(checkpoint)
    cfg = load_config_text(ckpt["config"])
    model = build_model(cfg)
    load_weights(model, ckpt, checkpoint)
    data, calib_idx, idx = _d_slices(cfg, sites, split_seed())
    start = time.perf_counter()
    raw_calib, raw = maps_of(model, data.images[calib_idx], data.brain[calib_idx]), \
        maps_of(model, data.images[idx], data.brain[idx])
    seconds = (time.perf_counter() - start) / (len(idx) + len(calib_idx))
    q = cfg.evaluation.healthy_quantile
    result = {"checkpoint": str(checkpoint.relative_to(run.parent.parent)), "train_seed": cfg.seed,
              "split_seed": split_seed(), "n_scored_slices": int(len(idx)),
              "n_scored_lesion_slices": int((data.labels[idx] == 1).sum()),
              "n_calibration_slices": int(len(calib_idx)), "anomaly_map_s_per_slice": round(seconds, 4),
              "variants": {}}
    for name, (median, erode) in VARIANTS.items():
        post = [anomaly.postprocess(m, data.brain[i], median, erode) for m, i in ((raw_calib, calib_idx), (raw, idx))]
        outlier = anomaly.outlier_calibration(data.images[calib_idx], data.brain[calib_idx], q, median, erode)
        refs = anomaly.references(data.images[idx], data.lesion[idx], data.brain[idx], data.labels[idx],
                                  outlier, median, erode)
        result["variants"][name] = {"model": score(*post, data, calib_idx, idx, q),
                                    "intensity outlier": {k[len("outlier_"):]: round(float(v), 4)
                                                          for k, v in refs.items() if k.startswith("outlier_")}}
    result["references"] = {"chance pixel AUROC": 0.5, "chance slice AUROC": 0.5,
                            **{k: round(float(v), 4) for k, v in refs.items() if not k.startswith("outlier_")}}
    return result


def _d_slices(cfg, sites: Path, seed: int):
    """Site D's slices and the benchmark's (calibration, scored) indices, as :func:`evaluate` picks them
    (``seed``: the split's, :func:`split_seed`)."""
    data = load_site(sites / cfg.sites.heldout[0], cfg.data, cfg.sites.heldout[0])
    calib, scored = split_for_threshold(data, seed)
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.permutation(np.flatnonzero(calib))[:MAX_SLICES])
    return data, calib_idx, np.sort(rng.permutation(np.flatnonzero(scored))[:MAX_SLICES])


def references_only(sites: Path) -> dict:
    """No model: the references on the slices :func:`evaluate` scores (the config of examples/ixi.yaml
    with ``data.root``), the intensity outlier two-sided and symmetric, per post-processing variant."""
    cfg = load_config(str(ROOT / "examples/ixi.yaml"), [f"data.root={sites}"])
    data, calib_idx, idx = _d_slices(cfg, sites, split_seed())
    q = cfg.evaluation.healthy_quantile
    les, br = data.lesion[idx] & data.brain[idx], data.brain[idx]
    level = float(np.median(data.images[calib_idx][data.brain[calib_idx]]))
    x = data.images[idx]
    result = {"n_scored_slices": int(len(idx)), "n_scored_lesion_slices": int((data.labels[idx] == 1).sum()),
              "n_calibration_slices": int(len(calib_idx)), "healthy_quantile": q,
              "lesion_pixels": int(les.sum()), "lesion_pixels_brighter_than_median": int((x[les] > level).sum()),
              "lesion_pixels_above_0.9": int((x[les] > 0.9).sum()), "variants": {}}
    for name, (median, erode) in VARIANTS.items():
        outlier = anomaly.outlier_calibration(data.images[calib_idx], data.brain[calib_idx], q, median, erode)
        row = {"calibration": [round(float(v), 4) for v in outlier]}
        for kind, calibration in (("two-sided", outlier), ("symmetric", anomaly.Outlier(outlier.level, outlier.threshold))):
            refs = anomaly.references(x, data.lesion[idx], br, data.labels[idx], calibration, median, erode)
            row[kind] = {k[len("outlier_"):]: round(float(v), 4) for k, v in refs.items() if k.startswith("outlier_")}
        result["variants"][name] = row
    result["references"] = {k: round(float(v), 4) for k, v in refs.items() if not k.startswith("outlier_")}
    return result


def distances(run: Path) -> dict:
    """The held-out site's final sample-quality numbers from the run's own evaluation: RadFD-20 / KID,
    precision / recall and MS-SSIM diversity of healthy samples against D's real healthy slices, the
    real pairs' MS-SSIM beside it, and n of each set (n = evaluation.max_samples generated)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r.get("site") == "D" and r.get("phase") == "evaluate" and "radfd-healthy" in r]
    keys = ("radfd-healthy", "kid-healthy", "precision-healthy", "recall-healthy", "ms-ssim-healthy",
            "ms-ssim-real-healthy", "n-generated-healthy", "n-real-healthy")
    return {k: round(float(final[-1][k]), 4) for k in keys if final and k in final[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="vae")
    parser.add_argument("--cohorts", default="ixi,phantom")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-real-anatomy")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides of a training variant (needs --tag)")
    parser.add_argument("--tag", default="", help="name of the variant (its results key: FAMILY-TAG)")
    parser.add_argument("--train-seed", type=int, default=None, metavar="N",
                        help="train with seed=N (results key FAMILY[-TAG]-seedN); D's split and lesions stay the same")
    parser.add_argument("--references-only", action="store_true",
                        help="train nothing: the no-model references on the same slices (results/real_anatomy_outlier.json)")
    args = parser.parse_args()
    if args.train_seed is not None:
        args.extra = [*args.extra, f"seed={args.train_seed}"]
        args.tag = "-".join(t for t in (args.tag, f"seed{args.train_seed}") if t)
    torch.set_num_threads(2)
    if args.references_only:
        path = ROOT / "benchmarks" / "results" / "real_anatomy_outlier.json"
        # the cohorts not measured this time keep their entry; each entry carries its own date
        found = json.loads(path.read_text()) if path.exists() else {"cohorts": {}}
        for entry in found["cohorts"].values():
            entry.setdefault("date", found.get("date"))
        found.pop("date", None)
        found["config"] = "examples/ixi.yaml (+ data.root)"
        for cohort in args.cohorts.split(","):
            if cohort == "ixi" and not IXI.is_dir():
                print(f"skipping ixi: {IXI} is absent")
                continue
            found["cohorts"][cohort] = {"date": time.strftime("%Y-%m-%d"),
                                        **references_only(make_sites(cohort, args.out))}
        path.write_text(json.dumps(found, indent=1) + "\n")
        print(json.dumps(found, indent=1))
        return
    out = ROOT / "benchmarks" / "results" / "real_anatomy.json"
    results = json.loads(out.read_text()) if out.exists() else {"cohorts": {}}  # other families' rows stay
    results.update({"date": time.strftime("%Y-%m-%d"), "config": "examples/ixi.yaml (+ model.family, data.root)"})
    for cohort in args.cohorts.split(","):
        if cohort == "ixi" and not IXI.is_dir():
            print(f"skipping ixi: {IXI} is absent")
            continue
        sites = make_sites(cohort, args.out)
        for family in args.families.split(","):
            run = train(cohort, family, sites, args.out, args.extra, args.tag)
            res = evaluate(run, sites)
            res["distances_at_D"] = distances(run)
            grid = sorted((run / "samples").glob("round-*.png"))
            if grid:  # the final samples (row 1 healthy, row 2 lesion), kept beside the numbers
                name = (f"{family}-{args.tag}" if args.tag else family).replace(":", "-")  # no ':' in file names
                shutil.copyfile(grid[-1], ROOT / "benchmarks" / "results" / f"real_anatomy-samples-{cohort}-{name}.png")
            seconds = run / "train_seconds.txt"
            res["train_s"] = float(seconds.read_text()) if seconds.exists() else None
            name = f"{family}-{args.tag}" if args.tag else family
            res["overrides"] = args.extra
            results["cohorts"].setdefault(cohort, {})[name] = res
            print(json.dumps({cohort: {name: res}}, indent=1))
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
