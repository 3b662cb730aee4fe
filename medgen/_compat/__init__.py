"""The only place that reaches into Flower's, Opacus' or Ray's modules beyond their documented
API: one module per library (``flwr.py``, ``opacus.py``, ``ray.py``, ``deepbet.py``), each saying
the versions it was written against. ``flwr.py``, ``opacus.py`` and ``ray.py`` check the installed
version when they are imported (:func:`check_version`) and refuse one outside the tested range,
naming both.
``tests/test_compat.py`` fails if another medgen module imports a Flower or Opacus internal."""

from __future__ import annotations

import re


class IncompatibleVersion(ImportError):
    """An installed library's version is outside the range medgen's compat module was tested with."""


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise IncompatibleVersion(f"cannot read the version {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def _pad(a: tuple[int, ...], n: int) -> tuple[int, ...]:
    return a + (0,) * (n - len(a))


def check_version(package: str, installed: str, minimum: str, below: str, uses: str) -> str:
    """``installed`` if ``minimum <= installed < below`` (release numbers only: 1.41.2rc1 counts as
    1.41.2); else IncompatibleVersion naming the package, both versions and what needs the range
    (``uses``). A pre-release of ``below`` (e.g. 1.42.0rc1 for below 1.42) is outside the range."""
    try:
        have = _release(installed)
    except IncompatibleVersion:
        raise IncompatibleVersion(f"{package}: cannot read the installed version {installed!r}; medgen needs "
                                  f"{package}>={minimum},<{below} ({uses})") from None
    low, high = _release(minimum), _release(below)
    n = max(len(have), len(low), len(high))
    if not _pad(low, n) <= _pad(have, n) < _pad(high, n):
        raise IncompatibleVersion(
            f"{package} {installed} is installed, but medgen is tested with {package}>={minimum},<{below} "
            f"({uses}). Install the tested versions: pip install -c constraints.txt -e .")
    return installed
