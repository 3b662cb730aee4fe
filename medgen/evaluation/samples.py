"""Sample grids: what the generator makes, one row per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medgen.models import HEALTHY, LESION, GenerativeModel

CLASS_NAMES = {HEALTHY: "healthy", LESION: "lesion"}


def generate(model: GenerativeModel, per_class: int, seed: int,
             classes: tuple[int, ...] = (HEALTHY, LESION)) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of each class of ``classes`` from a fixed seed: (images (n·k, 1, S, S) in
    [0, 1], labels (n·k,)), class by class."""
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        return model.sample(labels, generator=generator).cpu(), labels


def save_grid(path: str | Path, images: torch.Tensor, rows: int, pad: int = 2) -> Path:
    """Tile (N, 1, S, S) images in [0, 1] into ``rows`` rows and write an 8-bit grey PNG."""
    path = Path(path)
    n, _, s, _ = images.shape
    cols = int(np.ceil(n / rows))
    canvas = np.ones((rows * (s + pad) + pad, cols * (s + pad) + pad), np.float32)
    for i, img in enumerate(images[:, 0].numpy()):
        r, c = divmod(i, cols)
        canvas[pad + r * (s + pad): pad + r * (s + pad) + s, pad + c * (s + pad): pad + c * (s + pad) + s] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path
