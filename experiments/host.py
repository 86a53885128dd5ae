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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameter numbers (malloc.h) and the values chosen above.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = {M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20, M_MMAP_MAX: 0, M_ARENA_MAX: 1}


def tune_allocator() -> bool:
    """Apply `SETTINGS` with glibc's `mallopt`; False (and nothing changed) off glibc or when `FOA_MALLOPT=0`."""
    if os.environ.get("FOA_MALLOPT", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
