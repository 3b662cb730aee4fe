"""The GPU path, measured (issue #20, requirement 6): ``bash benchmarks/gpu_check.sh [--dry-run]``.

Sections, each under its own time cap (seconds of wall clock; the whole check fits in 8 minutes):
  pytest     ``pytest -m gpu -q`` (tests/test_gpu.py)
  families   every family at examples/gpu.yaml on CUDA, train.amp bf16 and none: steps/s and peak
             memory (torch.cuda.max_memory_allocated, MiB); ratio bf16 / none
  dp         DP-SGD (Opacus, float32: train.amp is refused with DP) against the plain float32 step:
             ratio of seconds per step, per family
  simulate   ``medgen simulate`` with 4 sites sharing one GPU (simulation.client_gpus=0.25): each
             site's CUDA memory still held when its next round starts (from its train metrics) and
             nvidia-smi's used memory sampled every second; "released" when no site holds more
             at a later round's start than at its second round's
``--dry-run``: the same sections on the CPU at tiny sizes (32 px, width 8, 5 steps, 2 rounds), to
check the plumbing where there is no GPU; its numbers are not GPU numbers.
Writes benchmarks/results/gpu_check.json (gpu_check-dry-run.json) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from families import overrides as family_overrides  # noqa: E402

from medgen.client.task import train_local  # noqa: E402
from medgen.config import load_config  # noqa: E402
from medgen.data.dataset import SiteSlices  # noqa: E402
from medgen.models import build_model  # noqa: E402
from medgen.privacy.dp import plan  # noqa: E402

FAMILIES = ["vae", "cevae", "gan", "ddpm:pixel", "ddpm:latent", "vqvae", "flow"]  # the last two: #21
GPU_YAML = ROOT / "examples" / "gpu.yaml"
# (steps, time cap s per measured run, warm-up steps) and the caps of the other sections
REAL = {"steps": 300, "run_cap_s": 6.0, "warmup": 10, "dp_steps": 60, "dp_cap_s": 5.0, "dp_warmup": 2,
        "pytest_cap_s": 90, "families_cap_s": 150, "dp_section_cap_s": 60, "simulate_cap_s": 130,
        "size": None, "device": "cuda"}
DRY = {"steps": 5, "run_cap_s": 10.0, "warmup": 1, "dp_steps": 5, "dp_cap_s": 10.0, "dp_warmup": 1,
       "pytest_cap_s": 60, "families_cap_s": 120, "dp_section_cap_s": 70, "simulate_cap_s": 180,
       "size": 32, "device": "cpu"}
DRY_MODEL = ["data.image_size=32", "model.width=8", "model.latent_dim=16", "train.batch_size=8",
             "model.timesteps=100", "model.kl_warmup_steps=0"]


def device_info() -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                     "capability": f"{p.major}.{p.minor}", "bf16_supported": torch.cuda.is_bf16_supported()})
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return info


def run_pytest(cap_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap_s)
    except subprocess.TimeoutExpired:
        return {"rc": None, "summary": f"timed out after {cap_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return {"rc": done.returncode, "summary": lines[-1] if lines else done.stderr[-300:]}


def config(family: str, mode: dict, *extra: str):
    """examples/gpu.yaml for ``family`` (tiny sizes in dry-run) with ``extra`` overrides."""
    base = DRY_MODEL if mode["size"] else []
    return load_config(GPU_YAML, [*family_overrides(family), f"train.device={mode['device']}", *base, *extra])


def synthetic_slices(cfg, n: int = 512, subjects: int = 64) -> SiteSlices:
    """n random slices at cfg.data.image_size: speed and memory do not depend on the content."""
    s = cfg.data.image_size
    rng = np.random.default_rng(0)
    zeros = np.zeros((n, s, s), bool)
    return SiteSlices("A", rng.random((n, s, s), dtype=np.float32), ~zeros, zeros, np.arange(n) % 2,
                      np.array([f"s{i % subjects}" for i in range(n)]), np.arange(n))


def timed(cfg, data, steps: int, warmup: int, cap_s: float, dp: bool = False) -> dict:
    """Steps per second of train_local after ``warmup`` steps, with as many of ``steps`` as the
    warm-up rate says fit in ``cap_s``; peak CUDA memory (MiB) of the measured call."""
    model = build_model(cfg, seed=0)

    def call(n):
        return train_local(model, data, cfg, seed=1, steps=n, dp=plan(cfg, data, n) if dp else None)
    warm = call(warmup)
    rate = warmup / max(warm["train-time-s"], 1e-9)
    n = max(2, min(steps, int(cap_s * rate)))
    got = call(n)
    out = {"steps": n, "steps_per_s": n / got["train-time-s"], "loss": got.get("loss"),
           "finite": bool(np.isfinite(got.get("loss", np.nan)))}
    out["peak_mib"] = got.get("gpu-peak-mb")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def families_section(mode: dict, deadline: float) -> dict:
    results = {}
    for family in FAMILIES:
        data = None
        for amp in ("bf16", "none"):
            if time.monotonic() > deadline:
                results.setdefault(family, {})[amp] = {"skipped": "section time cap"}
                continue
            cfg = config(family, mode, f"train.amp={amp}")
            data = data or synthetic_slices(cfg)
            results.setdefault(family, {})[amp] = timed(cfg, data, mode["steps"], mode["warmup"], mode["run_cap_s"])
        r = results[family]
        if "steps_per_s" in r.get("bf16", {}) and "steps_per_s" in r.get("none", {}):
            r["speedup_bf16"] = r["bf16"]["steps_per_s"] / r["none"]["steps_per_s"]
    return results


def dp_section(mode: dict, plain: dict, deadline: float) -> dict:
    results = {}
    for family in FAMILIES:
        base = plain.get(family, {}).get("none", {})
        if time.monotonic() > deadline or "steps_per_s" not in base:
            results[family] = {"skipped": "section time cap" if time.monotonic() > deadline else "no plain run"}
            continue
        cfg = config(family, mode, "train.amp=none", "privacy.enabled=true", "privacy.noise_multiplier=1.0",
                     "privacy.unit=slice")
        r = timed(cfg, synthetic_slices(cfg), mode["dp_steps"], mode["dp_warmup"], mode["dp_cap_s"], dp=True)
        r["ratio_dp_over_plain"] = base["steps_per_s"] / r["steps_per_s"]
        results[family] = r
    return results


def _sample_nvidia_smi(samples: list, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True)
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():  # (used MiB, processes on the GPU, their largest MiB)
            per_process = [float(ln.split(",")[1]) for ln in apps.stdout.splitlines() if "," in ln]
            samples.append((float(done.stdout.split()[0]), len(per_process), max(per_process, default=0.0)))


def simulate_section(mode: dict, cap_s: float) -> dict:
    """4 phantom sites on one GPU; per site and round the CUDA memory its process held when the
    round's training began (allocated / reserved MiB) and its peak during it."""
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-check-sim-")) / "run"
    sets = ["sites.train=[A,B,C,D]", "sites.heldout=[]", "phantom.subjects_per_site=2", "federation.eval_every=100",
            "evaluation.max_samples=4", "evaluation.max_anomaly_slices=4", "federation.samples_per_class=0",
            "simulation.client_cpus=1"]
    if mode["size"]:  # CPU: no GPU to share
        sets += [*DRY_MODEL, "train.device=cpu", "train.amp=none", "simulation.client_gpus=0", "federation.rounds=2",
                 "train.local_steps=2", "data.spacing_mm=[2,2,2]"]
    else:
        sets += ["simulation.client_gpus=0.25", "federation.rounds=3", "train.local_steps=20"]
    cmd = [sys.executable, "-m", "medgen.cli.main", "simulate", "--config", str(GPU_YAML), "--out", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=_sample_nvidia_smi, args=(samples, stop), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap_s, env=env)
        rc, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = None, f"timed out after {cap_s:.0f} s: {str(e.stdout or '')[-500:]}"
    stop.set()
    result = {"rc": rc, "wall_s": time.monotonic() - start, "overrides": sets}
    if rc != 0:
        result["tail"] = tail
    per_site: dict[str, list[dict]] = {}
    metrics = out_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        rec = json.loads(line)
        if rec.get("phase") == "train" and rec.get("site") != "global":
            values = rec.get("values", rec)
            per_site.setdefault(rec["site"], []).append(
                {"round": rec.get("round"), **{k: values.get(k) for k in
                                               ("gpu-allocated-start-mb", "gpu-reserved-start-mb", "gpu-peak-mb")}})
    result["sites"] = per_site
    result["rounds_seen"] = sorted({r["round"] for rows in per_site.values() for r in rows})
    held = [r["gpu-reserved-start-mb"] for rows in per_site.values() for r in rows
            if r["gpu-reserved-start-mb"] is not None]
    if held:
        # a round starts in a process whose last message ended with release_device: what it still
        # reserves then should be a small part of the previous round's peak, and not grow
        pairs = [(prev, r) for rows in per_site.values() for prev, r in zip(rows, rows[1:])]
        result["max_reserved_at_round_start_mib"] = max(held)
        result["released_between_rounds"] = all(
            r["gpu-reserved-start-mb"] <= 0.1 * prev["gpu-peak-mb"] + 16 for prev, r in pairs)
        later = [r["gpu-allocated-start-mb"] for rows in per_site.values() for r in rows[1:]]
        result["allocated_at_round_start_grows"] = bool(later) and max(later) > min(later) + 16
    else:
        result["released_between_rounds"] = None  # no CUDA memory in the sites' metrics (a CPU run)
    if samples:
        used = [u for u, _, _ in samples]
        result["nvidia_smi"] = {"used_mib_max": max(used), "used_mib_first": used[0], "used_mib_last": used[-1],
                                "samples": len(samples), "processes_max": max(n for _, n, _ in samples),
                                "process_mib_max": max(m for _, _, m in samples)}
    shutil.rmtree(out_dir.parent, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the plumbing)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["pytest", "families", "dp", "simulate"])
    args = ap.parse_args(argv)
    mode = DRY if args.dry_run else REAL
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.monotonic()
    report = {"dry_run": args.dry_run, "device": device_info(), "mode": mode, "sections_s": {}, "total_s": 0.0}
    print(f"device: {json.dumps(report['device'])}", flush=True)
    caps = {"pytest": mode["pytest_cap_s"], "families": mode["families_cap_s"], "dp": mode["dp_section_cap_s"],
            "simulate": mode["simulate_cap_s"]}
    out = ROOT / "benchmarks" / "results" / ("gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    for name in ("pytest", "families", "dp", "simulate"):
        if name in args.skip:
            continue
        t0 = time.monotonic()
        deadline = t0 + caps[name]
        if name == "pytest":
            report["pytest"] = run_pytest(caps[name])
        elif name == "families":
            report["families"] = families_section(mode, deadline)
        elif name == "dp":
            report["dp"] = dp_section(mode, report.get("families", {}), deadline)
        else:
            report["simulate"] = simulate_section(mode, caps[name])
        report["sections_s"][name] = round(time.monotonic() - t0, 1)
        report["total_s"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(report, indent=2, default=float) + "\n")  # after each section: a killed run keeps them
        print(f"{name}: done in {report['sections_s'][name]} s", flush=True)
    print(summary(report))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def summary(report: dict) -> str:
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"gpu_check{' (DRY RUN on CPU: not GPU numbers)' if report['dry_run'] else ''}: "
             f"{report['device'].get('gpu', 'cpu')}, {report['total_s']} s"]
    if "pytest" in report:
        lines.append(f"  pytest -m gpu: {report['pytest']['summary']}")
    for family, r in report.get("families", {}).items():
        b, n = r.get("bf16", {}), r.get("none", {})
        lines.append(f"  {family:12s} bf16 {fmt(b.get('steps_per_s'))} steps/s (peak {fmt(b.get('peak_mib'), '{:.0f}')} MiB)"
                     f"  none {fmt(n.get('steps_per_s'))} steps/s (peak {fmt(n.get('peak_mib'), '{:.0f}')} MiB)"
                     f"  bf16/none {fmt(r.get('speedup_bf16'), '{:.2f}')}x")
    for family, r in report.get("dp", {}).items():
        lines.append(f"  {family:12s} DP-SGD {fmt(r.get('steps_per_s'))} steps/s, DP/plain "
                     f"{fmt(r.get('ratio_dp_over_plain'), '{:.2f}')}x" + (f" ({r['skipped']})" if "skipped" in r else ""))
    if "simulate" in report:
        s = report["simulate"]
        smi = s.get("nvidia_smi", {})
        lines.append(f"  simulate 4 sites: rc {s['rc']}, {s['wall_s']:.0f} s, rounds {s['rounds_seen']}, "
                     f"max reserved at a round's start {fmt(s.get('max_reserved_at_round_start_mib'))} MiB, "
                     f"nvidia-smi max {fmt(smi.get('used_mib_max'), '{:.0f}')} MiB in {smi.get('processes_max', '-')} "
                     f"process(es), released between rounds: "
                     f"{s['released_between_rounds']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
