"""Flower functions medgen calls that live in Flower's strategy modules rather than its top-level
API: the robust-aggregation rules of ``FedTrimmedAvg``, ``MultiKrum`` / ``Krum`` and ``Bulyan``.
Written against flwr 1.41; another version fails here, at import, with both versions named."""

from __future__ import annotations

import flwr

TESTED = "1.41"

if not flwr.__version__.startswith(TESTED + "."):
    raise ImportError(f"medgen's robust aggregation is written against flwr {TESTED}.x; flwr {flwr.__version__} "
                      f"is installed (install with constraints.txt)")

from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights  # noqa: E402
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # noqa: E402
from flwr.serverapp.strategy.multikrum import select_multikrum  # noqa: E402

__all__ = ["aggregate_n_closest_weights", "select_multikrum", "trim_mean"]
