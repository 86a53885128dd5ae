"""Weight-only 8-bit storage of a frozen base: int8 or float8_e4m3fn linear kernels with per-output-channel scales.

A LoRA step reads every base weight and never updates one, so the base can be stored coarser than it computes:
FLUX.2-dev's 32.2B weights are 60 GiB in bf16 and 30 GiB in 8 bits, which leaves an 80 GB card room for activations.
Each output column j of a kernel W (in, out) is stored as codes q[:, j] = W[:, j] / s_j with s_j = max_i |W[i, j]| /
Q_max (Q_max 127 for int8, 448 for float8_e4m3fn), so a column's largest weight uses the whole code range whatever the
others hold. `layers.linear` widens the codes to the activation dtype inside the product and multiplies the
accumulated column by s_j; no dequantised matrix is formed. Norm scales and everything that is not a linear kernel
keep their dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from foa_jax import params as P

BASE_DTYPES = ("bfloat16", "int8", "float8_e4m3fn")
CODE_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def quantize_kernel(kernel: jax.Array, dtype: str) -> dict:
    """A (..., in, out) kernel -> {"kernel": codes (..., in, out) in `dtype`, "kernel_scale": float32 (..., out)}."""
    if dtype not in CODE_MAX:
        raise ValueError(f"quantize_kernel: dtype must be one of {sorted(CODE_MAX)}, got {dtype!r}")
    w = kernel.astype(jnp.float32)
    peak = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(peak > 0, peak / CODE_MAX[dtype], 1.0)
    codes = w / scale[..., None, :]
    if dtype == "int8":
        codes = jnp.clip(jnp.round(codes), -CODE_MAX[dtype], CODE_MAX[dtype])
    return {"kernel": codes.astype(dtype), "kernel_scale": scale}


def _is_linear(path: str, leaf) -> bool:
    return path.endswith(".kernel") and len(leaf.shape) >= 2


def quantize(params: dict, dtype: str) -> dict:
    """`params` with every linear kernel (a `kernel` leaf of two or more axes) stored in `dtype` ("int8" or
    "float8_e4m3fn") with its `kernel_scale`; "bfloat16" casts every leaf to bf16 instead (the unquantised base)."""
    if dtype not in BASE_DTYPES:
        raise ValueError(f"quantize: base dtype must be one of {BASE_DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        return jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = {}
    for path, leaf in P.flatten(params).items():
        if _is_linear(path, leaf):
            module = path[: -len(".kernel")]
            for name, value in quantize_kernel(leaf, dtype).items():
                out[f"{module}.{name}"] = value
        else:
            out[path] = leaf
    return P.unflatten(out)


def dequantize(params: dict, dtype=jnp.float32) -> dict:
    """The float kernels a quantised tree stands for, `codes · scale`, in `dtype` (other leaves cast to it too)."""
    out = {}
    flat = P.flatten(params)
    for path, leaf in flat.items():
        if path.endswith(".kernel_scale"):
            continue
        scale = flat.get(path + "_scale")
        value = leaf.astype(jnp.float32) * scale[..., None, :] if scale is not None else leaf
        out[path] = value.astype(dtype)
    return P.unflatten(out)


def nbytes(tree) -> int:
    """Bytes of a pytree of arrays or `ShapeDtypeStruct`s."""
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))
