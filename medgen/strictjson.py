"""Strict JSON for every file medgen writes: NaN and ±inf become ``null`` (bare ``NaN`` / ``Infinity``
are not JSON, and strict parsers reject them), numpy scalars and arrays become plain numbers and
lists. Readers of numeric records turn ``null`` back into NaN (:func:`null_to_nan`)."""

from __future__ import annotations

import json
import math

import numpy as np


def finite(obj):
    """``obj`` with every non-finite float replaced by None, numpy scalars/arrays made plain."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`finite` ``(obj)``; never writes NaN or Infinity."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def null_to_nan(obj):
    """A record read back: None (a non-finite number when written) becomes NaN, in lists too."""
    if isinstance(obj, dict):
        return {k: null_to_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [null_to_nan(v) for v in obj]
    return float("nan") if obj is None else obj


def _reject(name: str):
    raise ValueError(f"not strict JSON: {name}")


def loads(text: str):
    """``json.loads`` that refuses bare NaN / Infinity (what a strict parser does)."""
    return json.loads(text, parse_constant=_reject)
