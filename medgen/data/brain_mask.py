"""Which estimate a scan without a supplied brain mask gets (``data.brain_mask``), and the model's mask.

``model`` is deepbet (through :mod:`medgen._compat.deepbet`), ``threshold`` the Otsu heuristic
:func:`medgen.data.preprocess.estimate_brain_mask`, ``auto`` the model when deepbet and its weights
are installed, else the threshold. A supplied brain mask always wins (the caller's business).
"""

from __future__ import annotations

import functools

import numpy as np

from medgen.config import ConfigError

MODEL, THRESHOLD = "model", "threshold"


@functools.lru_cache(maxsize=1)
def _model_problem() -> str | None:
    from medgen._compat import deepbet

    return deepbet.unavailable_reason()


def resolve(setting: str) -> tuple[str, str | None]:
    """(method, fallback note) for ``data.brain_mask`` = ``setting``: method is MODEL or THRESHOLD;
    the note says why ``auto`` fell back (None otherwise). ConfigError when ``model`` is asked
    for and deepbet is unusable."""
    if setting == THRESHOLD:
        return THRESHOLD, None
    problem = _model_problem()
    if problem is None:
        return MODEL, None
    if setting == MODEL:
        raise ConfigError(f"data.brain_mask=model: {problem}; or set data.brain_mask=threshold")
    return THRESHOLD, f"data.brain_mask=auto used the threshold estimate: {problem}"


def cache_tag(method: str) -> str:
    """What identifies ``method``'s masks in the slice-cache key (the model's version for MODEL)."""
    if method == MODEL:
        from medgen._compat import deepbet

        return f"deepbet-{deepbet.version()}"
    return method


def model_mask(data: np.ndarray) -> np.ndarray:
    """deepbet's brain mask of a (X, Y, Z) RAS+ image (any intensity scale): bool (X, Y, Z), on the CPU.
    ValueError when it finds no brain."""
    from medgen._compat import deepbet

    return deepbet.brain_mask(data)
