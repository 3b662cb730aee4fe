"""Keep DP-SGD's large per-step buffers in the heap instead of fresh pages from the kernel.

A DP-SGD step allocates and frees buffers of B x |layer| floats every step (per-sample gradients,
Opacus' clipping and noise). glibc's ``malloc`` serves an allocation above its mmap threshold
(dynamic, at most 32 MiB) with fresh pages from the kernel, and gives the top of the heap back once
more than its trim threshold (twice the mmap threshold) is free: every such buffer then costs a
page fault per 4 KiB page, zeroed by the kernel, each step. The VAE's 2048 -> 128 linear layer
alone has 32 x 128 x 2048 floats = 33.5 MB of per-sample gradients (above the 32 MiB cap): 13-18 ms
per step to fill, against ~1.5 ms for the norms and the clipped sum that read it.

:func:`keep_large_allocations` (called when DP-SGD is switched on, :func:`medgen.privacy.dp.private`)
raises both thresholds for the process (``mallopt``: mmap threshold ``MMAP_THRESHOLD``, trim
threshold ``TRIM_THRESHOLD``), so those buffers are reused from the heap. The cost: up to
``TRIM_THRESHOLD`` of freed memory stays in the process instead of going back to the system. This
is the glibc setting that PyTorch's CPU performance guide reaches with jemalloc / tcmalloc. It is a
no-op where the C library is not glibc (macOS, musl) and when ``MEDGEN_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20  # allocations up to 64 MiB come from the heap
TRIM_THRESHOLD = 128 << 20  # the heap keeps up to 128 MiB free before it shrinks

_done: bool | None = None


def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when they were set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("MEDGEN_MALLOC_TUNING", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return _done
    del version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
