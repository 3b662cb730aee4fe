"""Cost of evaluation, against the cost of training measured in the same run.

- feature extraction (images/s): the radiomics features behind RadFD-20 / KID / precision-recall, and
  pytorch-fid's InceptionV3 (randomly initialised, saved and loaded like the real weights file: the
  same network, so the same cost);
- anomaly maps (slices/s) per family at its default setting, and a site's whole full evaluation
  (`evaluate_site`: sampling, distances, anomaly maps over the family's sweep) per family on the
  phantom held-out site; baseline: the family's training throughput (images/s through train_step);
- evaluation's share of a whole `medgen simulate` run (default config unless --quick), from the
  run's own records: a round's evaluation lasts from its aggregation record to its last evaluation
  record.

Usage: python benchmarks/evaluation.py [--quick] [--families vae,gan,ddpm,ddpm:pixel] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from medgen.client.task import site_data
from medgen.config import load_config
from medgen.evaluation.distances import radiomics_features
from medgen.evaluation.fid import InceptionFeatures
from medgen.evaluation.inception import FIDInceptionV3
from medgen.evaluation.site import evaluate_site
from medgen.models import build_model
from medgen.simulation import resolve_data, simulate

from families import overrides as family_overrides  # benchmarks/families.py (the script's folder)


def _rate(fn, n: int, repeats: int = 3) -> float:
    """Items per second of ``fn`` (which handles n items): best of ``repeats`` after a warm-up."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def features(images: torch.Tensor, brain: torch.Tensor, tmp: Path) -> dict:
    torch.manual_seed(0)
    weights = tmp / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    inception = InceptionFeatures(weights)
    n_inception = min(100, len(images))
    return {"radiomics_images_per_s": round(_rate(lambda: radiomics_features(images.numpy(), brain.numpy()),
                                                  len(images)), 1),
            "inception_images_per_s": round(_rate(lambda: inception(images[:n_inception, None]), n_inception, 1), 2)}


def family_costs(family: str, quick: bool) -> dict:
    cfg = resolve_data(load_config(None, family_overrides(family)), log=lambda *_: None)
    if quick:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
            update={"max_samples": 16, "max_anomaly_slices": 16})})
    site = cfg.sites.heldout[0]
    _, data = site_data(cfg, site, Path(cfg.data.root) / site, heldout=True)
    model = build_model(cfg)
    n = cfg.train.batch_size
    images = torch.from_numpy(data.images[:n]).unsqueeze(1)
    labels = torch.from_numpy(data.labels[:n])
    brain = torch.from_numpy(data.brain[:n]).unsqueeze(1)
    optimizers = model.make_optimizers()
    train_rate = _rate(lambda: model.train_step(images, labels, optimizers, 100), n)
    k = 8
    map_rate = _rate(lambda: model.anomaly_map(images[:k], brain[:k]), k, 1)
    start = time.perf_counter()
    evaluate_site(model, data, cfg)
    return {"train_images_per_s": round(train_rate, 1), "anomaly_map_slices_per_s": round(map_rate, 2),
            "anomaly_settings": len(model.anomaly_sweep()), "site_slices": len(data),
            "full_evaluation_s": round(time.perf_counter() - start, 1),
            "anomaly_map_cost_in_training_images": round(train_rate / map_rate, 1)}


def evaluation_share(quick: bool, out: Path) -> dict:
    overrides = ["federation.rounds=2", "train.local_steps=10"] if quick else []
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    run = simulate(cfg, out=out, log=lambda *_: None)
    wall = time.perf_counter() - start
    records = run.records()
    evaluation = 0.0
    for round_ in sorted({r["round"] for r in records if r["phase"] == "evaluate"}):
        aggregated = [r["time"] for r in records if r["round"] == round_ and r["phase"] == "train" and r["site"] == "global"]
        evaluated = [r["time"] for r in records if r["round"] == round_ and r["phase"] == "evaluate"]
        evaluation += max(evaluated) - aggregated[0]
    full = max(r["time"] for r in records if r["phase"] == "evaluate") - \
        [r["time"] for r in records if r["phase"] == "train" and r["site"] == "global"][-1]
    return {"config": f"{cfg.model.family}, {cfg.federation.rounds} rounds x {cfg.train.local_steps} steps, "
                      f"full evaluation after the last round",
            "run_wall_s": round(wall, 1), "evaluation_s": round(evaluation, 1),
            "final_full_evaluation_s": round(full, 1), "evaluation_share": round(evaluation / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small evaluation sets, a 2-round run")
    parser.add_argument("--families", default="vae,gan,ddpm,ddpm:pixel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = what one simulated site gets)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / ("evaluation-quick.json" if args.quick else "evaluation.json")
    result = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_data(load_config(None, []), log=print)
        site = cfg.sites.heldout[0]
        _, data = site_data(cfg, site, Path(cfg.data.root) / site, heldout=True)
        n = min(256, len(data))
        result["features"] = features(torch.from_numpy(data.images[:n]), torch.from_numpy(data.brain[:n]), Path(tmp))
        print("features", result["features"], flush=True)
        for family in args.families.split(","):
            result[family] = family_costs(family, args.quick)
            print(family, result[family], flush=True)
        result["simulate"] = evaluation_share(args.quick, Path(tmp) / "run")
        print("simulate", result["simulate"], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
