"""Flux2SR: super-resolution as FLUX.2 image editing, with the upsampled LR image as the reference (SPEC §1, §3).

The LR image is resized to the HR size (bicubic), VAE-encoded and packed: its tokens `c` enter the transformer after
the noisy tokens with position ids `(10, h, w, 0)`, on the same (h, w) grid as the target. A candidate is a full
Euler trajectory from pure noise; candidates of one pool differ only in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from foa_jax import sampling
from foa_jax.data.resize import bicubic_upsample
from foa_jax.models import flux2, vae


@dataclass(frozen=True)
class Models:
    """Everything Flux2SR needs besides data: backbone, VAE and the one cached prompt embedding."""

    transformer: dict
    transformer_config: flux2.Flux2Config
    vae: dict
    vae_config: vae.VAEConfig
    prompt: jax.Array  # (1, L, joint_attention_dim)

    @property
    def txt_ids(self) -> np.ndarray:
        return sampling.text_ids(self.prompt.shape[1])


def token_grid(models: Models, height: int, width: int) -> tuple[int, int]:
    f = models.vae_config.token_factor
    if height % f or width % f:
        raise ValueError(f"HR size must be a multiple of {f} pixels, got {height}x{width}")
    return height // f, width // f


def to_model_range(images_01) -> jax.Array:
    """[0, 1] images -> the VAE's [-1, 1]."""
    return jnp.asarray(images_01, jnp.float32) * 2.0 - 1.0


def to_unit_range(images) -> jax.Array:
    """The VAE's [-1, 1] output -> [0, 1], clipped."""
    return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def upsample_lr(lr_images: np.ndarray, hr_size: tuple[int, int]) -> np.ndarray:
    """(B, h, w, 3) LR in [0, 1] or uint8 -> (B, H, W, 3) float32 [0, 1], bicubic as torch does (host side)."""
    return np.stack([bicubic_upsample(image, hr_size) for image in lr_images])


def condition(models: Models, lr_upsampled: jax.Array) -> jax.Array:
    """Reference tokens `c` of an upsampled LR batch (B, H, W, 3) in [0, 1]."""
    return vae.encode_tokens(models.vae, models.vae_config, to_model_range(lr_upsampled))


def generate(models: Models, cond: jax.Array, key: jax.Array, num_steps: int, guidance: float | None = 1.0,
             lora: dict | None = None, lora_scale: float = 1.0, grid: tuple[int, int] | None = None) -> jax.Array:
    """Final packed latents (B, N, C) for reference tokens `cond` (B, N, C), from noise drawn with `key`.

    `grid` is the (h, w) token grid (square if omitted). Guidance is the distilled guidance embedding (SPEC §3: 1.0);
    models without a guidance embedder must pass None.
    """
    b, n, c = cond.shape
    grid = grid or (int(np.sqrt(n)),) * 2
    if grid[0] * grid[1] != n:
        raise ValueError(f"token grid {grid} does not hold {n} tokens")
    noise = sampling.noise(key, b, n, c)
    prompt = jnp.broadcast_to(models.prompt, (b, *models.prompt.shape[1:]))
    return sampling.sample(
        models.transformer, models.transformer_config, noise, prompt, sampling.image_ids(grid, [grid]),
        models.txt_ids, jnp.asarray(sampling.sigmas(num_steps, n)), references=cond,
        guidance=guidance if models.transformer_config.guidance_embeds else None, lora=lora, lora_scale=lora_scale)


def decode(models: Models, latents: jax.Array, height: int, width: int) -> jax.Array:
    """Packed latents -> images (B, H, W, 3) in [0, 1]."""
    return to_unit_range(vae.decode_tokens(models.vae, models.vae_config, latents, height, width))
