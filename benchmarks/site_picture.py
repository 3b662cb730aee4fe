"""Time ``medgen.data.picture.draw_site`` against an older revision's, on the same phantom site.

Synthesises one phantom site (4 subjects), loads its slices as a site does (``check_site``), then
draws its picture with each version, median of ``--repeat`` after one warm-up draw (matplotlib's
imports and font cache are paid once per process, not per picture).

Usage: python benchmarks/site_picture.py [--old ad3ac8e] [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

from medgen.config import load_config
from medgen.data.check import check_site
from medgen.data.phantom import synthesize_cohort
from medgen.data import picture

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:medgen/data/picture.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("old_picture")
    exec(compile(source, f"{rev}:picture.py", "exec"), module.__dict__)
    return module


def median_time(draw, slices, path: Path, repeat: int) -> float:
    draw(slices, path, "warm-up")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        draw(slices, path, "site A")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="ad3ac8e", help="git revision of the version to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for the two PNGs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        cfg = load_config(None, [f"data.cache_dir={Path(tmp) / 'cache'}"])
        folder = synthesize_cohort(Path(tmp) / "cohort", ["A"], 4, seed=0)["A"]
        slices = check_site(folder, cfg.data).slices
        print(f"{len(slices)} slices of {slices.images.shape[-1]} px")
        old = median_time(old_module(args.old).draw_site, slices, out / "old.png", args.repeat)
        new = median_time(picture.draw_site, slices, out / "new.png", args.repeat)
        print(f"draw_site, median of {args.repeat}: {args.old} {old:.3f} s, this tree {new:.3f} s "
              f"({old / new:.1f}x)")


if __name__ == "__main__":
    main()
