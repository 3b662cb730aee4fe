"""Test data made on the fly: small brain-like NIfTI volumes, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.config import load_config

# Tests run tiny models: one thread is faster and steadier than two contending on a 2-core machine.
torch.set_num_threads(1)


def head(shape=(40, 48, 40), seed=0, lesion_centre=None, lesion_radius=4):
    """A brain-like ellipsoid with a brighter core ("white matter"), 2 mm voxels, RAS.

    Returns (image float32, lesion mask uint8). With ``lesion_centre`` (voxel) a dark sphere
    is written into the image and the mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    image = np.where(r < 1, 60.0, 0.0) + np.where(r < 0.6, 40.0, 0.0)
    image += np.where(r < 1, rng.normal(0, 2, shape), 0)
    lesion = np.zeros(shape, np.uint8)
    if lesion_centre is not None:
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        d = np.sqrt(((idx - np.array(lesion_centre)[:, None, None, None]) ** 2).sum(0))
        lesion[d <= lesion_radius] = 1
        image[lesion == 1] = 20.0
    return image.astype(np.float32), lesion


# Data settings of the tests that preprocess phantom or synthetic volumes without brain masks: deepbet
# (~2.5 s per volume) and N4 (~1 s) would make the suite minutes slower; test_brain_extraction.py
# tests both. The default data.brain_mask=auto is for real scans; data.bias_correction=none is the default too.
FAST_DATA = ["data.brain_mask=threshold", "data.bias_correction=none"]


def interruptible() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT, as Ctrl-C would: a shell runs its
    background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-40, -48, -40]


def save(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_plain_site(folder: Path, n_healthy=2, n_lesion=2) -> Path:
    """A plain-file site: sub-XX.nii.gz scans and sub-XX_mask.nii.gz lesion masks."""
    for i in range(n_healthy + n_lesion):
        is_lesion = i >= n_healthy
        image, mask = head(seed=i, lesion_centre=(14, 24, 20) if is_lesion else None)
        save(folder / f"sub-{i:02d}.nii.gz", image)
        if is_lesion:
            save(folder / f"sub-{i:02d}_mask.nii.gz", mask)
    return folder


# `make test` runs two pytest-xdist workers. The tests that start Ray or a SuperLink with its
# SuperNodes use both cores and wait on processes: those of one group run one after another on one
# worker (two deployments, or two simulations, are never up at once), the two groups side by side,
# and the single-threaded rest fills in. (xdist's own `xdist_group` mark has no effect under pytest 9:
# it renames `item._nodeid`, which pytest 9 no longer reads.)
FEDERATION_GROUPS = {"tests/test_deployment.py": "deployment", "tests/test_flwr_run.py": "simulation",
                     "tests/test_secagg.py": "simulation", "tests/test_simulation.py": "simulation"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FederationGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return FEDERATION_GROUPS.get(nodeid.split("::")[0], nodeid)

    return FederationGroups(config, log)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache (``data.cache_dir``) for the modules that run the tiny phantom cohort (sites
    A, B, C x 3 subjects): the cohort is made once per session instead of once per module (~5 s
    each), and slices preprocessed with the same settings are reused. Entries are keyed by their
    inputs and settings, and no test writes into the cohort (the tests that break a site copy or
    link its files into a folder of their own)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def cfg(tmp_path):
    """Default config with the slice cache inside the test's tmp folder and ``FAST_DATA`` (the
    synthetic heads here are ellipsoids, not brains)."""
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *FAST_DATA])
