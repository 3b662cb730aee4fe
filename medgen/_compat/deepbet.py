"""deepbet brain extraction (Fisch et al. 2024) on an array medgen already holds.

deepbet 1.0.2 ships its two TorchScript networks (``model.pt``, ``bbox_model.pt``, 8.7 MB each) in
its wheel, under a top-level ``data/models/`` folder of site-packages; nothing is downloaded. We
call ``BrainExtraction.run_model`` + ``postprocess`` (what its ``run`` does after
``nib.as_closest_canonical``), so the input must be in RAS+ voxel order. Its tqdm, pandas and GUI
(customtkinter, only imported by ``deepbet.ui``) stay behind this module. Written against deepbet
1.0.x; another version is reported unavailable with both versions named.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np

TESTED = "1.0"
WEIGHTS = ("data/models/model.pt", "data/models/bbox_model.pt")
_IMPORTS = ("deepbet", "cc3d", "fill_voids", "pandas", "tqdm")  # what ``deepbet.bet`` imports beyond torch/nibabel
_lock = threading.Lock()  # BrainExtraction keeps the last bounding box on the instance


class DeepbetUnavailable(RuntimeError):
    """deepbet, or one of its weight files, is not installed (the message says which)."""


def version() -> str:
    try:
        return importlib.metadata.version("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise DeepbetUnavailable("deepbet is not installed (pip install -c constraints.txt deepbet)") from None


def weight_files() -> tuple[Path, Path]:
    """The installed (segmentation, bounding-box) network files; DeepbetUnavailable naming a missing one."""
    v = version()
    if not v.startswith(TESTED + "."):
        raise DeepbetUnavailable(f"medgen's brain extraction is written against deepbet {TESTED}.x; deepbet {v} "
                                 "is installed (install with constraints.txt)")
    recorded = {str(f).replace("\\", "/"): f for f in importlib.metadata.files("deepbet") or []}
    dist = importlib.metadata.distribution("deepbet")
    found = []
    for name in WEIGHTS:
        path = Path(dist.locate_file(recorded.get(name, name)))
        if not path.is_file():
            raise DeepbetUnavailable(f"deepbet {v} is installed but its network file {path} is missing "
                                     "(reinstall deepbet: its wheel carries the weights)")
        found.append(path)
    return found[0], found[1]


def unavailable_reason() -> str | None:
    """None when deepbet and its weights are usable, else why not (one line)."""
    try:
        weight_files()
    except DeepbetUnavailable as e:
        return str(e)
    # Checked without importing them (pandas alone takes ~0.5 s): a run served from the cache never loads them.
    missing = [m for m in _IMPORTS if importlib.util.find_spec(m) is None]
    return f"deepbet's dependencies {', '.join(missing)} are not installed" if missing else None


@functools.lru_cache(maxsize=4)
def _extractor(device: str):
    import torch
    from deepbet.bet import BrainExtraction

    model, bbox = weight_files()
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load, which deepbet's networks need
        warnings.simplefilter("ignore", DeprecationWarning)
        bet = BrainExtraction(no_gpu=True, model_path=str(model), bbox_model_path=str(bbox))
    if device != "cpu":
        bet.model.to(torch.device(device))
        bet.bbox_model.to(torch.device(device))
    return bet


def brain_mask(data: np.ndarray, device: str = "cpu", threshold: float = 0.5) -> np.ndarray:
    """deepbet's brain mask of a (X, Y, Z) head or brain image in RAS+ voxel order: bool (X, Y, Z).

    Any intensity scale (deepbet normalises by its 0.5/99.5 percentiles). The networks are loaded
    once per process and device. Raises ValueError when deepbet finds no brain.
    """
    import torch

    x = np.ascontiguousarray(data, dtype=np.float32)
    with _lock, torch.no_grad():  # one scan at a time (and one load of the networks) per process
        bet = _extractor(device)
        try:
            prob = bet.run_model(x.copy())
            mask = bet.postprocess(prob > threshold)
        except (AssertionError, ValueError) as e:  # empty bounding box / no component to keep
            raise ValueError(f"deepbet found no brain ({e or type(e).__name__})") from None
    return np.asarray(mask, dtype=bool)
