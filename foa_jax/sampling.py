"""FLUX.2 position ids, the empirical-mu shifted schedule and a seeded Euler sampler with reference tokens.

Everything here mirrors `Flux2Pipeline` so that a JAX run and a diffusers run on the same noise give
the same latents; position ids and sigmas are host-side numpy (they depend only on shapes and step counts), the
denoising loop is one jitted `lax.scan`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from foa_jax.models import flux2

REFERENCE_T_SCALE = 10  # reference image i sits at T = 10 + 10·i


def text_ids(length: int) -> np.ndarray:
    """(L, 4) ids `(0, 0, 0, l)`: text tokens are told apart only by the L axis."""
    ids = np.zeros((length, 4), np.int32)
    ids[:, 3] = np.arange(length)
    return ids


def grid_ids(height: int, width: int, t: int = 0) -> np.ndarray:
    """(h·w, 4) ids `(t, i, j, 0)` in h-major order, matching the token packing (token = i·w + j)."""
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 4), np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, i.ravel(), j.ravel()
    return ids


def reference_ids(grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Ids of reference images packed one after another, the i-th at T = 10 + 10·i (each with its own h×w grid)."""
    if not grids:
        return np.zeros((0, 4), np.int32)
    return np.concatenate(
        [grid_ids(h, w, REFERENCE_T_SCALE * (i + 1)) for i, (h, w) in enumerate(grids)], axis=0)


def image_ids(target: tuple[int, int], references: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Ids of the noisy target tokens followed by the reference tokens, the order `apply` expects."""
    return np.concatenate([grid_ids(*target), reference_ids(references)], axis=0)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift: linear in the token count, interpolated in the step count between 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m200)
    m10 = a1 * image_seq_len + b1
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + (m200 - 200.0 * slope))


def sigmas(num_steps: int, image_seq_len: int, mu: float | None = None) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas: `linspace(1, 1/N, N)` shifted by `e^mu / (e^mu + 1/σ − 1)`, then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = empirical_mu(image_seq_len, num_steps) if mu is None else mu
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / base - 1.0))
    return np.append(shifted.astype(np.float32), np.float32(0.0))


def noise(key: jax.Array, batch: int, num_tokens: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """Gaussian noise drawn directly in packed token space (B, N, C), as the pipeline does."""
    return jax.random.normal(key, (batch, num_tokens, channels), dtype)


def euler(velocity_fn, latents: jax.Array, sigma_schedule: jax.Array) -> jax.Array:
    """Integrate `x ← x + (σ_next − σ)·v(x, σ)` over the schedule with one `lax.scan`.

    `velocity_fn(x, sigma)` returns the velocity for the noisy tokens only. The update is done in float32 whatever the
    model dtype, as diffusers' scheduler does, and cast back to the latents' dtype.
    """
    pairs = jnp.stack([sigma_schedule[:-1], sigma_schedule[1:]], axis=-1)

    def step(x, pair):
        sigma, sigma_next = pair[0], pair[1]
        v = velocity_fn(x, sigma)
        x_next = x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)
        return x_next.astype(x.dtype), None

    out, _ = jax.lax.scan(step, latents, pairs)
    return out


def sample(
    params: dict,
    config: flux2.Flux2Config,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    img_ids: jax.Array,
    txt_ids: jax.Array,
    sigma_schedule: jax.Array,
    references: jax.Array | None = None,
    guidance: float | None = None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
) -> jax.Array:
    """Denoise packed `latents` (B, N, C) from sigma_schedule[0] to its end, conditioning on reference tokens.

    references: (B, N_ref, C) tokens appended after the noisy ones at every step (their ids are the tail of
    `img_ids`); prompt_embeds: (B, L, joint_attention_dim). Returns the final packed latents (B, N, C).
    """
    b, n = latents.shape[:2]
    if references is not None and (references.shape[0] != b or references.shape[2] != latents.shape[2]):
        raise ValueError(f"references: expected (B={b}, N_ref, C={latents.shape[2]}), got {tuple(references.shape)}")
    g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)

    def velocity(x, sigma):
        tokens = x if references is None else jnp.concatenate([x, references.astype(x.dtype)], axis=1)
        out = flux2.apply(params, config, tokens, prompt_embeds, jnp.full((b,), sigma), img_ids, txt_ids, g,
                          lora=lora, lora_scale=lora_scale)
        return out[:, :n]

    return euler(velocity, latents, jnp.asarray(sigma_schedule, jnp.float32))
