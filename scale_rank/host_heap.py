"""CPU training: keep freed heap memory in the process instead of handing it back to the OS every step.

On the CPU, PyTorch takes tensor memory from the C library's malloc. glibc's defaults give memory back as soon
as enough of it lies free at the top of the heap (and serve large blocks from fresh mappings), so a training
step that allocates and frees the same activations every step maps them again every step, and every 4 KiB page
of them faults on first touch: about 1,000-4,000 page faults per step (4-16 MiB) in bench/paired_overhead.py's
DDP runs, a few milliseconds of a 130 ms step, landing on whichever training happens to free the heap top.
Fixing the two thresholds at their largest useful values keeps those pages mapped from step to step (the
process keeps its peak heap; blocks over 32 MiB, which glibc always maps on their own, still fault).

GPU training is unaffected: activations live in CUDA's caching allocator, and `init_processes` only calls this
for CPU processes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts (its dynamic threshold's ceiling on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int: 2 GiB free at the heap top before any is returned

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process (once); False where the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc only
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
