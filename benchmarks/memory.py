"""Peak memory of preprocessing one large, highly compressible NIfTI (the "memory bomb" of issue 16).

A valid .nii.gz just under the default ``data.max_voxels`` (512^3): zeros with a bright
ellipsoidal "head", a few MB compressed, hundreds of MB decoded. Each measurement runs in a fresh
child process that imports medgen, notes its peak RSS (``ru_maxrss``) as the baseline, then loads
the file and preprocesses it the way a site does (``medgen.data.dataset._preprocess``: load ->
resample to ``data.spacing_mm`` -> brain mask -> normalise -> slices), and reports the peak RSS
above that baseline as a multiple of the decoded float32 volume (X*Y*Z*4 bytes).

A second child repeats the run under ``tracemalloc`` (numpy reports its buffers to it) and gives
the peak of traced memory inside each step, to show where the peak comes from.

Usage: python benchmarks/memory.py [--shape 500] [--dtype float64] [--voxel-mm 1.0] [--mask]
                                   [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20


def make_bomb(path: Path, n: int, dtype: str, voxel_mm: float, lesion: bool = False, fill: bool = False) -> None:
    """An n^3 NIfTI-1 .nii.gz of ``dtype``, written one slice at a time (never n^3 in memory): an
    ellipsoid of 100 (a "head", about 180 x 200 x 160 mm when it fits) with a brighter core, zero
    elsewhere; with ``fill`` the ellipsoid fills the field of view (the worst case for the brain-mask
    step); with ``lesion`` a binary uint8 mask instead (a sphere inside the head)."""
    import nibabel as nib

    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = -(n - 1) * voxel_mm / 2
    header = nib.Nifti1Header()
    header.set_data_shape((n, n, n))
    header.set_data_dtype(np.uint8 if lesion else dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_slope_inter(1.0, 0.0)
    radii = np.full(3, 0.48 * n * voxel_mm) if fill else np.minimum(np.array([90.0, 100.0, 80.0]), 0.45 * n * voxel_mm)
    c = (np.arange(n) - (n - 1) / 2) * voxel_mm
    x, y = np.meshgrid(c, c, indexing="ij")
    with gzip.open(path, "wb", compresslevel=6) as f:
        header.write_to(f)  # 348 bytes + 4 (no extensions); vox_offset is 352
        for z in c:  # NIfTI is Fortran order: the slice at fixed z is contiguous in x, then y
            r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
            if lesion:
                s = np.sqrt(x**2 + (y - 20) ** 2 + z**2) < 12
                f.write(s.astype(np.uint8).tobytes(order="F"))
            else:
                s = np.where(r < 1, 100.0, 0.0) + np.where(r < 0.6, 50.0, 0.0)
                f.write(s.astype(dtype).tobytes(order="F"))


_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from medgen.config import load_config
from medgen.data import dataset, nifti, preprocess
from medgen.data.sites import Scan

path, mask, traced = Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3] == "1"
cfg = load_config(None, []).data
scan = Scan(id="bomb", image=path, lesion_mask=Path(mask) if mask else None,
            label="lesion" if mask else "healthy")
steps = {}
if traced:
    import functools, tracemalloc

    def watch(module, name):
        fn = getattr(module, name)
        @functools.wraps(fn)
        def wrapped(*a, **k):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = fn(*a, **k)
            steps[name] = max(steps.get(name, 0), tracemalloc.get_traced_memory()[1] - before)
            return out
        setattr(module, name, wrapped)

    for name in ("load_volume", "load_lesion_mask"):
        watch(dataset, name)
    for name in ("resample_image", "resample_mask", "estimate_brain_mask", "normalise", "extract_slices"):
        watch(preprocess, name)
    tracemalloc.start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
slices = dataset._preprocess(scan, cfg)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": base, "peak": peak, "seconds": seconds, "slices": int(len(slices.images)),
                  "steps": steps}))
"""


def _child(path: Path, mask: Path | None, traced: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(mask or ""), "1" if traced else "0"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, default=500, help="n for an n^3 volume (default 500: just under 512^3)")
    parser.add_argument("--dtype", default="float64", help="on-disk voxel type (float64 decodes from 8 bytes)")
    parser.add_argument("--voxel-mm", type=float, default=1.0)
    parser.add_argument("--fill", action="store_true", help="the head fills the field of view (worst case)")
    parser.add_argument("--mask", action="store_true", help="also a lesion mask of the same size")
    parser.add_argument("--repeats", type=int, default=2, help="untraced runs (the peak is their median)")
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run (the per-step breakdown)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.nii.gz"
        mask = Path(tmp) / "bomb_mask.nii.gz" if args.mask else None
        t0 = time.perf_counter()
        make_bomb(path, args.shape, args.dtype, args.voxel_mm, fill=args.fill)
        if mask:
            make_bomb(mask, args.shape, args.dtype, args.voxel_mm, lesion=True)
        make_s = time.perf_counter() - t0
        runs = [_child(path, mask, traced=False) for _ in range(args.repeats)]
        traced = {"steps": {}} if args.no_trace else _child(path, mask, traced=True)
        size = path.stat().st_size + (mask.stat().st_size if mask else 0)

    decoded = args.shape**3 * 4
    above = sorted(r["peak"] - r["baseline"] for r in runs)
    median = above[len(above) // 2]
    result = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "file": f"{args.shape}^3 {args.dtype}, {args.voxel_mm:g} mm voxels, gzip"
                + (", head filling the field of view" if args.fill else "")
                + (", plus a uint8 lesion mask of the same size" if mask else ""),
        "compressed_mb": round(size / MB, 2),
        "decoded_float32_mb": round(decoded / MB, 1),
        "make_file_s": round(make_s, 1),
        "baseline_rss_mb": round(runs[0]["baseline"] / MB, 1),
        "peak_rss_above_baseline_mb": [round(a / MB, 1) for a in above],
        "peak_over_decoded_volume": round(median / decoded, 2),
        "n_runs": len(runs),
        "preprocess_s": [round(r["seconds"], 1) for r in runs],
        "slices": runs[0]["slices"],
        "traced_peak_per_step_mb": {k: round(v / MB, 1) for k, v in traced["steps"].items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
