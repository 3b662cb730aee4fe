"""Work on a site's scans in parallel threads (``data.workers``).

Preprocessing is mostly numpy, scipy.ndimage and zlib, which release the GIL: two threads
preprocess a site's scans about twice as fast as one on 2 cores (benchmarks/parallel_preprocess.py),
without the start-up of worker processes (each would import numpy, nibabel, scipy and torch again)
and with one copy of deepbet's networks (its inference runs one scan at a time, under its own
lock). There are never more threads than the CPUs this process may use (its torch threads: a
simulated site's ``simulation.client_cpus``, a deployed site's machine), whatever the study config
asks: a server cannot make a site use more than its own share of CPUs. Memory: one scan in flight
per thread. Results come back in the scans' order, so the slices are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def workers(requested: int | None) -> int:
    """Threads for a site: ``requested`` (``data.workers``; None: all), at most this process's CPUs."""
    available = max(1, torch.get_num_threads())
    return available if requested is None else max(1, min(requested, available))


def ordered_map(fn: Callable[[T], R], items: Sequence[T], n_workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, ``n_workers`` at a time."""
    if n_workers < 2 or len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(min(n_workers, len(items)), thread_name_prefix="medgen-preprocess") as pool:
        yield from pool.map(fn, items)
