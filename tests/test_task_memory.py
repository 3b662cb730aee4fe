"""A site's training keeps the memory a step frees for the next step (glibc's malloc), so that a
new site process (a simulated site's Ray actor, a SuperNode's ClientApp) trains as fast as a
long-lived one: without it every step page-faults its activations in again."""

import os
import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys
import numpy as np, torch
import medgen.client.task as task
from medgen.config import load_config
from medgen.data.dataset import SiteSlices
from medgen.models import build_model

torch.set_num_threads(1)
cfg = load_config(None, [])  # the default study: 64 px, width 16, batch 32
n, s = 64, cfg.data.image_size
rng = np.random.default_rng(0)
data = SiteSlices("A", rng.random((n, s, s), dtype=np.float32), np.ones((n, s, s), bool), np.zeros((n, s, s), bool),
                  np.zeros(n, np.int64), np.array(["a"] * n), np.arange(n))
model = build_model(cfg)
task.train_local(model, data, cfg, 0, steps=2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
task.train_local(model, data, cfg, 0, steps=4)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_step(mode: str) -> float:
    env = {**os.environ, "MEDGEN_MALLOC_TUNING": "1" if mode == "on" else "0"}  # 0: glibc's default thresholds
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=300, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_new_process_trains_without_page_faulting_every_step():
    from medgen.client.allocator import keep_large_allocations

    assert keep_large_allocations()
    kept, default = _faults_per_step("on"), _faults_per_step("off")
    # measured: ~19,500 minor page faults a step with glibc's defaults, ~250 with the memory kept
    assert default > 2000 and kept < default / 10, (kept, default)
