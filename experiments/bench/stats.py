"""The JAX/torch ratio of median call times, its two-stage bootstrap interval and the verdict on the target.

A single ratio of medians moves by more than the margins the bench decides on between runs of a shared VM, so every
ratio comes with an interval that says how far that noise could move it.
"""

from __future__ import annotations

import numpy as np

MIN_CALLS_FOR_INTERVAL = 5
TARGET_RATIO = 1.0  # the project's target: JAX <= 1.0x torch eager
BOOTSTRAP_SEED = 0


def ratio_interval(jax_ms, torch_ms, level: float = 0.95, resamples: int = 10_000,
                   seed: int = BOOTSTRAP_SEED) -> dict:
    """JAX/torch ratio of median call times with a percentile-bootstrap interval at `level`.

    Times are one process's calls (1-D) or several processes' calls, one row each (2-D, the step sections' worker
    processes). The bootstrap resamples each framework independently (they are separate calls, not pairs) and in two
    stages: the processes, with replacement, then the calls of each chosen process; the ratio of the resampled
    medians gives the interval. With one process the first stage does nothing and this is the plain bootstrap over
    calls. Call-to-call noise alone understates the spread: JAX's two-core speed depends on the process, which only
    the first stage sees, and with 2 processes per framework it sees it only coarsely, so compare runs as well.
    `low`/`high` are None when either side has fewer than `MIN_CALLS_FOR_INTERVAL` calls (a median of fewer has too
    few values to resample).
    """
    jax_ms, torch_ms = (_process_times(name, x) for name, x in (("jax_ms", jax_ms), ("torch_ms", torch_ms)))
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    out = {"ratio": float(np.median(jax_ms) / np.median(torch_ms)), "level": level, "low": None, "high": None,
           "calls": [int(jax_ms.size), int(torch_ms.size)], "processes": [len(jax_ms), len(torch_ms)]}
    if min(jax_ms.size, torch_ms.size) < MIN_CALLS_FOR_INTERVAL:
        return out
    rng = np.random.default_rng(seed)
    medians = [_resampled_medians(x, resamples, rng) for x in (jax_ms, torch_ms)]
    low, high = np.quantile(medians[0] / medians[1], [(1 - level) / 2, (1 + level) / 2])
    return {**out, "low": float(low), "high": float(high)}


def _process_times(name: str, times) -> np.ndarray:
    """Times as (processes, calls) float64, checked: every process the same number of positive, finite calls."""
    try:
        x = np.asarray(times, np.float64)
    except ValueError:  # ragged rows
        x = np.asarray([], np.float64)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name}: expected a non-empty list of positive, finite times, or one such list per process "
                         f"with equally many calls, got {np.asarray(times, dtype=object).tolist()}")
    return x


def _resampled_medians(times: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of `resamples` two-stage bootstrap samples of (processes, calls) times: processes with replacement,
    then each chosen process's calls with replacement."""
    processes, calls = times.shape
    chosen = rng.integers(processes, size=(resamples, processes, 1))
    picks = rng.integers(calls, size=(resamples, processes, calls))
    return np.median(times[chosen, picks].reshape(resamples, -1), axis=1)


def verdict(interval: dict, target: float = TARGET_RATIO) -> str:
    """'met' when the whole interval is at or below `target`, 'missed' when it is all above, else 'undecided'."""
    if interval["low"] is None:
        return f"undecided (< {MIN_CALLS_FOR_INTERVAL} calls)"
    if interval["high"] <= target:
        return "met"
    return "missed" if interval["low"] > target else "undecided"
