"""Which implementation a model runs, chosen once per config: the attention kernel and the set of tuned operations.

Attention (`ATTENTION`), side by side here, each tested against a direct softmax:
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, the whole score matrix at once; any backend.
- "cudnn": the same function's cuDNN flash attention; GPU only, bf16/f16, heads up to 128 wide.
- "chunked": queries in chunks sized for a CPU cache, with a flash-style backward; any backend, tuned for XLA:CPU.

Operations (`OPS`): "reference" runs plain jnp/lax ops; "cpu" runs the XLA:CPU formulations in `layers` (split
products in `linear_pieces`, contractions for per-row sums in `channel_dot`, Eigen-routed stride-1 convolutions,
precomputed input-gradient and Winograd kernels for frozen convolutions), each equal to the reference up to rounding.

A config names both; left unset (None) they are picked from the platform when the config is made (`default_attention`,
`default_ops`) and `describe` says what was picked. Nothing reads the backend while a function is traced, so a
config's choice holds wherever its functions are compiled (e.g. a CPU compile that plans a GPU run).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from foa_jax.models import layers

ATTENTION = ("xla", "cudnn", "chunked")
OPS = layers.KERNELS
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # cuDNN's flash attention on every GPU generation (Hopper takes 256)


def platform() -> str:
    """The default backend's platform ("cpu", "gpu", "tpu"): the one place the kernel choice reads it."""
    return jax.default_backend()


def default_attention(platform_name: str, dtype: str | None, head_dim: int) -> str:
    """CPU: "chunked"; GPU: "cudnn" where cuDNN's flash attention takes the dtype and head width, else "xla";
    anything else (TPU): "xla". `dtype` None means the inputs' dtype is not fixed by the config: "xla" on a GPU."""
    if platform_name == "cpu":
        return "chunked"
    if platform_name == "gpu" and dtype in CUDNN_DTYPES and head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0:
        return "cudnn"
    return "xla"


def default_ops(platform_name: str) -> str:
    return "cpu" if platform_name == "cpu" else "reference"


def settle(config, dtype: str | None, head_dim: int, resolve: bool = True) -> None:
    """Validate a frozen config's `attention` and `kernels` fields and fill the unset ones from the platform.

    Records in `config._picked` which fields were picked, so that `replace` picks them again (a dtype change can
    change the attention). With `resolve` False the unset fields stay None: presets are made while their module is
    imported, before any backend may start (`jax.distributed.initialize` must come first), and `Presets` fills them
    when read.
    """
    name = type(config).__name__
    if config.attention is not None and config.attention not in ATTENTION:
        raise ValueError(f"{name}.attention must be one of {ATTENTION} or None (the platform's), "
                         f"got {config.attention!r}")
    if config.kernels is not None and config.kernels not in OPS:
        raise ValueError(f"{name}.kernels must be one of {OPS} or None (the platform's), got {config.kernels!r}")
    if config.attention == "cudnn" and dtype is not None and dtype not in CUDNN_DTYPES:
        raise ValueError(f"{name}.attention 'cudnn' needs dtype in {CUDNN_DTYPES}, got {dtype!r}")
    picked = frozenset(f for f in ("attention", "kernels") if getattr(config, f) is None)
    object.__setattr__(config, "_picked", picked)
    if resolve and picked:
        where = platform()
        if config.attention is None:
            object.__setattr__(config, "attention", default_attention(where, dtype, head_dim))
        if config.kernels is None:
            object.__setattr__(config, "kernels", default_ops(where))


def repick(config, changes: dict) -> dict:
    """`changes` for `dataclasses.replace` with the platform-picked kernel fields unset again, unless changed."""
    return {**{f: None for f in config._picked}, **changes}


def describe(config) -> str:
    """One line for a stage to print: the attention kernel and the operation set, and whether they were picked."""
    def part(field):
        value = getattr(config, field)
        return f"{value} (platform default)" if field in config._picked else value

    return f"{type(config).__name__}: attention {part('attention')}, kernels {part('kernels')}"


