"""The `sampler` section: candidates per second of the 16-step Euler sampler with one reference image
(`foa_jax.sr`) against `Flux2Pipeline.__call__` (prompt embedding and noise given, the reference photo encoded by
the pipeline itself), both in this process, JAX first."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from experiments.bench import measure
from experiments.bench.workloads import SEED, SR_WORK, TINY_VAE, hr_photo, transformer_pair, vae_pair
from foa_jax import sr

STEPS = 16


def bench_sampler(repeats: int, candidates: int = 2) -> dict:
    """`candidates` trajectories of `STEPS` Euler steps from one reference photo (encoded by each framework's VAE)."""
    from diffusers import Flux2Pipeline
    from PIL import Image

    work = SR_WORK
    model, params = transformer_pair(work.config)
    vae_model, vae_params = vae_pair()
    photo = hr_photo(work.pixels)
    rng = np.random.default_rng(SEED + 6)
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    noise = torch.from_numpy(rng.standard_normal((candidates, work.config.in_channels, *work.grid), np.float32))
    print(f"[sampler] {candidates} candidates x {STEPS} steps, {work.pixels} px reference; {work.describe()}",
          flush=True)
    row = {"load_before": measure.load(), "candidates": candidates, "steps": STEPS, "workload": work.describe()}
    models = sr.Models(params, vae_params, jnp.asarray(prompt), work.config, TINY_VAE)
    packed_noise = Flux2Pipeline._pack_latents(noise).numpy()
    row["jax"] = measure.timed(lambda: jax_candidates(models, photo, packed_noise).block_until_ready(), repeats)
    reference = Image.fromarray(np.round(photo * 255).astype(np.uint8))
    torch_call = torch_candidates(model, vae_model, reference, prompt, noise)
    # Eager torch has nothing to compile: a 1-step call warms it up (JAX's warm-up call compiles the 16 steps).
    row["torch"] = measure.timed(torch_call, repeats, warmup=lambda: torch_call(1))
    row["load_after"] = measure.load()
    # The photo goes through PIL uint8 for the pipeline: feed JAX the same quantised pixels for the comparison.
    ours = jax_candidates(models, np.asarray(reference, np.float32) / 255.0, packed_noise)
    row["max_abs_diff_latents"] = measure.max_abs_diff(ours, torch_call().numpy())
    for framework in ("jax", "torch"):
        row[framework]["candidates_per_s"] = candidates / (row[framework]["median_ms"] / 1e3)
    return row


def jax_candidates(models: sr.Models, photo: np.ndarray, packed_noise: np.ndarray):
    """One candidate per row of `packed_noise`, all conditioned on `photo` (encoded once)."""
    cond = sr.condition(models, photo[None])
    cond = jnp.broadcast_to(cond, (len(packed_noise), *cond.shape[1:]))
    return sr.generate(models, cond, packed_noise, STEPS, SR_WORK.grid, 1.0)


def torch_candidates(model, vae_model, reference, prompt: np.ndarray, noise: torch.Tensor):
    """`Flux2Pipeline.__call__` on `reference` for one candidate per noise row, as a callable of the step count."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae_model,
                         text_encoder=None, tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    size = SR_WORK.pixels

    def call(steps: int = STEPS):
        with torch.no_grad():
            return pipe(image=[reference], prompt_embeds=torch.from_numpy(prompt), latents=noise, height=size,
                        width=size, num_inference_steps=steps, guidance_scale=1.0, num_images_per_prompt=len(noise),
                        output_type="latent").images

    return call
