"""The `lora_step` and `dpo_step` sections: one Flux2SR LoRA train step and one Diffusion-DPO step on the 256-px SR
workload, each framework in fresh worker processes of its own, with memory and the first step's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench import measure, workers
from experiments.bench.workloads import LORA, SEED, SR_WORK, TINY_VAE, Workload, dpo_setup, sft_setup, step_noise
from foa_jax import dpo, sr, train
from foa_jax.models import layers
from ports import torch_steps


def bench_steps(section: str, repeats: int, processes: int) -> dict:
    """Both frameworks' step, each in `processes` fresh processes of `repeats` timed calls, on the 256-px SR
    workload."""
    row = {"load_before": measure.load(), "workload": SR_WORK.describe(),
           "pixels": SR_WORK.pixels if section == "lora_step" else None}
    print(f"[{section}] {SR_WORK.describe()}" + (f"; decoder + LPIPS-VGG at {row['pixels']} px" if row["pixels"]
                                                 else ""), flush=True)
    runs = workers.in_workers(section, repeats, processes)
    row.update({framework: workers.pooled(results) for framework, results in runs.items()})
    row["load_after"] = measure.load()
    return row


def timed_jax_step(loss_fn, optim: train.OptimConfig, trainable: dict, frozen: dict, batch: dict,
                   repeats: int) -> tuple[dict, dict]:
    """(timing with memory and compile info, the first step's metrics) of `train.make_step(loss_fn, optim)`
    compiled ahead of time on one gradient-accumulation micro-batch, state carried from call to call."""
    step = train.make_step(loss_fn, optim)
    holder = {"state": train.init_state(trainable, optim, jax.random.PRNGKey(SEED))}
    stacked = jax.device_put({k: v[None] for k, v in batch.items()})
    compiled, info = measure.compile_step(step, holder["state"], frozen, stacked)

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, stacked)
        holder.setdefault("first", jax.device_get(metrics))
        jax.block_until_ready(holder["state"])

    return {**measure.timed_step(run, repeats, compiled), **info}, holder["first"]


def timed_torch_step(run, repeats: int) -> dict:
    """`measure.timed_step` of a torch step callable, with the metrics its first call returned."""
    first = []

    def step():
        metrics = run()
        if not first:
            first.append(metrics)

    return {**measure.timed_step(step, repeats), **first[0]}


def lora_step_jax(work: Workload, repeats: int) -> dict:
    from ports.lpips_weights import load_lpips_params

    s = sft_setup(work)
    models = sr.Models(s.params, s.vae_params, jnp.asarray(s.prompt), work.config, TINY_VAE)
    frozen = {"models": models,
              "lpips": layers.with_frozen_conv_kernels(load_lpips_params(s.loss.lpips_net), TINY_VAE.kernels)}
    loss = sr.sft_loss("lora", s.loss, work.grid, 1.0, LORA.scale)
    timing, first = timed_jax_step(loss, s.optim, s.adapter, frozen, s.batch, repeats)
    return {**timing, "loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]),
            "terms": {k: float(first[k]) for k in ("fm", "pix", "lpips")}}


def lora_step_torch(work: Workload, repeats: int) -> dict:
    s = sft_setup(work)
    lpips_model, _ = torch_steps.lpips(s.loss.lpips_net)
    t, noise = step_noise(s.batch["z"].shape, work.batch)
    run = torch_steps.sft_lora_step(s.model, s.adapter, LORA, s.vae_model, lpips_model, s.batch, s.prompt, t, noise,
                                    work.grid, s.loss, s.optim)
    return timed_torch_step(run, repeats)


def dpo_step_jax(work: Workload, repeats: int) -> dict:
    s = dpo_setup(work)
    models = sr.Models(s.params, None, jnp.asarray(s.prompt), work.config, TINY_VAE)
    frozen = {"models": models, "reference": s.reference}
    loss = sr.dpo_loss(dpo.DPOConfig(), work.grid, 1.0, LORA.scale)
    timing, first = timed_jax_step(loss, s.optim, s.policy, frozen, s.batch, repeats)
    return {**timing, "loss": float(first["loss"]), "delta": float(first["delta"]),
            "grad_norm": float(first["grad_norm"])}


def dpo_step_torch(work: Workload, repeats: int) -> dict:
    s = dpo_setup(work)
    t, noise = step_noise(s.batch["z_w"].shape, work.batch)
    run = torch_steps.dpo_step(s.model, s.reference, s.policy, LORA, s.batch, s.prompt, t, noise, work.grid,
                               dpo.DPOConfig().beta, s.optim)
    return timed_torch_step(run, repeats)
