"""`medgen reconstruct`: super-resolution or inpainting of a site folder's held-out slices with a
trained generator as the prior, scored against the trivial baselines.

The checkpoint and the site folder go through the same path as ``medgen evaluate``
(:func:`medgen.evaluation.evaluate.load_trained`, :func:`medgen.data.dataset.load_site`: the same
preprocessing, brain masks and slices). Held-out slices: for a training site of the checkpoint's
run its validation subjects (the run's own split), for any other folder all its slices; of
those, ``n_slices`` evenly spaced ones (in subject and slice order).

Written to the output folder:

- ``metrics.json`` (strict JSON): per method (``generator`` = G(w*), ``generator-consistent`` =
  G(w*) corrected to agree with the observation, each baseline) mean / std / n over slices of
  PSNR, SSIM, RMSE, RMSE inside the brain (and inside the hole, for inpainting); the data term
  at the start and end of the optimisation; the settings and what phi is; ``per_slice``: every
  metric of every method per slice (in the order of ``slices``: subject, axial index), for paired
  comparisons.
- ``grid-K.png``: up to six slices each, columns observed / generator / generator-consistent /
  first baseline / truth.
- ``<method>.nii.gz``, ``observed.nii.gz``, ``truth.nii.gz``: the slices as (S, S, n) volumes
  (array [row, column, slice], in-plane spacing data.spacing_mm).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medgen import logs, strictjson
from medgen.config import ConfigError
from medgen.data.dataset import SiteSlices, load_site
from medgen.evaluation.evaluate import load_trained
from medgen.fileio import atomic_write
from medgen.models.base import NoGeneratorPrior
from medgen.reconstruction import features
from medgen.reconstruction.metrics import per_slice, summary
from medgen.reconstruction.operators import Mask, parse_task
from medgen.reconstruction.solve import Settings, solve

GRID_ROWS = 6
GRIDS = 3


def heldout_slices(data: SiteSlices, train_sites: list[str], val_fraction: float, seed: int, n: int) -> SiteSlices:
    """``n`` evenly spaced slices of the slices the checkpoint never trained on (see the module)."""
    if data.site in train_sites:
        data = data.split_subjects(val_fraction, seed)[1]
        if len(data) == 0:
            raise ConfigError(f"--data: site {data.site} is one of the run's training sites and has no validation "
                              f"subjects to reconstruct; give a held-out site folder")
    order = np.lexsort((data.slice_index, data.subjects))
    keep = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    return data.subset(keep)


def reconstruct(checkpoint: str | Path, task_text: str, data_dir: str | Path, out: str | Path | None = None,
                site: str | None = None, n_slices: int = 32, settings: Settings = Settings(),
                overrides: list[str] | tuple[str, ...] = (), log=logs.info) -> Path:
    """Run the reconstruction task and write its outputs; returns the output folder."""
    task = parse_task(task_text)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"--data {data_dir}: no such folder (give a site folder of NIfTI scans)")
    ckpt, cfg, model = load_trained(checkpoint, overrides)
    try:
        prior = model.generator_prior()
    except NoGeneratorPrior as e:
        raise ConfigError(f"--checkpoint {checkpoint}: {e}") from None
    site = site or data_dir.resolve().name
    out = Path(out or Path("runs") / f"reconstruct-{site}-{task.slug}-{Path(checkpoint).stem}")
    data = heldout_slices(load_site(data_dir, cfg.data, site), cfg.sites.train, cfg.train.val_fraction, cfg.seed,
                          n_slices)
    truth = torch.from_numpy(data.images)[:, None]
    op = task.operator(len(truth), truth.shape[-1], cfg.seed)
    observed = op(truth)
    labels = torch.from_numpy(data.labels)
    log(f"reconstructing {len(truth)} slices of {data_dir} ({len(set(data.subjects.tolist()))} subjects), "
        f"{task.text}, with the {cfg.model.family} of {checkpoint} (round {ckpt['round']}), {settings.steps} steps")
    start = time.perf_counter()
    solution = solve(prior, op, observed, labels, settings, seed=cfg.seed, device=cfg.train.device)
    seconds = time.perf_counter() - start
    results = {"generator": solution.images, "generator-consistent": op.consistent(solution.images, observed),
               **op.baselines(observed)}
    regions = {"brain": torch.from_numpy(data.brain)[:, None]}
    if isinstance(op, Mask):
        regions["hole"] = op.missing.expand_as(truth)
    values = {name: per_slice(x, truth, regions) for name, x in results.items()}
    scores = {name: summary(v) for name, v in values.items()}
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task.text, "checkpoint": str(checkpoint), "round": int(ckpt["round"]), "family": cfg.model.family,
        "data": str(data_dir), "site": site, "n_slices": len(truth), "subjects": sorted(set(data.subjects.tolist())),
        "heldout": "validation subjects of a training site" if site in cfg.sites.train else "every slice of the folder",
        "labels": "the slices' own class labels (0 healthy, 1 lesion) condition the generator",
        "settings": vars(settings) | {"seed": cfg.seed}, "feature_network": features.__doc__.split("\n\n")[0],
        "data_term": {"start": solution.data_term[0], "end": solution.data_term[-1]},
        "seconds": seconds, "metrics": scores,
        "slices": [{"subject": str(a), "slice_index": int(b)} for a, b in zip(data.subjects, data.slice_index)],
        "per_slice": values,
    }
    atomic_write(out / "metrics.json", lambda f: f.write(strictjson.dumps(record, indent=2).encode()))
    first_baseline = next(iter(op.baselines(observed)))
    columns = {"observed": op.shown(observed), "generator": results["generator"],
               "generator-consistent": results["generator-consistent"], first_baseline: results[first_baseline],
               "truth": truth}
    grids = [write_grid(out / f"grid-{k + 1}.png", columns, range(k * GRID_ROWS, min(len(truth), (k + 1) * GRID_ROWS)),
                        scores) for k in range(min(GRIDS, -(-len(truth) // GRID_ROWS)))]
    spacing = cfg.data.spacing_mm[0]
    for name, x in {"observed": op.shown(observed), "truth": truth, **results}.items():
        write_nifti(out / f"{name}.nii.gz", x, spacing)
    log(table(scores))
    log(f"outputs: {out} (metrics.json, {len(grids)} grids, NIfTI slices)")
    return out


def table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """The metrics as a plain-text table, one row per method."""
    names = list(next(iter(scores.values())))
    lines = ["method".ljust(22) + "".join(n.rjust(13) for n in names)]
    for method, s in scores.items():
        lines.append(method.ljust(22) + "".join(f"{s[n]['mean']:13.4f}" for n in names))
    return "\n".join(lines)


def write_grid(path: Path, columns: dict[str, torch.Tensor], rows, scores) -> Path:
    """A picture of ``rows`` slices, one column per entry of ``columns`` (each (N, 1, S, S) in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns), 1.6 * len(rows) + 0.4),
                             squeeze=False)
    for j, (name, images) in enumerate(columns.items()):
        psnr = scores.get(name, {}).get("psnr", {}).get("mean")
        axes[0, j].set_title(name + (f"\n{psnr:.1f} dB" if psnr is not None else "\n"), fontsize=7)
        for i, r in enumerate(rows):
            axes[i, j].imshow(images[r, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def write_nifti(path: Path, images: torch.Tensor, spacing: float) -> Path:
    """(N, 1, S, S) -> a NIfTI (S, S, N) float32, voxel size spacing x spacing x 1."""
    import gzip

    import nibabel as nib

    volume = np.ascontiguousarray(np.moveaxis(images[:, 0].detach().cpu().numpy().astype(np.float32), 0, 2))
    image = nib.Nifti1Image(volume, np.diag([spacing, spacing, 1.0, 1.0]))
    atomic_write(path, lambda f: f.write(gzip.compress(image.to_bytes(), compresslevel=6)))
    return path
