"""ceVAE against the plain VAE in a short CPU budget: both trained centrally, from the same
initialisation on the same batches, on the pooled training sites of a site folder (e.g. the phantom
of `medgen data synth`; the config of examples/phantom.yaml), then scored on the held-out site as
`benchmarks/real_anatomy.py` scores (threshold on half of the healthy subjects, never on a mask;
the trivial references beside).

    python benchmarks/cevae_short.py SITES [--steps 200] [--set KEY=VALUE ...]

Not the federated 5 x 100 budget of real_anatomy.py (`--families vae,cevae` runs that one).
Results: benchmarks/results/cevae_short.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_anatomy import MAX_SLICES, VARIANTS, score  # noqa: E402

from medgen.client.task import site_data, train_local  # noqa: E402
from medgen.config import load_config  # noqa: E402
from medgen.data.dataset import concat_slices, load_site  # noqa: E402
from medgen.evaluation import anomaly  # noqa: E402
from medgen.evaluation.site import split_for_threshold  # noqa: E402
from medgen.models import build_model  # noqa: E402


def maps(model, data, index: np.ndarray, setting: dict) -> np.ndarray:
    """Raw maps (len(index), S, S) of slices ``index``, in batches of about 32."""
    out = [model.anomaly_map(torch.from_numpy(data.images[i]).unsqueeze(1),
                             torch.from_numpy(data.brain[i]).unsqueeze(1), **setting).numpy()[:, 0]
           for i in np.array_split(index, max(1, len(index) // 32))]
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sites", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides (e.g. data.cache_dir=...)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = [ROOT / "examples" / "phantom.yaml", [f"data.root={args.sites}", *args.extra]]
    cfg = load_config(*config)
    pooled = concat_slices([site_data(cfg, s, args.sites / s)[0] for s in cfg.sites.train], "pooled")
    heldout = cfg.sites.heldout[0]
    data = load_site(args.sites / heldout, cfg.data, heldout)
    calib, scored = split_for_threshold(data, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    calib_idx = np.sort(rng.permutation(np.flatnonzero(calib))[:MAX_SLICES])
    idx = np.sort(rng.permutation(np.flatnonzero(scored))[:MAX_SLICES])
    q = cfg.evaluation.healthy_quantile
    result = {"sites": str(args.sites), "overrides": args.extra, "training slices": len(pooled), "steps": args.steps,
              "batch_size": cfg.train.batch_size, "n_scored_slices": int(len(idx)),
              "n_scored_lesion_slices": int((data.labels[idx] == 1).sum()), "n_calibration_slices": int(len(calib_idx)),
              "models": {}}
    for family in ("vae", "cevae"):
        model = build_model(load_config(config[0], [*config[1], f"model.family={family}"]))
        start = time.perf_counter()
        losses = train_local(model, pooled, cfg, seed=cfg.seed, steps=args.steps)
        train_s = time.perf_counter() - start
        for setting in model.anomaly_sweep():
            name = family + "".join(f" {k}={v}" for k, v in setting.items())
            start = time.perf_counter()
            raw_calib, raw = maps(model, data, calib_idx, setting), maps(model, data, idx, setting)
            map_s = (time.perf_counter() - start) / (len(idx) + len(calib_idx))
            result["models"][name] = {"train_s": round(train_s, 1), "anomaly_map_s_per_slice": round(map_s, 4),
                                      "mean training losses": {k: round(v, 3) for k, v in losses.items()
                                                       if k in ("loss", "recon", "kl", "ce")}, "variants": {}}
            for variant, (median, erode) in VARIANTS.items():
                post = [anomaly.postprocess(m, data.brain[i], median, erode)
                        for m, i in ((raw_calib, calib_idx), (raw, idx))]
                result["models"][name]["variants"][variant] = score(*post, data, calib_idx, idx, q)
            print(name, json.dumps(result["models"][name]["variants"]["median 5"]), flush=True)
    outlier = anomaly.outlier_calibration(data.images[calib_idx], data.brain[calib_idx], q, 5, 0)
    refs = anomaly.references(data.images[idx], data.lesion[idx], data.brain[idx], data.labels[idx], outlier, 5, 0)
    result["references (median 5)"] = {k: round(float(v), 4) for k, v in refs.items()}
    out = ROOT / "benchmarks" / "results" / "cevae_short.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
