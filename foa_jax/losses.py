"""Flux2SR's supervised objective (paper Eq. 1; docs/method.md "Flux2SR") as pure, jittable functions.

    z_t = (1 − t)·z + t·ε,   v = ε − z,   v̂ = F([z_t ; c], t)[:, :N]
    L_SFT = L_FM(v̂, v) + λ_pix·Charbonnier(x̂, x_HR) + λ_lpips(step)·LPIPS(x̂, x_HR),   x̂ = D(z_t − t·v̂)

The model enters only as two callables the trainer builds (`predict(z_t, cond, t) -> v̂` and `decode(tokens) ->
images in [0, 1]`), so the same loss serves LoRA training on the real model and full training of the tiny preset,
and can be reused with any velocity model.

Each loss has a batch mean (`flow_matching`, `charbonnier`, `lpips`) and a `per_sample_*` twin that returns one value
per sample, `(B,)`, for weighting or masking as with optax's losses. Images are NHWC in [0, 1]. The frozen networks
inside `lpips` take both images as arguments, also when the target is a constant closed over by a jitted function
(see `lpips`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from foa_jax.models import lpips as lpips_net

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SCHEMES = ("uniform", "logit_normal", "mode")


def flow_matching(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared velocity error, in float32."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def per_sample_flow_matching(pred: jax.Array, target: jax.Array) -> jax.Array:
    """(B,) mean squared velocity error per sample: the L(z) of DPO (docs/method.md "Profile DPO")."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def charbonnier(x: jax.Array, y: jax.Array, eps: float = 1e-3) -> jax.Array:
    """mean sqrt((x − y)² + ε²): an L1 that stays differentiable at 0 (ε = 1e-3, docs/method.md "Flux2SR")."""
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.square(d) + eps * eps))


