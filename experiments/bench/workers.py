"""Each framework timed alone, in fresh worker processes run in alternating order, and their results pooled.

Separate processes keep each framework's peak memory its own and keep one framework's freed blocks from
fragmenting the other's heap (XLA:CPU's calls after a block of torch calls grew the heap again and ran slower); the
order JAX, torch, torch, JAX, ... keeps a drift in the machine's speed over a section from biasing either.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[2]


def in_subprocess(section: str, framework: str, repeats: int) -> dict:
    """Run one framework's measurement of `section` in a fresh interpreter (`--worker`): its JSON result."""
    command = [sys.executable, "-m", "experiments.bench", "--worker", f"{section}:{framework}",
               "--repeats", str(repeats)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def process_order(processes: int) -> list[str]:
    """Frameworks in the order their worker processes run: JAX, torch, torch, JAX, ... (a drift in the machine's
    speed over the section then biases neither)."""
    return [fw for i in range(processes) for fw in (("jax", "torch") if i % 2 == 0 else ("torch", "jax"))]


def in_workers(section: str, repeats: int, processes: int) -> dict[str, list[dict]]:
    """Each framework's results from `processes` worker processes of `section`, run in `process_order`."""
    runs = {"jax": [], "torch": []}
    for framework in process_order(processes):
        print(f"[{section}] {framework} (process {len(runs[framework]) + 1} of {processes}) ...", flush=True)
        runs[framework].append(in_subprocess(section, framework, repeats))
    return runs


def pooled(runs: list[dict]) -> dict:
    """One framework's worker results as one: the first process's fields (loss, gradient norm, compile time), the
    calls of every process (`process_ms`, one row each; `all_ms` flat) and their median, and, for the steps, the
    largest memory figures with each process's RSS increase."""
    process_ms = [run["all_ms"] for run in runs]
    calls = [t for times in process_ms for t in times]
    out = {**runs[0], "process_ms": process_ms, "all_ms": calls, "median_ms": float(np.median(calls))}
    if "rss_increase_mib" in runs[0]:
        out["rss_increase_per_process_mib"] = [run["rss_increase_mib"] for run in runs]
        for key in ("rss_peak_first_call_mib", "rss_peak_steps_mib", "rss_increase_mib"):
            out[key] = max(run[key] for run in runs)
    return out