class Presets(Mapping):
    """Named configs declared at import with unset kernels; each read re-makes the config, so its kernels are the
    platform's at that moment (see `settle`)."""

    def __init__(self, templates: dict):
        self._templates = dict(templates)

    def __getitem__(self, name):
        template = self._templates[name]
        return template.replace()

    def __iter__(self):
        return iter(self._templates)

    def __len__(self):
        return len(self._templates)


# --------------------------------------------------------------------------------------------------------- attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
    """Unmasked softmax attention over (B, S, H, Dh), scale 1/sqrt(Dh); returns (B, S, H·Dh) in v's dtype."""
    b, s, h, d = q.shape
    if impl == "chunked":
        return chunked_attention(q, k, v)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention: impl must be one of {ATTENTION}, got {impl!r}")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl).reshape(b, s, h * d)


# Scores of one query chunk, (B, H_group, chunk, S_kv) in the softmax dtype, are kept under this many bytes: with
# the probabilities and their low-precision copy that is a few such buffers, which stay inside a 32 MiB L3 cache.
SCORE_BUDGET_BYTES = 18 * 2**20
# When the whole score matrix (B, H, S_q, S_kv) fits this many bytes, attention runs as one chunk and keeps its
# unnormalised probabilities for the backward pass: recomputing them costs a second Q·Kᵀ with an S x S output.
SAVED_SCORES_BUDGET_BYTES = 128 * 2**20
_ROWS = 8  # query chunks are a multiple of 8 rows (the CPU's SIMD width in float32)