def per_sample_charbonnier(x: jax.Array, y: jax.Array, eps: float = 1e-3) -> jax.Array:
    """(B,) Charbonnier per sample: its mean over the batch is `charbonnier` (to float rounding)."""
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    err = jnp.sqrt(jnp.square(d) + eps * eps)
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def per_sample_lpips(params, net: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """(B,) LPIPS per sample for NHWC images in [0, 1]; `params` from `ports.lpips_weights.load_lpips_params`.

    The target `y` may be an argument of the caller's jitted function or a constant it closes over: the trunk
    receives both images through an optimisation barrier (`models.lpips.layer_distances`), so XLA never evaluates
    the frozen network on a constant image at compile time (which took minutes for VGG at 128 px).
    """
    return lpips_net.lpips_distance_unit_range(params, net, x, y)


def lpips(params, net: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean LPIPS over the batch for NHWC images in [0, 1]; see `per_sample_lpips`."""
    return jnp.mean(per_sample_lpips(params, net, x, y))


def lpips_weight(step, full: float, start: int = 2000, end: int = 6000) -> jax.Array:
    """λ_lpips(step): 0 until `start`, a linear ramp, `full` from `end` on (docs/method.md "Flux2SR")."""
    ramp = jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(end - start, 1), 0.0, 1.0)
    return full * ramp


def sample_t(key: jax.Array, batch: int, scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> jax.Array:
    """Training sigmas in (0, 1].

    "uniform" draws one of the 1000 training timesteps, t = k/1000 for k in 1..1000, as diffusers' FLUX.2 LoRA
    examples do with weighting "none"; "logit_normal" and "mode" are SD3's densities, quantised the same way.
    """
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"timestep scheme must be one of {TIMESTEP_SCHEMES}, got {scheme!r}")
    if scheme == "uniform":
        u = jax.random.uniform(key, (batch,))
    elif scheme == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    else:
        u = jax.random.uniform(key, (batch,))
        u = 1.0 - u - mode_scale * (jnp.cos(jnp.pi * u / 2.0) ** 2 - 1.0 + u)
    index = jnp.clip(jnp.floor(u * NUM_TRAIN_TIMESTEPS), 0, NUM_TRAIN_TIMESTEPS - 1)
    return (NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS


def interpolate(z: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(z_t, v): the rectified-flow point at sigma t and its velocity target ε − z."""
    tt = t.reshape(-1, *([1] * (z.ndim - 1))).astype(z.dtype)
    return (1.0 - tt) * z + tt * noise, noise - z


def predicted_clean(z_t: jax.Array, velocity: jax.Array, t: jax.Array) -> jax.Array:
    """ẑ_0 = z_t − t·v̂, one Euler step to t = 0."""
    return z_t - t.reshape(-1, *([1] * (z_t.ndim - 1))).astype(z_t.dtype) * velocity


@dataclass(frozen=True)
class SFTLossConfig:
    """Weights of the SFT terms. λ values are ours (the paper prints none): see docs/method.md "Flux2SR"."""

    lambda_pix: float = 1.0
    lambda_lpips: float = 1.0
    lpips_start: int = 2000
    lpips_end: int = 6000
    lpips_net: str = "vgg"
    charbonnier_eps: float = 1e-3
    timesteps: str = "uniform"
    pixel_samples: int = 0  # decode only the first k samples of a batch for the pixel terms (0 = all)

    def __post_init__(self):
        if self.lambda_pix < 0 or self.lambda_lpips < 0:
            raise ValueError(f"SFTLossConfig: λ must be >= 0, got pix {self.lambda_pix}, lpips {self.lambda_lpips}")
        if self.lpips_end < self.lpips_start:
            raise ValueError(f"SFTLossConfig: lpips_end {self.lpips_end} < lpips_start {self.lpips_start}")
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"SFTLossConfig.lpips_net must be 'vgg' or 'alex', got {self.lpips_net!r}")
        if self.timesteps not in TIMESTEP_SCHEMES:
            raise ValueError(f"SFTLossConfig.timesteps must be one of {TIMESTEP_SCHEMES}, got {self.timesteps!r}")
        if self.pixel_samples < 0:
            raise ValueError(f"SFTLossConfig.pixel_samples must be >= 0, got {self.pixel_samples}")

    @property
    def uses_pixels(self) -> bool:
        return self.lambda_pix > 0 or self.lambda_lpips > 0


def sft_loss(
    predict: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    decode: Callable[[jax.Array], jax.Array],
    lpips_params,
    batch: dict,
    key: jax.Array,
    step,
    config: SFTLossConfig,
) -> tuple[jax.Array, dict]:
    """L_SFT for a batch {"z": HR tokens, "cond": LR tokens, "hr": HR images in [0, 1]} -> (loss, terms).

    Every term is returned (also the ones weighted 0 at this step) so a log shows the whole curve; the pixel terms
    are skipped entirely (no VAE decode) when both their weights are 0, which is the "FM only" ablation, and use the
    first `pixel_samples` samples only when that is set (decoding is the expensive part of a small-model step).
    """
    z = batch["z"]
    key_t, key_noise = jax.random.split(key)
    t = sample_t(key_t, z.shape[0], config.timesteps)
    noise = jax.random.normal(key_noise, z.shape, z.dtype)
    z_t, target = interpolate(z, noise, t)
    velocity = predict(z_t, batch["cond"], t)
    terms = {"fm": flow_matching(velocity, target), "t_mean": jnp.mean(t)}
    loss = terms["fm"]
    lam_lpips = lpips_weight(step, config.lambda_lpips, config.lpips_start, config.lpips_end)
    terms["lambda_lpips"] = lam_lpips
    if config.uses_pixels:
        k = config.pixel_samples or z.shape[0]
        images = decode(predicted_clean(z_t[:k], velocity[:k], t[:k]))
        hr = batch["hr"][:k]
        terms["pix"] = charbonnier(images, hr, config.charbonnier_eps)
        loss = loss + config.lambda_pix * terms["pix"]
        if config.lambda_lpips > 0:
            terms["lpips"] = lpips(lpips_params, config.lpips_net, images, hr)
            loss = loss + lam_lpips * terms["lpips"]
    terms["loss"] = loss
    return loss, terms
