"""Timing and memory of one callable in one process, and the state of the machine around it.

Warm-up runs until a call no longer grows the heap; memory is sampled RSS (a block's own peak, which `ru_maxrss`
cannot separate from what the process did before); other jobs' CPU use and hypervisor steal are recorded because
they distort torch's barrier-synchronised threads far more than JAX's.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np
import psutil

from experiments import common

# A warm-up call that page-faults more than this many times grew the heap; warm up again, up to MAX_WARMUP_CALLS.
SETTLED_FAULTS = 2000
MAX_WARMUP_CALLS = 5


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(fn, first=None) -> dict:
    """Call `first` (default `fn`) once, then `fn` again while the last call page-faulted more than `SETTLED_FAULTS`
    times, at most `MAX_WARMUP_CALLS` calls in all: {"first_ms", "warmup_ms": every call, "warmup_faults"}.

    XLA:CPU's first calls after compiling grow the heap, each a little slower than the calls after; a training run
    pays that once, so timing it among the first `--repeats` calls would measure the heap, not the step.
    """
    times, faults = [], []
    for call in [first or fn] + [fn] * (MAX_WARMUP_CALLS - 1):
        before = minor_faults()
        times.append(wall_ms(call))
        faults.append(minor_faults() - before)
        if faults[-1] <= SETTLED_FAULTS:
            break
    return {"first_ms": times[0], "warmup_ms": times, "warmup_faults": faults}


def timed(fn, repeats: int, warmup=None) -> dict:
    """`warm_up` (its first call `warmup`, default `fn`), then the median of `repeats` calls of `fn`, which must
    block until its result is ready."""
    warm = warm_up(fn, warmup)
    times = [wall_ms(fn) for _ in range(repeats)]
    return {**warm, "median_ms": float(np.median(times)), "all_ms": times}


class PeakRSS:
    """Peak resident memory while the block runs, sampled every 5 ms, and the RSS when it started.

    `ru_maxrss` alone cannot separate a block from what the process did before it (model building, other sections);
    sampling the current RSS can, at the cost of missing spikes shorter than 5 ms.
    """

    def __enter__(self):
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def timed_step(run, repeats: int, compiled=None) -> dict:
    """`timed` for a train step, with memory: the RSS before the first call (weights, inputs, the framework and, for
    JAX, the compiled step loaded), the peak during the warm-up calls (`rss_peak_first_call_mib`) and the peak
    during the timed steps. A JAX step's heap is reserved first, as `common.train_loop` does (`reserved_mib`,
    counted in the RSS increase)."""
    with PeakRSS() as first_call:
        reserved = common.reserve_step_heap(compiled) if compiled is not None else 0
        warm = warm_up(run)
    with PeakRSS() as steady:
        times = [wall_ms(run) for _ in range(repeats)]
    mib = 2**20
    return {**warm, "median_ms": float(np.median(times)), "all_ms": times,
            "rss_before_mib": first_call.start / mib, "rss_peak_first_call_mib": first_call.peak / mib,
            "rss_peak_steps_mib": steady.peak / mib, "rss_increase_mib": (steady.peak - first_call.start) / mib,
            "reserved_mib": reserved / mib}


def compile_step(step, *args) -> tuple:
    """(compiled step, {"compile_s", "xla_gib": XLA's buffer plan}): compiled ahead of time so the timed calls
    never compile, and so the step's own memory is known apart from what compiling left in the process's heap."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    info = {"compile_s": time.perf_counter() - start}
    memory = compiled.memory_analysis()
    if memory is not None:
        info["xla_gib"] = {k: getattr(memory, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "temp")}
    return compiled, info


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------ the machine around it


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def others_cpu(seconds: float = 2.0) -> float:
    """CPU use of everything else on the machine, in cores, measured over `seconds` while this process idles.

    The load average lags by a minute and counts this benchmark's own threads; this does not. It matters because
    torch's OpenMP threads wait for each other at every operator: with one of the 2 cores taken by another job, a
    torch forward runs many times slower, JAX's much less so.
    """
    return psutil.cpu_percent(interval=seconds) / 100.0 * (os.cpu_count() or 1)


def steal_seconds() -> float:
    """CPU time the hypervisor ran other guests on this VM's CPUs (Linux `steal`, summed over CPUs; 0 elsewhere).

    Ratios measured under steal are not comparable with calm ones: steal slows torch's barrier-synchronised OpenMP
    threads about twice as much as JAX, which flatters JAX's ratio.
    """
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def wait_for_idle(max_wait_s: float, busy_cores: float = 0.3) -> float:
    """Wait (at most `max_wait_s`) until other jobs use less than `busy_cores` cores; returns their last use."""
    deadline = time.monotonic() + max_wait_s
    busy = others_cpu()
    while busy >= busy_cores and time.monotonic() < deadline:
        print(f"  waiting for an idle machine: other jobs use {busy:.2f} cores", flush=True)
        time.sleep(10)
        busy = others_cpu()
    return busy
