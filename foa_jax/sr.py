"""Flux2SR: super-resolution as FLUX.2 image editing, with the upsampled LR image as the reference (docs/method.md).

The LR image is resized to the HR size (bicubic), VAE-encoded and packed: its tokens `c` enter the transformer after
the noisy tokens with position ids `(10, h, w, 0)`, on the same (h, w) grid as the target. A candidate is a full
Euler trajectory from pure noise; candidates of one pool differ only in the seed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from foa_jax import dpo, losses, sampling
from foa_jax.data.resize import bicubic_upsample
from foa_jax.models import flux2, vae


@struct.dataclass
class Models:
    """Everything Flux2SR needs besides data: backbone, VAE and the one cached prompt embedding.

    A pytree whose configs are static, so jitted functions take it whole.
    """

    transformer: dict
    vae: dict
    prompt: jax.Array  # (1, L, joint_attention_dim)
    transformer_config: flux2.Flux2Config = struct.field(pytree_node=False)
    vae_config: vae.VAEConfig = struct.field(pytree_node=False)

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


@jax.jit
def condition(models: Models, lr_upsampled: jax.Array) -> jax.Array:
    """Reference tokens `c` of an upsampled LR batch (B, H, W, 3) in [0, 1]."""
    return vae.encode_tokens(models.vae, models.vae_config, to_model_range(lr_upsampled))


@functools.partial(jax.jit, static_argnames=("num_steps", "grid", "guidance", "lora_scale"))
def generate(models: Models, cond: jax.Array, noise: jax.Array, num_steps: int, grid: tuple[int, int],
             guidance: float | None = 1.0, lora: dict | None = None, lora_scale: float = 1.0) -> jax.Array:
    """Final packed latents (B, N, C) for reference tokens `cond` (B, N, C), starting from `noise` (B, N, C).

    `grid` is the (h, w) token grid. Guidance is the distilled guidance embedding (1.0, the paper's); it is ignored for
    models without a guidance embedder (Klein). One compiled program per (shape, steps, grid).
    """
    b, n, _ = cond.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"token grid {grid} does not hold {n} tokens")
    prompt = jnp.broadcast_to(models.prompt, (b, *models.prompt.shape[1:]))
    return sampling.sample(
        models.transformer, models.transformer_config, noise, prompt, sampling.image_ids(grid, [grid]),
        models.txt_ids, jnp.asarray(sampling.sigmas(num_steps, n)), references=cond,
        guidance=guidance if models.transformer_config.guidance_embeds else None, lora=lora, lora_scale=lora_scale)


def candidate_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of candidate `seed`: candidates of a pool differ only in this."""
    return sampling.noise(jax.random.PRNGKey(seed), *shape)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def decode(models: Models, latents: jax.Array, height: int, width: int) -> jax.Array:
    """Packed latents -> images (B, H, W, 3) in [0, 1]."""
    return to_unit_range(vae.decode_tokens(models.vae, models.vae_config, latents, height, width))


def velocity(models: Models, z_t: jax.Array, cond: jax.Array, t: jax.Array, grid: tuple[int, int],
             guidance: float | None = 1.0, lora: dict | None = None, lora_scale: float = 1.0) -> jax.Array:
    """The velocity (B, N, C) of the noisy tokens z_t at sigmas t (B,), reference tokens `cond` (B, N, C) appended
    on the same (h, w) `grid` (T = 10), under the optional adapter; guidance is ignored by models without a guidance
    embedder (Klein)."""
    b, n = z_t.shape[:2]
    prompt = jnp.broadcast_to(models.prompt, (b, *models.prompt.shape[1:]))
    g = jnp.full((b,), guidance) if models.transformer_config.guidance_embeds and guidance is not None else None
    out = flux2.apply(models.transformer, models.transformer_config, jnp.concatenate([z_t, cond], axis=1), prompt, t,
                      sampling.image_ids(grid, [grid]), models.txt_ids, g, lora=lora, lora_scale=lora_scale)
    return out[:, :n]


def sft_loss(mode: str, config: losses.SFTLossConfig, grid: tuple[int, int], guidance: float | None = 1.0,
             lora_scale: float = 1.0):
    """Flux2SR's SFT objective as `train.make_step`'s `loss(trainable, frozen, batch, key, step)`.

    frozen = {"models": Models, "lpips": LPIPS weights}; batch = {"z": HR tokens, "cond": LR tokens, "hr": HR images
    in [0, 1]} on the token `grid`. Mode "lora": `trainable` is an adapter on `models.transformer`, the frozen base;
    mode "full": `trainable` is the whole transformer (and `models.transformer` is not read). The models are an
    argument, not a closure, so a step can be compiled for abstract, sharded or resident weights alike.
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"sr.sft_loss: mode must be 'lora' or 'full', got {mode!r}")

    def loss(trainable, frozen, batch, key, step):
        models = frozen["models"]
        adapter = trainable if mode == "lora" else None
        if mode == "full":
            models = models.replace(transformer=trainable)
        size = (grid[0] * models.vae_config.token_factor, grid[1] * models.vae_config.token_factor)

        def predict(z_t, cond, t):
            return velocity(models, z_t, cond, t, grid, guidance, adapter, lora_scale)

        def decode(tokens):
            return to_unit_range(vae.decode_tokens(models.vae, models.vae_config, tokens, *size))

        return losses.sft_loss(predict, decode, frozen["lpips"], batch, key, step, config)

    return loss


def dpo_loss(config: dpo.DPOConfig, grid: tuple[int, int], guidance: float | None = 1.0, lora_scale: float = 1.0):
    """Profile DPO as `train.make_step`'s `loss(policy, frozen, batch, key, step)`: frozen = {"models": Models (the
    base), "reference": the reference adapter (None = the base)}, batch = {"z_w", "z_l", "cond"} on the token grid."""

    def loss(policy, frozen, batch, key, step):
        def predict(adapter, z_t, cond, t):
            return velocity(frozen["models"], z_t, cond, t, grid, guidance, adapter, lora_scale)

        return dpo.dpo_loss(predict, policy, frozen["reference"], batch, key, config)

    return loss


def super_resolve(models: Models, lrs: np.ndarray, hr_size: tuple[int, int], seed: int, steps: int,
                  guidance: float | None = 1.0, adapter=None, lora_scale: float = 1.0) -> np.ndarray:
    """SR outputs (B, H, W, 3) in [0, 1] for uint8 LR inputs (B, h, w, 3).

    Every input starts from the same noise, candidate `seed` drawn at batch size 1, so an output depends neither on
    the batch it runs in nor on the other inputs; methods compared from one seed see the same noise.
    """
    grid = token_grid(models, *hr_size)
    cond = condition(models, upsample_lr(lrs, hr_size))
    noise = jnp.broadcast_to(candidate_noise(seed, (1, *cond.shape[1:])), cond.shape)
    latents = generate(models, cond, noise, steps, grid, guidance, adapter, lora_scale)
    return np.asarray(decode(models, latents, *hr_size))
