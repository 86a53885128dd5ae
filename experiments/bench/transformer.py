"""The `transformer` section: forward and forward+backward of the tiny preset and the small config in each
framework, and the compile time of the small config's forward+backward at two depths."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import torch

from experiments.bench import measure, workers
from experiments.bench.workloads import SMALL, SMALL_WORK, TINY, Workload, inputs, transformer_pair
from foa_jax import sampling
from foa_jax.models import flux2
from ports import torch_steps

WORKLOADS = (TINY, SMALL_WORK)


def bench_transformer(repeats: int, processes: int) -> dict:
    results = {work.name: bench_workload(work, repeats, processes) for work in WORKLOADS}
    results["compile"] = compile_times()
    return results


def transformer_calls(work: Workload, framework: str) -> tuple:
    """(forward, forward+backward) of one workload in one framework, each a callable that blocks until done and
    returns the framework's own output array (forward) or MSE loss (forward+backward, gradient w.r.t. every
    weight); weights and inputs resident (a compiled JAX function handed numpy arrays copies them every call)."""
    model, params = transformer_pair(work.config)
    data = inputs(work)
    if framework == "jax":
        return _jax_calls(work, params, data)
    args = [torch.from_numpy(data[k]) for k in ("x", "ctx", "t", "g")]
    target = torch.from_numpy(data["target"])

    def torch_fwd():
        with torch.no_grad():
            return torch_steps.forward(model, *args, work.grid)

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        value = torch.mean(torch.square(torch_steps.forward(model, *args, work.grid) - target))
        value.backward()
        return value

    return torch_fwd, torch_fwd_bwd


def _jax_calls(work: Workload, params: dict, data: dict) -> tuple:
    img_ids, txt_ids = work.img_ids, sampling.text_ids(work.text_len)

    def forward(p, x, ctx, t, g):
        return flux2.apply(p, work.config, x, ctx, t, img_ids, txt_ids, g)

    def loss(p, x, ctx, t, g, target):
        return jnp.mean(jnp.square(forward(p, x, ctx, t, g) - target))

    args = jax.device_put([data[k] for k in ("x", "ctx", "t", "g")])
    target = jax.device_put(data["target"])
    jax_forward, jax_grad = jax.jit(forward), jax.jit(jax.value_and_grad(loss))
    return (lambda: jax_forward(params, *args).block_until_ready(),
            lambda: jax.block_until_ready(jax_grad(params, *args, target))[0])


def transformer_worker(work: Workload, framework: str, repeats: int) -> dict:
    """One framework's forward and forward+backward timings of one workload (the first call of each includes JAX's
    compilation)."""
    forward, forward_backward = transformer_calls(work, framework)
    return {"fwd": measure.timed(forward, repeats), "fwd_bwd": measure.timed(forward_backward, repeats)}


def bench_workload(work: Workload, repeats: int, processes: int) -> dict:
    """Forward and forward+backward of one workload, each framework timed in `processes` fresh processes of its own
    (`workers.process_order`), and how far the two frameworks' results are apart."""
    print(f"[transformer] {work.describe()}", flush=True)
    row = {"workload": work.describe(), "load_before": measure.load()}
    for framework, results in workers.in_workers(f"transformer-{work.name}", repeats, processes).items():
        for name in ("fwd", "fwd_bwd"):
            row[f"{framework}_{name}"] = workers.pooled([result[name] for result in results])
    row["load_after"] = measure.load()
    (jax_fwd, jax_fwd_bwd), (torch_fwd, torch_fwd_bwd) = (transformer_calls(work, fw) for fw in ("jax", "torch"))
    row["max_abs_diff_out"] = measure.max_abs_diff(jax_fwd(), torch_fwd().numpy())
    row["loss_jax"], row["loss_torch"] = float(jax_fwd_bwd()), torch_fwd_bwd().item()
    return row


def compile_times() -> dict:
    """Seconds to trace, lower and compile the small config's jitted forward+backward at depth 2 and 16 (depth d = d
    double + d single blocks) with rolled block scans, on abstract parameters (nothing is allocated)."""
    out = {}
    data = inputs(SMALL_WORK)
    abstract = [jax.ShapeDtypeStruct(data[k].shape, data[k].dtype) for k in ("x", "ctx", "t", "g", "target")]
    img_ids, txt_ids = SMALL_WORK.img_ids, sampling.text_ids(SMALL_WORK.text_len)
    for depth in (2, 16):
        config = SMALL.replace(num_layers=depth, num_single_layers=depth, scan_unroll=1)

        def loss(p, x, ctx, t, g, target, config=config):
            return jnp.mean(jnp.square(flux2.apply(p, config, x, ctx, t, img_ids, txt_ids, g) - target))

        shapes = jax.eval_shape(functools.partial(flux2.init, config), jax.random.key(0))
        start = time.perf_counter()
        jax.jit(jax.value_and_grad(loss)).lower(shapes, *abstract).compile()
        out[f"depth_{depth}_s"] = time.perf_counter() - start
        print(f"[transformer] compile fwd+bwd, rolled scans, depth {depth} ({depth} double + {depth} single): "
              f"{out[f'depth_{depth}_s']:.1f} s", flush=True)
    return out