def attention_plan(batch: int, heads: int, q_len: int, kv_len: int, itemsize: int, budget: int,
                   saved_budget: int = 0) -> tuple[int, int, bool]:
    """(heads per group, query chunk, probabilities saved) for scores of `itemsize` bytes.

    If all scores `batch·heads·q_len·kv_len·itemsize` fit `saved_budget`, one unpadded chunk whose probabilities are
    kept for the backward pass. Otherwise one chunk's scores `batch·group·chunk·kv_len·itemsize` fit `budget` and the
    backward recomputes them: chunks are multiples of 8 rows and as equal as the chunk count allows (a 2112-token
    sequence is 4 chunks of 528, not 3 of 552 plus padding). When even 8 rows of every head exceed the budget
    (FLUX.2-dev at long sequences or large batches), heads are processed in groups, the largest divisor of the head
    count that fits; a single head of 8 rows is the floor, so the budget bounds memory only down to
    `batch·8·kv_len·itemsize`.
    """
    if batch * heads * q_len * kv_len * itemsize <= saved_budget:
        return heads, q_len, True
    rows = budget // max(batch * kv_len * itemsize, 1)
    if rows < heads * _ROWS:
        group = max([g for g in range(1, heads + 1) if heads % g == 0 and g * _ROWS <= rows], default=1)
        return group, _ROWS, False
    padded_len = -(-q_len // _ROWS) * _ROWS
    chunk = min(rows // heads // _ROWS * _ROWS, padded_len)
    count = -(-q_len // chunk)
    return heads, -(-q_len // (count * _ROWS)) * _ROWS, False


def _chunk_scores(q, k, softmax_dtype):
    """Scores q·kᵀ (B·H, c, S) in the softmax dtype; q arrives scaled by 1/sqrt(Dh) (see `chunked_attention`)."""
    return jnp.einsum("zqd,zkd->zqk", q, k, preferred_element_type=softmax_dtype)


def _chunk_forward(q, k, v, save):
    """Softmax attention of one query chunk (B·H, c, Dh): output in v's dtype and what the backward needs, the
    unnormalised probabilities and their row sums, (B·H, c, S) and (B·H, c, 1), if `save`, else the row logsumexp
    (B·H, c)."""
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = _chunk_scores(q, k, softmax_dtype)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("zqk,zkd->zqd", weights.astype(v.dtype), v, preferred_element_type=softmax_dtype) / total
    return out.astype(v.dtype), ((weights, total) if save else (peak + jnp.log(total))[..., 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q_chunks, k, v, save):
    """Attention, softmax(q·kᵀ)·v, with queries pre-split into chunks (n, B·H, c, Dh) against k, v (B·H, S, Dh).

    `lax.map` runs one chunk at a time, so only one chunk's score matrix exists; unless `save`, the backward pass
    (below) recomputes each chunk's probabilities from the saved row logsumexp instead of storing the (B, H, S, S)
    matrix.
    """
    return _chunked_fwd(q_chunks, k, v, save)[0]


def _chunked_fwd(q_chunks, k, v, save):
    out, stats = jax.lax.map(lambda q: _chunk_forward(q, k, v, save), q_chunks)
    return out, (q_chunks, k, v, out, stats)


def _materialised_t(x: jax.Array) -> jax.Array:
    """x (Z, a, b) as (Z, b, a) in memory: the barrier keeps XLA from folding the transpose back into the product."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, 1, 2))


def fusion_boundary(x: jax.Array) -> jax.Array:
    """x unchanged: rounding to its own format is the identity, but XLA keeps the op and YNNPACK does not fuse
    across it (an optimisation barrier is removed before fusion on the CPU)."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


# Heads at least this wide get their dK and dV accumulated transposed (see `_key_side_grad`).
TRANSPOSED_KEY_GRADS_MIN_HEAD_DIM = 64


def _key_side_grad(x: jax.Array, mat: jax.Array, dtype) -> jax.Array:
    """matᵀ·x for a chunk's (B·H, c, S) matrix (P or dS) and its (B·H, c, Dh) rows (dO or Q), in the layout the
    backward accumulates dK and dV in: (B·H, Dh, S) = xᵀ·mat if Dh >= `TRANSPOSED_KEY_GRADS_MIN_HEAD_DIM`, else
    (B·H, S, Dh).

    Transposed, with x transposed in memory, the product is a row-major batched GEMM for YNNPACK, which suits wide
    heads; narrow ones gain more from contracting the leading axis of both operands, which XLA:CPU sends to its Eigen
    path to run beside the YNNPACK products.
    """
    if x.shape[-1] >= TRANSPOSED_KEY_GRADS_MIN_HEAD_DIM:
        return jnp.einsum("zdq,zqk->zdk", _materialised_t(x), mat, preferred_element_type=dtype)
    return jnp.einsum("zqk,zqd->zkd", mat, x, preferred_element_type=dtype)


def _chunked_bwd(save, residuals, d_out):
    """Flash-attention backward: per chunk P = exp(s − lse), dV += Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)),
    dQ = dS·K, dK += dSᵀ·Q; dK and dV accumulate in the softmax dtype across a `lax.scan` over chunks.

    With saved probabilities P = W / T (unnormalised W, row sums T), the same formulas hold with W for P and dO / T
    for dO, so the S x S matrix is never divided.
    """
    q_chunks, k, v, out, stats = residuals
    softmax_dtype = jnp.promote_types(q_chunks.dtype, jnp.float32)

    # rowsum(dO∘O) for every chunk at once, before the loop and behind a fusion boundary: XLA:CPU otherwise fuses the
    # sum into the dO·Vᵀ product's YNNPACK fusion, which then runs at half speed.
    row_dots = fusion_boundary(layers.channel_dot(d_out.astype(softmax_dtype), out.astype(softmax_dtype), "cpu"))

    def step(carry, chunk):
        dk, dv = carry
        q, do, row_dot, chunk_stats = chunk
        if save:
            probs, total = chunk_stats
            do = (do.astype(softmax_dtype) / total).astype(do.dtype)
            row_dot = row_dot / total
        else:
            probs = jnp.exp(_chunk_scores(q, k, softmax_dtype) - chunk_stats[..., None])
        dv = dv + _key_side_grad(do, probs.astype(do.dtype), softmax_dtype)
        d_probs = jnp.einsum("zqd,zkd->zqk", do, v, preferred_element_type=softmax_dtype)
        d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)
        dq = jnp.einsum("zqk,zkd->zqd", d_scores, k, preferred_element_type=softmax_dtype)
        dk = dk + _key_side_grad(q, d_scores, softmax_dtype)
        return (dk, dv), dq.astype(q.dtype)

    z, length, head_dim = k.shape
    transposed = head_dim >= TRANSPOSED_KEY_GRADS_MIN_HEAD_DIM
    shape = (z, head_dim, length) if transposed else (z, length, head_dim)
    zeros = (jnp.zeros(shape, softmax_dtype), jnp.zeros(shape, softmax_dtype))
    (dk, dv), dq = jax.lax.scan(step, zeros, (q_chunks, d_out, row_dots, stats))
    if transposed:
        dk, dv = jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked_heads(q, k, v, chunk, save):
    """(B, S, H, Dh) q/k/v -> (B, S, H, Dh) output: pad queries to whole chunks, attend, drop the padding.

    Padded query rows are zeros; their outputs are discarded and their cotangents are zero, so they add nothing to dk
    or dv. Batch and heads are folded into one leading axis: XLA:CPU runs products with a single batch axis through
    its fast GEMM library and those with two through a generic loop.
    """
    b, s, h, d = q.shape
    count = -(-s // chunk)
    q = jnp.pad(q, ((0, 0), (0, count * chunk - s), (0, 0), (0, 0)))
    q_chunks = q.reshape(b, count, chunk, h, d).transpose(1, 0, 3, 2, 4).reshape(count, b * h, chunk, d)

    def heads_first(x):
        return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)

    out = _chunked(q_chunks, heads_first(k), heads_first(v), save)
    return out.reshape(count, b, h, chunk, d).transpose(1, 0, 3, 2, 4).reshape(b, count * chunk, h, d)[:, :s]


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, score_budget: int | None = None,
                      saved_budget: int | None = None) -> jax.Array:
    """The "chunked" kernel: `attention` with queries in chunks whose scores fit `score_budget` bytes (default
    `SCORE_BUDGET_BYTES`, read at trace time; see `attention_plan`) and a flash-style custom backward, so neither pass
    materialises the full matrix, unless the whole matrix fits `saved_budget` (default `SAVED_SCORES_BUDGET_BYTES`;
    0 never saves): then the probabilities are kept for the backward instead of recomputed.

    The softmax runs in at least float32 (float64 stays float64, which `jax.nn.dot_product_attention` would not do);
    bf16 matmuls accumulate in float32. The 1/sqrt(Dh) scale goes on q, not on the scores: XLA:CPU would materialise
    that scalar's broadcast at the S x S size to feed the fused products.
    """
    b, s, h, d = q.shape
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    q = (q.astype(softmax_dtype) / math.sqrt(d)).astype(q.dtype)
    budget = SCORE_BUDGET_BYTES if score_budget is None else score_budget
    saved = SAVED_SCORES_BUDGET_BYTES if saved_budget is None else saved_budget
    group, chunk, save = attention_plan(b, h, s, k.shape[1], jnp.dtype(softmax_dtype).itemsize, budget, saved)
    if group == h:
        out = _chunked_heads(q, k, v, chunk, save)
    else:
        def split(x):
            return jnp.moveaxis(x.reshape(*x.shape[:2], h // group, group, d), 2, 0)

        out = jax.lax.map(lambda qkv: _chunked_heads(*qkv, chunk, save), (split(q), split(k), split(v)))
        out = jnp.moveaxis(out, 0, 2)
    return out.reshape(b, s, h * d)
