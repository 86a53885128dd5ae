"""experiments.host: the allocator settings really stop freed memory from being page-faulted in again."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
import experiments
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20

def use_and_free():  # what XLA does with a temporary buffer
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)

use_and_free()  # first use of the memory: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    use_and_free()
print(experiments.ALLOCATOR_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(setting: str) -> tuple[str, int]:
    env = {**os.environ, "FOA_MALLOPT": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_blocks():
    """20 allocations of a 64 MiB array: 16,384 pages each when every free returns them to the kernel (glibc's
    default for blocks this large); with the tuning the heap keeps them and later allocations fault almost nothing."""
    tuned, faults_tuned = probe("1")
    untuned, faults_default = probe("0")
    assert (tuned, untuned) == ("True", "False")
    pages = 64 * 2**20 // 4096
    assert faults_default >= 20 * pages * 0.9
    assert faults_tuned < 0.05 * faults_default
