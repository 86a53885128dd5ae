"""Parameter-free building blocks shared by the FLUX.2 transformer and VAE.

Every function here is pure: it takes a parameter dict (named as in diffusers' state dict, see `foa_jax.params`)
and arrays, and returns arrays. Layouts follow Flax rather than torch: a linear kernel is `(in, out)`, a convolution
kernel is `HWIO` and images are `NHWC`; `ports.convert` does the transposes once, at conversion time.

Mixed precision: parameters are cast to the activation dtype at the point of use (so bf16 storage with f32 compute, or
the reverse, both work), while normalisation statistics are computed in at least float32, as torch does for bf16
LayerNorm/GroupNorm on the CPU and GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict


def _stat_dtype(x: jax.Array):
    """Normalisation statistics run in at least float32 (bf16 inputs are upcast; float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def linear(p: Params, x: jax.Array, lora: Params | None = None, lora_scale: float = 1.0) -> jax.Array:
    """`x @ kernel (+ bias)`, plus `lora_scale · (x @ A) @ B` when a LoRA branch is given.

    The kernel is stored `(in, out)`. The LoRA branch (`{"lora_A": {"kernel": (in, r)}, "lora_B": {"kernel": (r,
    out)}}`, PEFT's names) goes through the rank-r bottleneck, so the merged weight is never formed: the frozen base
    stays in its storage dtype and gradients touch only A and B.

    Leading axes are flattened into one so that every product, and the weight gradient `xᵀ·dy` in particular, is a
    plain 2-D GEMM: contracting (batch, tokens) as two axes made XLA:CPU transpose the (tokens, out) cotangent and
    fall back to a slower dot (the small benchmark's forward+backward: 3.23 -> 2.85 s).
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    y = jnp.matmul(x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        down = jnp.matmul(x, lora["lora_A"]["kernel"].astype(x.dtype))
        y = y + lora_scale * jnp.matmul(down, lora["lora_B"]["kernel"].astype(x.dtype))
    return y.reshape(*lead, y.shape[-1])


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters (every LayerNorm in the FLUX.2 DiT is `elementwise_affine=False`)."""
    xf = x.astype(_stat_dtype(x))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis with a learned `scale` (torch `RMSNorm.weight`)."""
    xf = x.astype(_stat_dtype(x))
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (normed * p["scale"].astype(xf.dtype)).astype(x.dtype)


def group_norm(p: Params, x: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm over an NHWC (or N...C) array with learned `scale` and `bias`, statistics in float32."""
    *lead, c = x.shape
    if c % groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {groups} groups")
    xf = x.astype(_stat_dtype(x)).reshape(lead[0], -1, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    normed = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return (normed * p["scale"].astype(xf.dtype) + p["bias"].astype(xf.dtype)).astype(x.dtype)


def conv2d(p: Params, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
    """2-D convolution in NHWC with an HWIO kernel and optional bias.

    `padding` is either a lax padding string or explicit `((top, bottom), (left, right))`, which the VAE needs for
    its asymmetric (0, 1, 0, 1) downsampling pad.
    """
    kernel = p["kernel"].astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y
