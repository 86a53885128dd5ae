"""`python -m experiments.bench`: the flags, the sections in order with the machine's state around each, bench.json
and the table; `--worker section:framework` is one worker process's measurement, printed as JSON."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import torch

import experiments.bench
from experiments import common
from experiments.bench import measure, report, steps, transformer
from experiments.bench.flux2_dev import bench_flux2_dev
from experiments.bench.sampler import bench_sampler
from experiments.bench.stats import MIN_CALLS_FOR_INTERVAL
from experiments.bench.workloads import SR_WORK

SECTIONS = ("transformer", "lora_step", "sampler", "dpo_step", "flux2_dev")
BUSY_CORES = 0.3  # other jobs' CPU use above which a section's ratios come with a warning
STEAL_CORES = 0.1

# What a worker process (`--worker section:framework`) runs, given `--repeats`.
WORKERS = {
    "lora_step": {"jax": functools.partial(steps.lora_step_jax, SR_WORK),
                  "torch": functools.partial(steps.lora_step_torch, SR_WORK)},
    "dpo_step": {"jax": functools.partial(steps.dpo_step_jax, SR_WORK),
                 "torch": functools.partial(steps.dpo_step_torch, SR_WORK)},
    **{f"transformer-{work.name}": {fw: functools.partial(transformer.transformer_worker, work, fw)
                                    for fw in ("jax", "torch")}
       for work in transformer.WORKLOADS},
}


def run_section(name: str, repeats: int, processes: int) -> dict:
    if name == "transformer":
        return transformer.bench_transformer(repeats, processes)
    if name == "sampler":
        return bench_sampler(repeats)
    if name == "flux2_dev":
        return bench_flux2_dev()
    return steps.bench_steps(name, repeats, processes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench",
                                description=experiments.bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--repeats", type=int, default=5,
                   help=f"timed calls per measurement (median), after a warm-up; a ratio's interval needs "
                        f"{MIN_CALLS_FOR_INTERVAL} calls per framework")
    p.add_argument("--processes", type=int, default=2,
                   help="worker processes per framework for the transformer and step sections (alternating JAX, "
                        "torch, torch, JAX, ...); the interval resamples them too")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each section, wait up to this long for other jobs to leave the CPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "section:framework": one step in this process, JSON out
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; known: {list(SECTIONS)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    return args


def measured_section(name: str, args) -> dict:
    """One section's results with the other jobs' CPU use before it and the hypervisor's steal during it, warning
    when either makes its ratios incomparable with a calm machine's."""
    busy = measure.wait_for_idle(args.wait_idle)
    stolen, began = measure.steal_seconds(), time.perf_counter()
    row = run_section(name, args.repeats, args.processes)
    row["others_cpu_cores_before"] = busy
    row["steal_cores"] = (measure.steal_seconds() - stolen) / (time.perf_counter() - began)
    if busy >= BUSY_CORES:
        print(f"  [{name}] measured while other jobs used {busy:.2f} of {os.cpu_count()} cores: torch suffers "
              f"most (see `measure.others_cpu`)", flush=True)
    if row["steal_cores"] >= STEAL_CORES:
        print(f"  [{name}] the hypervisor took {row['steal_cores']:.2f} cores on average: ratios are not comparable "
              f"with a calm machine's (see `measure.steal_seconds`)", flush=True)
    return row


def print_summary(results: dict, args) -> None:
    print()
    print("\n".join(report.table(results)))
    busy = {name: round(results[name]["others_cpu_cores_before"], 2) for name in args.only}
    print(f"other jobs' CPU use (cores) before each section: {busy}")
    steal = {name: round(results[name]["steal_cores"], 2) for name in args.only}
    print(f"hypervisor steal (cores, average) during each section: {steal}")
    machine = results["machine"]
    print(f"load average (1/5/15 min) at start {machine['load_at_start']}, at end {machine['load_at_end']}; "
          f"{os.cpu_count()} CPUs; total {machine['total_s']:.0f} s")
    print(f"wrote {args.out / 'bench.json'}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        section, framework = args.worker.split(":")
        result = WORKERS[section][framework](args.repeats)
        print(json.dumps(common.to_jsonable(result)))
        return result
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
                           "repeats": args.repeats, "processes": args.processes, "load_at_start": measure.load()}}
    start = time.perf_counter()
    for name in args.only:
        results[name] = measured_section(name, args)
    results["machine"]["total_s"] = time.perf_counter() - start
    results["machine"]["load_at_end"] = measure.load()
    results["comparisons"] = report.comparisons(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(common.to_jsonable(results), indent=1))
    print_summary(results, args)
    return results
