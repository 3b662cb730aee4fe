"""Keep a training step's large buffers in the heap instead of fresh pages from the kernel.

glibc's ``malloc`` serves an allocation above its mmap threshold with fresh pages from the kernel
and gives the top of the heap back once more than its trim threshold is free, so a buffer that a
training step allocates and frees every step costs a page fault per 4 KiB page, zeroed by the
kernel, each step. glibc raises the mmap threshold by itself only after it has freed such a block
(dynamically, up to 32 MiB), which a long-lived process has done long before and a new site process
(a simulated site's Ray actor, a SuperNode's ClientApp) has not: its first rounds trained ~1.6x
slower than the plain loop, ~19,500 minor page faults a step (benchmarks/README.md, "Federation vs
a plain PyTorch loop"). DP-SGD allocates more: the VAE's 2048 -> 128 linear layer alone has
32 x 128 x 2048 floats = 33.5 MB of per-sample gradients (above the 32 MiB cap), 13-18 ms per step
to fill.

:func:`keep_large_allocations` (called by every site's training, ``medgen.client.task.train_local``,
and when DP-SGD is switched on, :func:`medgen.privacy.dp.private`) raises both thresholds for the
process (``mallopt``: mmap threshold ``MMAP_THRESHOLD``, trim threshold ``TRIM_THRESHOLD``), so
those buffers are reused from the heap. The cost: up to ``TRIM_THRESHOLD`` of freed memory stays in
the process instead of going back to the system. This is the glibc setting that PyTorch's CPU
performance guide reaches with jemalloc / tcmalloc. It is a no-op where the C library is not glibc
(macOS, musl) and when ``MEDGEN_MALLOC_TUNING=0``.
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
