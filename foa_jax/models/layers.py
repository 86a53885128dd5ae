"""Parameter-free building blocks shared by the FLUX.2 transformer and VAE.

Every function here is pure: it takes a parameter dict (named as in diffusers' state dict, see `foa_jax.params`)
and arrays, and returns arrays. Layouts follow Flax rather than torch: a linear kernel is `(in, out)`, a convolution
kernel is `HWIO` and images are `NHWC`; `ports.convert` does the transposes once, at conversion time.

Mixed precision: parameters are cast to the activation dtype at the point of use (so bf16 storage with f32 compute, or
the reverse, both work), while normalisation statistics are computed in at least float32, as torch does for bf16
LayerNorm/GroupNorm on the CPU and GPU. A linear kernel may also be stored as int8 or float8 with per-output-channel
scales (`foa_jax.quant`); `linear` dequantises inside the product.

Functions with XLA:CPU formulations take `kernels`: "reference" (the default: plain jnp/lax ops) or "cpu" (the
formulations, each equal to the reference up to rounding). Models pass their config's choice (`kernels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Params = dict
KERNELS = ("reference", "cpu")


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def _stat_dtype(x: jax.Array):
    """Normalisation statistics run in at least float32 (bf16 inputs are upcast; float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def channel_dot(x: jax.Array, y: jax.Array, kernels: str = "reference") -> jax.Array:
    """Σ over the last axis of x·y, keeping it as a unit axis: (..., C) x (..., C) -> (..., 1).

    "cpu" writes it as a contraction: XLA:CPU fuses `sum(x * y, -1)` into a YNNPACK multiply-reduce that is slow
    whenever the leading axis has extent 1 (batch 1, as in a LoRA step on one crop). Every backward pass here that
    needs a per-row `Σ dy·x` uses this.
    """
    _check_kernels(kernels)
    if kernels == "cpu":
        return jnp.einsum("...c,...c->...", x, y)[..., None]
    return jnp.sum(x * y, axis=-1, keepdims=True)


def _matmul(x: jax.Array, p: Params, rows: slice, columns: slice, accumulate) -> jax.Array:
    """x · kernel[rows, columns] accumulated in `accumulate`, unrounded; a quantised kernel (int8 or float8 with a
    per-output-channel `kernel_scale`, see `foa_jax.quant`) is widened to x's dtype inside the product and its scale
    applied to the accumulated columns, so the dequantised matrix is never formed."""
    kernel = p["kernel"][rows, columns]
    y = jnp.matmul(x, kernel.astype(x.dtype), preferred_element_type=accumulate)
    if "kernel_scale" in p:
        y = y * p["kernel_scale"][columns].astype(accumulate)
    return y


def linear(p: Params, x: jax.Array, lora: Params | None = None, lora_scale: float = 1.0) -> jax.Array:
    """`x @ kernel (+ bias)`, plus `lora_scale · (x @ A) @ B` when a LoRA branch is given.

    The kernel is stored `(in, out)`. The LoRA branch (`{"lora_A": {"kernel": (in, r)}, "lora_B": {"kernel": (r,
    out)}}`, PEFT's names) goes through the rank-r bottleneck, so the merged weight is never formed: the frozen base
    stays in its storage dtype and gradients touch only A and B. Products accumulate in at least float32 and round
    once.

    Leading axes are flattened into one so that every product, and the weight gradient `xᵀ·dy` in particular, is a
    plain 2-D GEMM (contracting (batch, tokens) as two axes made XLA:CPU transpose the cotangent first).
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    every = slice(None)
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    y = _matmul(x, p, every, every, accumulate).astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    if lora is not None:
        down = jnp.matmul(x, lora["lora_A"]["kernel"].astype(x.dtype), preferred_element_type=accumulate)
        y = y + lora_scale * jnp.matmul(down.astype(x.dtype), lora["lora_B"]["kernel"].astype(y.dtype))
    return y.reshape(*lead, y.shape[-1])


def linear_pieces(p: Params, xs: list[jax.Array], out_sizes: list[int], lora: Params | None = None,
                  lora_scale: float = 1.0, kernels: str = "reference") -> list[jax.Array]:
    """`linear` of the inputs `xs` concatenated along the feature axis, its output split into pieces of
    `out_sizes` features.

    "reference" concatenates, multiplies once and splits. "cpu" forms neither the concatenation nor the whole output:
    output piece j is Σ_i x_i · kernel[rows of x_i, columns of j] (LoRA alike: Σ_i x_i · A[rows of x_i], then
    · B[:, columns of j]), because XLA:CPU copies every concatenation and split of activations, and autodiff adds the
    reverse copy to the backward pass; per piece, the products read slices of the kernel instead. FLUX.2's single
    blocks split their fused QKV+MLP-in output five ways and concatenate attention and MLP outputs for `to_out`; the
    double blocks' SwiGLU splits `linear_in` in two.
    """
    _check_kernels(kernels)
    rows = np.cumsum([0] + [x.shape[-1] for x in xs])
    columns = np.cumsum([0, *out_sizes])
    if rows[-1] != p["kernel"].shape[0] or columns[-1] != p["kernel"].shape[1]:
        raise ValueError(f"linear_pieces: inputs of {[x.shape[-1] for x in xs]} features and outputs of "
                         f"{list(out_sizes)} do not tile the kernel {tuple(p['kernel'].shape)}")
    if kernels == "reference":
        y = linear(p, xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1), lora, lora_scale)
        return jnp.split(y, columns[1:-1], axis=-1) if len(out_sizes) > 1 else [y]

    lead = xs[0].shape[:-1]
    xs = [x.reshape(-1, x.shape[-1]) for x in xs]
    dtype = xs[0].dtype
    accumulate = jnp.promote_types(dtype, jnp.float32)

    def rows_times(q, start, stop):
        """Σ_i x_i · q's kernel[rows of x_i, start:stop], summed in at least float32 and rounded once, as one product
        over the concatenation would be."""
        parts = [_matmul(x, q, slice(r0, r1), slice(start, stop), accumulate)
                 for x, r0, r1 in zip(xs, rows[:-1], rows[1:])]
        return functools.reduce(jnp.add, parts).astype(dtype)

    down = None if lora is None else rows_times(lora["lora_A"], 0, None)
    outs = []
    for start, stop in zip(columns[:-1], columns[1:]):
        y = rows_times(p, start, stop)
        if "bias" in p:
            y = y + p["bias"][start:stop].astype(y.dtype)
        if down is not None:
            y = y + lora_scale * jnp.matmul(down, lora["lora_B"]["kernel"][:, start:stop].astype(y.dtype))
        outs.append(y.reshape(*lead, stop - start))
    return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def layer_norm(x: jax.Array, eps: float, kernels: str = "reference") -> jax.Array:
    """LayerNorm without affine parameters (every LayerNorm in the FLUX.2 DiT is `elementwise_affine=False`).

    The backward pass is written by hand so that it keeps only the output and the per-token 1/σ: autodiff kept
    three full-size intermediates (x·x, x − μ, the product), and in a scanned stack every saved tensor is a
    zero-filled, per-layer written and per-layer read buffer. The output is what the modulation after it saves
    anyway, so the norm adds one (B, S, 1) array. As in apex's memory-efficient LayerNorm, x̂ is recovered from the
    output, so with bf16 activations the backward sees x̂ rounded to bf16. `kernels` picks `channel_dot`'s form.
    """
    return _layer_norm_fwd(x, eps, kernels)[0]


def _layer_norm_fwd(x, eps, kernels):
    xf = x.astype(_stat_dtype(x))
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    y = (centred * inv_std).astype(x.dtype)
    return y, (y, inv_std)


def _layer_norm_bwd(eps, kernels, residuals, dy):
    """dx = (dy − mean(dy) − x̂·mean(dy·x̂)) / σ, the standard LayerNorm gradient without affine terms."""
    y, inv_std = residuals
    normed, g = y.astype(inv_std.dtype), dy.astype(inv_std.dtype)
    n = normed.shape[-1]
    dx = (g - jnp.mean(g, axis=-1, keepdims=True) - normed * (channel_dot(g, normed, kernels) / n)) * inv_std
    return (dx.astype(dy.dtype),)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(p: Params, x: jax.Array, eps: float, kernels: str = "reference") -> jax.Array:
    """RMSNorm over the last axis with a learned `scale` (torch `RMSNorm.weight`).

    Hand-written backward keeping the input and the per-row 1/rms only (autodiff kept three full-size
    intermediates; see `layer_norm` for why that matters); the scale's gradient is a sum over every leading axis,
    written as one contraction. `kernels` picks `channel_dot`'s form.
    """
    return _rms_norm_fwd(p, x, eps, kernels)[0]


def _rms_norm_fwd(p, x, eps, kernels):
    xf = x.astype(_stat_dtype(x))
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    y = (xf * inv_rms * p["scale"].astype(xf.dtype)).astype(x.dtype)
    return y, (p["scale"], x, inv_rms)


def _rms_norm_bwd(eps, kernels, residuals, dy):
    """With n = x/rms and g = dy·w: dx = (g − n·mean(g·n)) / rms and dw = Σ dy·n over every leading axis."""
    scale, x, inv_rms = residuals
    normed = x.astype(inv_rms.dtype) * inv_rms
    dyf = dy.astype(inv_rms.dtype)
    g = dyf * scale.astype(inv_rms.dtype)
    dx = (g - normed * (channel_dot(g, normed, kernels) / x.shape[-1])) * inv_rms
    d_scale = jnp.einsum("nd,nd->d", dyf.reshape(-1, x.shape[-1]), normed.reshape(-1, x.shape[-1]))
    return {"scale": d_scale.astype(scale.dtype)}, dx.astype(dy.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _channel_sums(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ_n x, Σ_n x·y) over the pixel axis of (B, N, C) arrays, each (B, C).

    Written as a one-axis sum and a contraction because XLA:CPU's YNNPACK fusion runs the reduction over pixels and
    channels-in-group that autodiff and the textbook formula produce several times slower (docs/performance.md,
    2026-12-03, "GroupNorm's reductions").
    """
    return jnp.sum(x, axis=1), jnp.einsum("bnc,bnc->bc", x, y)


def _group_mean(per_channel: jax.Array, groups: int, count: int) -> jax.Array:
    """(B, C) channel sums -> (B, 1, C): each channel gets the mean over its group's channels and `count` pixels."""
    b, c = per_channel.shape
    means = jnp.sum(per_channel.reshape(b, groups, c // groups), axis=-1, keepdims=True) / (count * (c // groups))
    return jnp.broadcast_to(means, (b, groups, c // groups)).reshape(b, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def group_norm(p: Params, x: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm over an NHWC (or N...C) array with learned `scale` and `bias`, statistics in float32.

    The variance is E[x²] − E[x]² from per-channel sums (as torch's channels-last CPU kernel computes it), clamped at
    zero; forward and backward reduce only through `_channel_sums` (see there why). The backward keeps the input and
    the per-group statistics.
    """
    return _group_norm_fwd(p, x, groups, eps)[0]


def _group_norm_stats(x, groups, eps):
    """x (B, N, C) in the statistics dtype -> per-channel-broadcast group mean and 1/σ, each (B, 1, C)."""
    total, squares = _channel_sums(x, x)
    mean = _group_mean(total, groups, x.shape[1])
    var = jnp.maximum(_group_mean(squares, groups, x.shape[1]) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def _group_norm_fwd(p, x, groups, eps):
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {groups} groups")
    xf = x.astype(_stat_dtype(x)).reshape(x.shape[0], -1, c)
    mean, inv_std = _group_norm_stats(xf, groups, eps)
    y = (xf - mean) * inv_std * p["scale"].astype(xf.dtype) + p["bias"].astype(xf.dtype)
    return y.reshape(x.shape).astype(x.dtype), (p, x, mean, inv_std)


def _group_norm_bwd(groups, eps, residuals, dy):
    """With x̂ the normalised input and g = dy·w: dx = (g − mean_group(g) − x̂·mean_group(g·x̂)) / σ, where each group
    mean runs over the group's channels and all pixels; dw = Σ dy·x̂ and db = Σ dy over batch and pixels."""
    p, x, mean, inv_std = residuals
    c = x.shape[-1]
    normed = (x.astype(mean.dtype).reshape(x.shape[0], -1, c) - mean) * inv_std
    dyf = dy.astype(mean.dtype).reshape(normed.shape)
    d_bias, d_scale = _channel_sums(dyf, normed)
    w = p["scale"].astype(mean.dtype)
    count = normed.shape[1]
    dx = (dyf * w - _group_mean(d_bias * w, groups, count) - normed * _group_mean(d_scale * w, groups, count))
    dx = (dx * inv_std).reshape(x.shape).astype(dy.dtype)
    return {"scale": jnp.sum(d_scale, axis=0).astype(p["scale"].dtype),
            "bias": jnp.sum(d_bias, axis=0).astype(p["bias"].dtype)}, dx


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


# The "cpu" kernels' convolutions. XLA:CPU gives float convolutions to YNNPACK, which runs those with few channels on
# one core at any batch size, while its Eigen path uses every core; XLA sends a convolution whose output is larger
# than its input to Eigen, so `_conv` pads these one pixel wider on each side and crops the extra ring (see
# `_eigen_pads`). The bounds below are where Eigen won, measured per shape on a 2-core CPU.
EIGEN_MIN_CHANNELS = 16
EIGEN_MAX_OUT_CHANNELS = 64
EIGEN_MAX_FLOPS = 2e9


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The reference convolution: `lax.conv_general_dilated` in NHWC/HWIO."""
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride), padding=padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _eigen_pads(x_shape, kernel_shape, pads) -> tuple | None:
    """`pads` one pixel wider on each side if this stride-1 convolution should run on XLA:CPU's Eigen path (see
    above), else None. Only where the widened output is larger than the input (else YNNPACK takes it anyway)."""
    (kh, kw, cin, cout), (height, width) = kernel_shape, x_shape[1:3]
    wide = tuple((low + 1, high + 1) for low, high in pads)
    out = [size + low + high - k + 1 for size, k, (low, high) in zip((height, width), (kh, kw), wide)]
    flops = 2.0 * out[0] * out[1] * kh * kw * cin * cout
    if (min(cin, cout) < EIGEN_MIN_CHANNELS or cout > EIGEN_MAX_OUT_CHANNELS or flops > EIGEN_MAX_FLOPS
            or out[0] <= height or out[1] <= width):
        return None
    return wide


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The "cpu" `_lax_conv`: stride-1 convolutions with explicit pads (as `conv2d` passes them) that run faster on
    XLA:CPU's Eigen path are computed one pixel wider on each side and cropped (the same values: the ring is dropped,
    nothing else moves)."""
    if stride == 1 and not isinstance(padding, str):
        wide = _eigen_pads(x.shape, kernel.shape, tuple(map(tuple, padding)))
        if wide is not None:
            return _lax_conv(x, kernel, 1, wide)[:, 1:-1, 1:-1]
    return _lax_conv(x, kernel, stride, padding)


def input_grad_kernel(kernel: jax.Array) -> jax.Array:
    """The HWIO kernel whose stride-1 convolution of dL/dy is dL/dx: `kernel` flipped in space, in and out swapped."""
    return jnp.swapaxes(jnp.flip(kernel, axis=(0, 1)), 2, 3)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016) for frozen 3 x 3 convolutions with many channels, a "cpu" kernel (GPU
# libraries choose their own algorithm). Each 2 x 2 output tile costs 16 products per channel pair instead of 36: the
# input's 4 x 4 tiles are transformed (Bᵀ d B), multiplied channel-wise by the kernel transformed once (G g Gᵀ, 16
# matrices of in x out channels, one batched matmul) and transformed back (Aᵀ m A). Below 128 input channels the
# transformed tiles' memory traffic outweighs the saved products.
WINOGRAD_MIN_CHANNELS = 128
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
# G·flip(g) = S·G·g with S the swap of rows 0 and 3, so the flipped kernel's transform is the transform with both
# tile axes permuted by S: the input gradient reuses the forward's transformed kernel.
_WINOGRAD_FLIP = (3, 1, 2, 0)


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """A 3 x 3 HWIO kernel -> its Winograd F(2x2, 3x3) transform G g Gᵀ, `(4, 4, in, out)`."""
    g = jnp.asarray(_WINOGRAD_G, jnp.promote_types(kernel.dtype, jnp.float32))
    return jnp.einsum("ak,klio,bl->abio", g, kernel.astype(g.dtype), g)


def _winograd_applies(x_shape, kernel_shape, pads) -> bool:
    """F(2x2, 3x3) as written here covers a 3 x 3 'SAME' convolution (pads of 1) of an image with even sides."""
    return (tuple(kernel_shape[:2]) == (3, 3) and pads == ((1, 1), (1, 1))
            and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0)


def _input_transform_1d(d0, d1, d2, d3):
    """Bᵀ along one axis: a tile's four samples -> four transformed ones."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_transform_1d(m0, m1, m2, m3):
    """Aᵀ along one axis: four products -> the tile's two outputs."""
    return m0 + m1 + m2, m1 - m2 - m3


def _winograd_tiles(x: jax.Array) -> list[list[jax.Array]]:
    """(N, H, W, C), sides even -> Bᵀ d B of its overlapping 4 x 4 tiles (stride 2, pad 1) as a 4 x 4 nested list of
    (N, H/2, W/2, C). Tile i's rows are padded rows 2i..2i+3, i.e. both rows of row pairs i and i + 1: contiguous
    slices of the pair-split image, no strided gathers."""
    n, h, w, c = x.shape
    pairs = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, h // 2 + 1, 2, w // 2 + 1, 2, c)
    rows = _input_transform_1d(pairs[:, :-1, 0], pairs[:, :-1, 1], pairs[:, 1:, 0], pairs[:, 1:, 1])
    return [list(_input_transform_1d(r[:, :, :-1, 0], r[:, :, :-1, 1], r[:, :, 1:, 0], r[:, :, 1:, 1])) for r in rows]


def _winograd_conv(x: jax.Array, transformed: jax.Array, input_grad: bool) -> jax.Array:
    """The 'SAME' 3 x 3 convolution of `x` (sides even) with the kernel whose transform is `transformed`, or, with
    `input_grad`, with that kernel flipped in space and in/out swapped (dL/dx from dL/dy): the tile axes are then
    permuted by `_WINOGRAD_FLIP` on both sides of the product and the product contracts the kernel's out axis."""
    n, h, w, _ = x.shape
    order = _WINOGRAD_FLIP if input_grad else range(4)
    tiles = _winograd_tiles(x)
    v = jnp.stack([tiles[a][b] for a in order for b in order]).reshape(16, n * (h // 2) * (w // 2), x.shape[-1])
    u = transformed.astype(x.dtype).reshape(16, *transformed.shape[2:])
    contract = 2 if input_grad else 1
    m = jax.lax.dot_general(v, u, (((2,), (contract,)), ((0,), (0,))))
    m = m.reshape(4, 4, n, h // 2, w // 2, m.shape[-1])
    products = [[m[order[a], order[b]] for b in range(4)] for a in range(4)]  # the permutation is its own inverse
    # Aᵀ over the row axis a for every b, then over b: out_rows[r][s] is output pixel (2i + r, 2j + s) of tile (i, j).
    by_row = zip(*[_output_transform_1d(*(products[a][b] for a in range(4))) for b in range(4)])
    out_rows = [jnp.stack(_output_transform_1d(*row), axis=3) for row in by_row]  # (N, H/2, W/2, 2, C) each
    return jnp.stack(out_rows, axis=2).reshape(n, h, w, m.shape[-1])


@jax.custom_vjp
def _winograd_conv3x3(x, kernel, transformed):
    """The 'SAME' 3 x 3 stride-1 convolution by Winograd F(2x2, 3x3), forward and input gradient; `transformed` must
    equal `winograd_kernel(kernel)` and gets a zero cotangent; `kernel` gets its true gradient (direct convolution),
    computed only if used."""
    return _winograd_conv(x, transformed, input_grad=False)


def _winograd_conv3x3_fwd(x, kernel, transformed):
    return _winograd_conv(x, transformed, input_grad=False), (x, kernel, transformed)


def _winograd_conv3x3_bwd(residuals, dy):
    x, kernel, transformed = residuals
    dx = _winograd_conv(dy, transformed, input_grad=True)
    d_kernel = jax.vjp(lambda k: _conv(x, k, 1, ((1, 1), (1, 1))), kernel)[1](dy)[0]
    return dx, d_kernel, jnp.zeros_like(transformed)


_winograd_conv3x3.defvjp(_winograd_conv3x3_fwd, _winograd_conv3x3_bwd)


def with_frozen_conv_kernels(params: Params, kernels: str | None = None) -> Params:
    """`params` prepared for a network that stays frozen while gradients flow through it (LPIPS in a training step).

    With the "cpu" kernels (None: the platform's, see `kernels.default_ops`; this runs outside any trace) every
    convolution module (a dict with a 4-D `kernel`) also holds its `input_grad_kernel`, and each 3 x 3 one with at
    least `WINOGRAD_MIN_CHANNELS` input channels its `winograd_kernel` too (images with an odd side still take the
    direct path); `conv2d` with the "cpu" kernels uses them, and the originals stay, and stay the ones any gradient
    goes to. Autodiff of a convolution w.r.t. its input flips and transposes the kernel on every call, which XLA:CPU
    does in one slow loop; done once here. With the "reference" kernels `params` are returned as they are.
    """
    if kernels is None:
        from foa_jax.models import kernels as kernel_choice

        kernels = kernel_choice.default_ops(kernel_choice.platform())
    _check_kernels(kernels)
    if kernels == "reference":
        return params

    def visit(node):
        if not isinstance(node, dict):
            return node
        out = {key: visit(value) for key, value in node.items()}
        kernel = node.get("kernel")
        if kernel is None or isinstance(kernel, dict) or jnp.ndim(kernel) != 4:
            return out
        out["input_grad_kernel"] = input_grad_kernel(kernel)
        if kernel.shape[:2] == (3, 3) and kernel.shape[2] >= WINOGRAD_MIN_CHANNELS:
            out["winograd_kernel"] = winograd_kernel(kernel)
        return out

    return visit(params)


def holds_frozen_conv_kernels(params: Params) -> bool:
    """Whether `with_frozen_conv_kernels` prepared `params` for the "cpu" kernels."""
    return any(path[-1].key == "input_grad_kernel"
               for path, _ in jax.tree_util.tree_leaves_with_path(params)
               if isinstance(path[-1], jax.tree_util.DictKey))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_stride1(x, kernel, grad_kernel, pads):
    """A stride-1 convolution whose input gradient is a stride-1 convolution of dL/dy with `grad_kernel`, which must
    equal `input_grad_kernel(kernel)` or be None (then it is formed in the backward pass); it gets a zero cotangent.
    Written out rather than left to autodiff so that the input-gradient convolution goes through `_conv` too (autodiff
    of the cropped convolution would pad dL/dy and hand the product back to YNNPACK); `kernel` gets its true
    gradient, computed only if used."""
    return _conv_stride1_fwd(x, kernel, grad_kernel, pads)[0]


def _conv_stride1_fwd(x, kernel, grad_kernel, pads):
    return _conv(x, kernel, 1, pads), (x, kernel, grad_kernel)


def _conv_stride1_bwd(pads, residuals, dy):
    x, kernel, grad_kernel = residuals
    size = kernel.shape[:2]
    transposed = tuple((k - 1 - low, k - 1 - high) for k, (low, high) in zip(size, pads))
    flipped = input_grad_kernel(kernel) if grad_kernel is None else grad_kernel
    dx = _conv(dy, flipped.astype(dy.dtype), 1, transposed)
    return dx, kernel_grad(x, dy, kernel.shape, 1, pads).astype(kernel.dtype), \
        None if grad_kernel is None else jnp.zeros_like(grad_kernel)


_conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, stride: int, pads) -> jax.Array:
    """dL/dkernel of `_lax_conv(x, kernel, stride, pads)` given dL/dy: one matrix product per kernel tap,
    `dK[i, j] = Σ_{b,h,w} x_pad[b, s·h + i, s·w + j, :]ᵀ dy[b, h, w, :]`, each contracting over every output pixel.
    XLA:CPU runs the same gradient as a backward-filter convolution several times slower (the "cpu" kernels' choice;
    the reference path keeps autodiff)."""
    kh, kw = kernel_shape[:2]
    padded = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    ho, wo = dy.shape[1:3]
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    taps = [[jnp.einsum("bhwi,bhwo->io", jax.lax.slice(
        padded, (0, i, j, 0), (padded.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, padded.shape[3]),
        (1, stride, stride, 1)), dy, preferred_element_type=accumulate) for j in range(kw)] for i in range(kh)]
    return jnp.stack([jnp.stack(row) for row in taps])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_strided(x, kernel, stride, pads):
    """A strided convolution (the VAE's downsamplers) whose kernel gradient is `kernel_grad`'s products; the input
    gradient stays autodiff's."""
    return _lax_conv(x, kernel, stride, pads)


def _conv_strided_fwd(x, kernel, stride, pads):
    return _lax_conv(x, kernel, stride, pads), (x, kernel)


def _conv_strided_bwd(stride, pads, residuals, dy):
    x, kernel = residuals
    dx = jax.vjp(lambda v: _lax_conv(v, kernel, stride, pads), x)[1](dy)[0]
    return dx, kernel_grad(x, dy, kernel.shape, stride, pads).astype(kernel.dtype)


_conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def conv2d(p: Params, x: jax.Array, stride: int = 1, padding="SAME", kernels: str = "reference") -> jax.Array:
    """2-D convolution in NHWC with an HWIO kernel and optional bias.

    `padding` is either a lax padding string or explicit `((top, bottom), (left, right))`, which the VAE needs for
    its asymmetric (0, 1, 0, 1) downsampling pad. "reference" is `lax.conv_general_dilated` under autodiff. With
    "cpu", a stride-1 convolution whose module holds an `input_grad_kernel` (`with_frozen_conv_kernels`)
    back-propagates to its input through that kernel, one that holds a `winograd_kernel` runs forward and backward by
    Winograd where `_winograd_applies`, and every other stride-1 convolution back-propagates through `_conv` (see
    `_conv_stride1`); every "cpu" kernel gradient is `kernel_grad`'s.
    """
    _check_kernels(kernels)
    kernel = p["kernel"].astype(x.dtype)
    if kernels == "reference":
        y = _lax_conv(x, kernel, stride, padding)
    elif stride == 1:
        pads = padding
        if isinstance(padding, str):
            pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding)
        pads = tuple(map(tuple, pads))
        if "winograd_kernel" in p and _winograd_applies(x.shape, kernel.shape, pads):
            y = _winograd_conv3x3(x, kernel, p["winograd_kernel"])
        else:
            y = _conv_stride1(x, kernel, p.get("input_grad_kernel"), pads)
    else:
        pads = padding
        if isinstance(padding, str):
            pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (stride, stride), padding)
        y = _conv_strided(x, kernel, stride, tuple(map(tuple, pads)))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y
