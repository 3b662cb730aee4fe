"""`medgen synthesize`: slices with lesions where masks say, from a mask-conditioned checkpoint.

Writes to the output folder:

- ``sample-NNNN.nii.gz`` / ``sample-NNNN_mask.nii.gz``: each synthesised lesion slice (S, S, 1)
  float32 in [0, 1] and its mask (uint8), RAS+ with the training slices' display orientation
  (``medgen/data/lesion_masks.py``; in-plane spacing nominal); the pair is a plain-files scan and
  its lesion mask (``_mask``), the layout site folders use;
- ``samples.png``: row 1 the lesion samples, row 2 the healthy reference from the same noise,
  row 3 the lesion label without the mask, each with the mask's outline in red;
- ``synthesis.json`` (strict JSON): the intensity test (``medgen/evaluation/synthesis.py``) with n,
  the masks' sources, the checkpoint and the seed (with ``--from-site`` also the contrast of the
  site's real lesions, for scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from medgen import strictjson
from medgen.config import INFERENCE_KEYS, ConfigError, load_config_text, with_overrides
from medgen.data.lesion_masks import MaskSet, read_mask_files, read_site_masks, write_slice
from medgen.evaluation.synthesis import class_distances, mask_test, real_contrast, save_outlined_grid, synthesize
from medgen.fileio import atomic_write
from medgen.models import build_model
from medgen.server.rundir import load_checkpoint, load_weights

GRID_COLUMNS = 16  # masks shown in samples.png


@dataclass
class Synthesis:
    out: Path
    n: int
    result: dict


def load_mask_model(checkpoint: str | Path, overrides=()):
    """The checkpoint's model and config; ConfigError naming --checkpoint when it was trained without
    mask conditioning, and naming a --set key that would change the weights' meaning."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key in INFERENCE_KEYS or key == "train.device" or key.startswith("data.") and key != "data.image_size"):
            raise ConfigError(f"--set {item}: synthesizing from a checkpoint can change data.* (not data.image_size), "
                              f"train.device and {', '.join(sorted(INFERENCE_KEYS))} only (the rest built the weights)")
    ckpt = load_checkpoint(checkpoint)
    cfg = with_overrides(load_config_text(ckpt["config"]), overrides)
    model = build_model(cfg)
    if not model.mask_conditioned:
        raise ConfigError(f"--checkpoint {checkpoint}: trained without mask conditioning "
                          f"(model.family={cfg.model.family}, model.mask_conditioning=false); retrain with "
                          f"model.mask_conditioning=true")
    load_weights(model, ckpt, checkpoint)
    return model.to(cfg.train.device), cfg


def run_synthesis(checkpoint: str | Path, out: str | Path, masks_dir: str | Path | None = None,
                  from_site: str | Path | None = None, n: int | None = None, seed: int = 0,
                  overrides=()) -> Synthesis:
    """Synthesise one lesion slice per mask (``masks_dir``: the first ``n`` mask slices of its files,
    all by default; ``from_site``: ``n`` targeted masks, default 16) and write the module docstring's
    files to ``out``."""
    if (masks_dir is None) == (from_site is None):
        raise ConfigError("give exactly one of --masks DIR and --from-site SITE_DIR")
    if n is not None and n < 1:
        raise ConfigError(f"--n {n}: must be at least 1")
    model, cfg = load_mask_model(checkpoint, overrides)
    if masks_dir is not None:
        masks = read_mask_files(masks_dir, cfg.data)
        masks = MaskSet(masks.masks[:n], masks.sources[:n]) if n else masks
    else:
        masks = read_site_masks(from_site, cfg.data, n or 16, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = synthesize(model, masks.masks, seed)
    for i, (image, mask) in enumerate(zip(samples["lesion"], masks.masks)):
        write_slice(out / f"sample-{i:04d}.nii.gz", image, f"medgen synthesize lesion sample {i}")
        write_slice(out / f"sample-{i:04d}_mask.nii.gz", mask, f"medgen synthesize mask {i}")
    shown = slice(0, GRID_COLUMNS)
    save_outlined_grid(out / "samples.png", [samples[a][shown] for a in ("lesion", "healthy", "label-only")],
                       masks.masks[shown])
    result = {"checkpoint": str(checkpoint), "seed": seed, "family": cfg.model.family, "space": cfg.model.space,
              "masks": "from-site" if from_site is not None else "files",
              "mask-source": str(from_site if from_site is not None else masks_dir),
              "mask-pixels": {"mean": float(masks.masks.reshape(len(masks.masks), -1).sum(1).mean()),
                              "n": len(masks.masks)},
              "test": mask_test(samples, masks.masks), "sources": masks.sources,
              "rows-of-samples.png": ["lesion (mask given)", "healthy (reference, same noise)",
                                      "lesion label without the mask"]}
    if masks.site is not None:
        site = masks.site
        result["real-lesion-contrast"] = real_contrast(site.images, site.lesion, site.brain, site.labels)
        result["distances"] = class_distances(samples, site.images, site.labels, seed)
    text = strictjson.dumps(result, indent=2) + "\n"
    atomic_write(out / "synthesis.json", lambda f: f.write(text.encode()))
    return Synthesis(out, len(masks.masks), result)


def summary_line(s: Synthesis) -> str:
    t = s.result["test"]
    c = t["contrast"]

    def fmt(d):
        return "n/a" if d["mean"] is None else f"{d['mean']:+.3f}"

    line = (f"{s.n} slices in {s.out}; contrast ring - inside: lesion {fmt(c['lesion'])}, healthy reference "
            f"{fmt(c['healthy'])}, label only {fmt(c['label-only'])} (n={t['n']}); |lesion - healthy| inside / "
            f"ring: {t['change-ratio'] if t['change-ratio'] is None else round(t['change-ratio'], 2)}")
    if d := s.result.get("distances"):
        line += "; KID to the site's real slices of the class (n real held out against the rest): " + ", ".join(
            f"{arm} {v['kid']:.3g} ({v['kid-real-vs-real']:.3g})" for arm, v in d.items())
    return line


__all__ = ["Synthesis", "run_synthesis", "summary_line"]
