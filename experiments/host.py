"""Process-wide host settings for the runnable stages: keep freed memory in the heap instead of returning it to the OS.

XLA:CPU allocates every temporary buffer of a jitted call with `malloc` and frees it when the call ends. glibc hands
large blocks straight back to the kernel (`munmap`, or trimming the heap top), so the next call page-faults the same
memory in again, 4 KiB at a time. On this VM a page fault costs microseconds, and there are many: 2.9 M minor
faults and 8.6 s of system time in 60 VAE train steps, and the tiny transformer's forward spent about half its
time in them. `mallopt` fixes it for the whole process: no `mmap`ed blocks, one arena so blocks freed by one XLA
worker thread serve the next, and no heap trimming until 2 GiB lie free at the top (the largest value mallopt
takes), with a small top pad so that a freed block of up to ~1.9 GiB stays below that. Measured (idle, 2 cores):
tiny forward 252 -> 141 ms, VAE train step 0.38 -> 0.34 s, minor faults per 60 VAE steps 2.9 M -> 0.25 M. A first
version kept only 1 GiB when trimming (and padded the top by 1 GiB, so every freed block over 1 GiB was trimmed):
the small benchmark's forward+backward, 0.63 GiB of temporaries plus its outputs, then re-faulted ~700 MiB in about
one call in eight (183 k faults, 2.2 s of system time, strace showing the heap top shrinking). The cost is that
freed memory stays mapped (RSS does not shrink after a peak), which a training process does not mind.

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

    Why: a jitted step's temporaries are one block per call (the small config's LoRA step: 606 MiB, XLA's
    `temp_size_in_bytes`). Freed, that block is a hole in the heap, and small allocations made between calls are
    cut from it; the next call's block then no longer fits, the heap grows by a whole block and faults it in anew.
    Measured on that step: 155 k faults in one call in 10-25 (+0.2-0.4 s; calls of 2.3-3.3 s against 1.3-1.4 s in
    the bench's processes that grew), the heap settling at up to three blocks (RSS +1.8 GiB); torch's step, on the
    same allocator, faulted 0-4 pages per call after two warm-up calls. With three blocks reserved before the first
    call, no call of 60 after the first faulted more than one page.
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
