"""Known forward operators f of the reconstruction tasks, the ``--task`` syntax, and each task's
trivial baselines.

Images are (B, 1, S, S) float32 in [0, 1]. An operator maps a clean image x to what was observed,
y = f(x); ``data_term(y, f(x_hat))`` is the per-image mean squared error over what was observed.

``--task`` syntax:

- ``superres:K`` — y = K x K area average of x (``avg_pool2d``, stride K): (B, 1, S/K, S/K);
  K an integer >= 2 that divides S. Baselines: ``bicubic`` and ``nearest`` upsampling, and
  ``back-projection`` (bicubic corrected by iterative back-projection until its block averages
  are y: the same correction ``consistent`` applies to the generator's output).
- ``inpaint:box[:F]`` — a centred square hole of side round(F * S) pixels (default F = 0.5: a
  quarter of the slice, mostly brain) is missing; y = x outside it, 0 inside.
- ``inpaint:random[:P]`` — each pixel missing with probability P (default 0.5), a fresh pattern
  per slice drawn from the seed.
- ``inpaint:FILE`` — a NIfTI mask on the slice grid, non-zero = missing: (S, S) or (S, S, 1) for
  every slice, or (S, S, n) one per reconstructed slice, axes as in the NIfTI files ``medgen
  reconstruct`` writes (``truth.nii.gz``: array [row, column, slice]).

Inpainting baselines: ``zero-filled`` (y itself), ``mean-fill`` (the hole gets the mean of the
observed non-zero pixels, i.e. of the observed brain: preprocessing zeroes everything outside it),
and ``diffusion`` (harmonic fill: the hole relaxed to the solution of Laplace's equation with the
observed pixels as boundary values, by Jacobi iteration from the mean fill).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgen.config import ConfigError

BACK_PROJECTIONS = 10  # smooth back-projection steps of a super-resolution result before the exact one
DIFFUSION_ITERATIONS = 400  # Jacobi sweeps of the diffusion fill (a 32-px hole converges to ~1e-3)


class Operator(ABC):
    """A forward operator f with its baselines. ``task`` is its ``--task`` text."""

    task: str

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): (B, 1, S, S) in [0, 1] -> the observation."""

    @abstractmethod
    def data_term(self, y: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared error between observation y and f(x) over the observed values."""

    @abstractmethod
    def baselines(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trivial reconstructions of y, by name: each (B, 1, S, S) in [0, 1]. The first is
        the solver's first guess (a VAE starts from its encoding)."""

    @abstractmethod
    def consistent(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x corrected to agree with the observation: f(result) = y (up to clipping to [0, 1])."""

    @abstractmethod
    def shown(self, y: torch.Tensor) -> torch.Tensor:
        """The observation drawn at full size (B, 1, S, S), for pictures."""

    def subset(self, index: slice) -> Operator:
        """The operator of the slices ``index`` of a batch (per-slice masks); default: itself."""
        return self


@dataclass
class Downsample(Operator):
    """y = area average over ``factor`` x ``factor`` blocks: (B, 1, S, S) -> (B, 1, S/factor, S/factor)."""

    factor: int

    @property
    def task(self) -> str:
        return f"superres:{self.factor}"

    def __call__(self, x):
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ConfigError(f"--task {self.task}: the slice side {x.shape[-1]} is not a multiple of {self.factor}")
        return F.avg_pool2d(x, self.factor)

    def data_term(self, y, fx):
        return ((y - fx) ** 2).flatten(1).mean(1)

    def _up(self, y, mode):
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(y, scale_factor=self.factor, mode=mode, **kwargs)

    def baselines(self, y):
        bicubic = self._up(y, "bicubic").clamp(0, 1)
        return {"bicubic": bicubic, "nearest": self._up(y, "nearest"), "back-projection": self.consistent(bicubic, y)}

    def consistent(self, x, y):
        """Iterative back-projection (Irani & Peleg 1991): BACK_PROJECTIONS steps x += bicubic_up(y - f(x))
        (smooth corrections), then one x += nearest_up(y - f(x)), after which the block averages are
        exactly y (before clipping to [0, 1])."""
        for _ in range(BACK_PROJECTIONS):
            x = x + self._up(y - self(x), "bicubic")
        return (x + self._up(y - self(x), "nearest")).clamp(0, 1)

    def shown(self, y):
        return self._up(y, "nearest")


@dataclass
class Mask(Operator):
    """y = x where observed, 0 where ``missing`` (bool (B, 1, S, S) or (1, 1, S, S), True = missing)."""

    missing: torch.Tensor
    task: str = "inpaint"

    def _keep(self, x):
        return (~self.missing).to(x.device, x.dtype)

    def __call__(self, x):
        return x * self._keep(x)

    def data_term(self, y, fx):
        keep = self._keep(fx).expand_as(fx)
        return (((y - fx) ** 2) * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)

    def baselines(self, y):
        keep = self._keep(y).expand_as(y)
        brain = keep * (y > 0)
        mean = (y * brain).flatten(1).sum(1) / brain.flatten(1).sum(1).clamp_min(1)
        mean_fill = y * keep + (1 - keep) * mean[:, None, None, None]
        x = mean_fill
        for _ in range(DIFFUSION_ITERATIONS):  # Jacobi: each missing pixel <- mean of its 4 neighbours
            x = y * keep + (1 - keep) * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _FOUR_NEIGHBOURS.to(x))
        return {"diffusion": x.clamp(0, 1), "mean-fill": mean_fill.clamp(0, 1), "zero-filled": y}

    def consistent(self, x, y):
        keep = self._keep(y)
        return y * keep + x * (1 - keep)

    def shown(self, y):
        return y

    def subset(self, index):
        return Mask(self.missing if len(self.missing) == 1 else self.missing[index], self.task)


_FOUR_NEIGHBOURS = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3) / 4


# ----------------------------------------------------------------------------- --task
@dataclass(frozen=True)
class Task:
    """A parsed ``--task``: kind ``superres`` (``factor``) or ``inpaint`` (``hole`` = box / random
    with ``amount``, or ``path`` of a NIfTI mask)."""

    text: str
    kind: str
    factor: int = 0
    hole: str = ""
    amount: float = 0.0
    path: Path | None = None

    @property
    def slug(self) -> str:
        """A file-name-safe name: superres4, inpaint-box, inpaint-<mask file stem>."""
        if self.kind == "superres":
            return f"superres{self.factor}"
        return f"inpaint-{self.hole or self.path.name.split('.')[0]}"

    def operator(self, n: int, size: int, seed: int) -> Operator:
        """The operator for n slices of S = ``size`` pixels (random holes drawn from ``seed``)."""
        if self.kind == "superres":
            if size % self.factor:
                raise ConfigError(f"--task {self.text}: the slice side {size} (data.image_size) is not a multiple "
                                  f"of {self.factor}")
            return Downsample(self.factor)
        if self.hole == "box":
            side = max(1, round(self.amount * size))
            start = (size - side) // 2
            missing = torch.zeros(1, 1, size, size, dtype=torch.bool)
            missing[..., start:start + side, start:start + side] = True
        elif self.hole == "random":
            g = torch.Generator().manual_seed(seed)
            missing = torch.rand(n, 1, size, size, generator=g) < self.amount
        else:
            missing = _nifti_mask(self, n, size)
        return Mask(missing, self.text)


def parse_task(text: str) -> Task:
    """``superres:K`` / ``inpaint:box[:F]`` / ``inpaint:random[:P]`` / ``inpaint:FILE`` (see the
    module docstring); ConfigError naming ``--task`` for anything else or a mask file that is not there."""
    kind, _, arg = text.partition(":")
    usage = "use superres:K (K = 2, 4, ...) or inpaint:box[:F], inpaint:random[:P], inpaint:MASK.nii.gz"
    if kind == "superres":
        if not arg.isdigit() or int(arg) < 2:
            raise ConfigError(f"--task {text}: the factor must be an integer >= 2 ({usage})")
        return Task(text, kind, factor=int(arg))
    if kind != "inpaint" or not arg:
        raise ConfigError(f"--task {text}: unknown task ({usage})")
    hole, _, amount = arg.partition(":")
    if hole in ("box", "random"):
        try:
            value = float(amount) if amount else 0.5
        except ValueError:
            value = -1.0
        if not 0 < value < 1:
            raise ConfigError(f"--task {text}: the {hole} {'side' if hole == 'box' else 'fraction'} must be a number "
                              f"between 0 and 1 ({usage})")
        return Task(text, kind, hole=hole, amount=value)
    path = Path(arg)
    if not path.is_file():
        raise ConfigError(f"--task {text}: mask file {path} does not exist ({usage})")
    return Task(text, kind, path=path)


def _nifti_mask(task: Task, n: int, size: int) -> torch.Tensor:
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(task.path)).dataobj)
    except Exception as e:  # nibabel raises many kinds for a file that is not NIfTI
        raise ConfigError(f"--task {task.text}: {task.path} is not a readable NIfTI mask ({type(e).__name__}: {e})") \
            from None
    shape = data.shape
    data = data.reshape(*data.shape[:2], -1) if data.ndim >= 2 else data
    if data.ndim != 3 or data.shape[:2] != (size, size) or data.shape[2] not in (1, n):
        raise ConfigError(f"--task {task.text}: the mask {task.path} has shape {shape}; it must be ({size}, "
                          f"{size}) or ({size}, {size}, {n}) (the slice grid, data.image_size = {size}, and {n} slices)")
    missing = torch.from_numpy(np.moveaxis(data != 0, 2, 0).copy())[:, None]
    if not missing.any() or missing.all():
        raise ConfigError(f"--task {task.text}: the mask {task.path} marks {'no' if not missing.any() else 'every'} "
                          f"pixel as missing (non-zero = missing)")
    return missing
