"""Process-wide host settings for the runnable stages: keep freed memory in the heap instead of returning it to the OS.

XLA:CPU allocates every temporary buffer of a jitted call with `malloc` and frees it when the call ends; glibc hands
large blocks straight back to the kernel, so the next call page-faults the same memory in again, 4 KiB at a time.
`mallopt` fixes it for the whole process: no `mmap`ed blocks, one arena (blocks freed by one XLA worker thread serve
the next), and no heap trimming until 2 GiB lie free at the top. The cost is that freed memory stays mapped (RSS does
not shrink after a peak), which a training process does not mind. Measurements: docs/performance.md.

It is applied when `experiments` is imported (before any stage imports JAX or torch); `FOA_MALLOPT=0` turns it off.
Library users (`import foa_jax`) are untouched: an allocator is the application's choice.

A kept heap still grows when it fragments: see `reserve_heap`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameter numbers (malloc.h) and the values chosen above.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = {M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20, M_MMAP_MAX: 0, M_ARENA_MAX: 1}
# The largest `reserve_heap`: freed, it stays below M_TRIM_THRESHOLD with M_TOP_PAD and some free heap on top.
HEAP_RESERVE_MAX = 7 * 2**28  # 1.75 GiB


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def tune_allocator() -> bool:
    """Apply `SETTINGS` with glibc's `mallopt`; False (and nothing changed) off glibc or when `FOA_MALLOPT=0`."""
    if os.environ.get("FOA_MALLOPT", "1") == "0":
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())


def reserve_heap(nbytes: int) -> int:
    """Fault in `nbytes` (at most `HEAP_RESERVE_MAX`) at the top of the heap and free them, so that the heap's later
    growth lands on resident pages; returns the bytes reserved. Call it only under `tune_allocator`'s settings:
    without them glibc maps a block this large on its own and unmaps it again on free.

    Why: a jitted step's temporaries are one block per call. Freed, that block is a hole in the heap, and small
    allocations made between calls are cut from it; the next call's block then no longer fits, the heap grows by a
    whole block and faults it in anew. Reserving a few blocks before the first call keeps later calls fault-free
    (measurements: docs/performance.md).
    """
    nbytes = min(int(nbytes), HEAP_RESERVE_MAX)
    libc = _libc()
    if nbytes <= 0 or libc is None:
        return 0
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    block = libc.malloc(nbytes)
    if not block:
        raise MemoryError(f"reserve_heap: malloc({nbytes}) failed")
    ctypes.memset(block, 0, nbytes)  # a page is only resident once written
    libc.free(block)
    return nbytes
