"""Image resizing in NumPy that reproduces torch `F.interpolate` (no antialias, `align_corners=False`).

Real-ESRGAN resizes with `F.interpolate` in modes area / bilinear / bicubic, and the SR conditioning resizes the LR
image back to HR size with bicubic. PIL and OpenCV resize differently (PIL antialiases when shrinking, OpenCV uses a = -0.75
but other border rules), so the host-side pipeline carries its own copy of torch's arithmetic: each mode is separable,
so a resize is two small dense matrices, `out = W_h @ image @ W_w^T`, one per axis.

What torch does, per output index `o` along an axis of `n_in -> n_out` pixels (`s` = `n_in / n_out`, or `1 / f` when
torch was called with `scale_factor=f`, see `resize`):
- bilinear: source `x = max(s * (o + 0.5) - 0.5, 0)`, neighbours `floor(x)` and `floor(x) + 1` clamped to the last
  pixel.
- bicubic: the same source point without the clamp at 0, Keys' cubic convolution with `a = -0.75` over the four
  neighbours `floor(x) - 1 .. floor(x) + 2`, indices clamped to the image (replicated border).
- area: `adaptive_avg_pool2d`, the mean over input pixels `[floor(o * n_in / n_out), ceil((o + 1) * n_in / n_out))`;
  it ignores `scale_factor`.
Results match torch float32 up to float rounding (about 1e-6 on [0, 1] images; weights here are computed in float64).
"""

from __future__ import annotations

import math

import numpy as np

RESIZE_MODES = ("area", "bilinear", "bicubic")
BICUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution parameter; PIL and Keys' paper use -0.5


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    weights = np.zeros((n_out, n_in))
    for o in range(n_out):
        start = (o * n_in) // n_out
        end = -((-(o + 1) * n_in) // n_out)  # integer ceil, as ATen's adaptive pooling end_index
        weights[o, start:end] = 1.0 / (end - start)
    return weights


def _source_coordinates(n_in: int, n_out: int, scale_factor: float | None) -> np.ndarray:
    step = 1.0 / scale_factor if scale_factor is not None else n_in / n_out
    return step * (np.arange(n_out) + 0.5) - 0.5


def _bilinear_weights(n_in: int, n_out: int, scale_factor: float | None) -> np.ndarray:
    x = np.maximum(_source_coordinates(n_in, n_out, scale_factor), 0.0)
    left = np.floor(x).astype(np.int64)
    frac = x - left
    right = np.minimum(left + 1, n_in - 1)
    left = np.minimum(left, n_in - 1)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights


def cubic_convolution(distance: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
    """Keys' cubic convolution kernel at |distance| < 2 (zero beyond), torch's `cubic_convolution1/2`."""
    d = np.abs(distance)
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


def _bicubic_weights(n_in: int, n_out: int, scale_factor: float | None) -> np.ndarray:
    x = _source_coordinates(n_in, n_out, scale_factor)
    base = np.floor(x).astype(np.int64)
    frac = x - base
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for offset in (-1, 0, 1, 2):
        # Border taps are clamped onto the edge pixel, so their weights add up there (replicate padding).
        np.add.at(weights, (rows, np.clip(base + offset, 0, n_in - 1)), cubic_convolution(frac - offset))
    return weights


def resize_weights(n_in: int, n_out: int, mode: str, scale_factor: float | None = None) -> np.ndarray:
    """The `(n_out, n_in)` matrix that resizes one axis like torch `F.interpolate(mode=mode)`."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize_weights: sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    if mode == "area":
        return _area_weights(n_in, n_out)
    if mode == "bilinear":
        return _bilinear_weights(n_in, n_out, scale_factor)
    if mode == "bicubic":
        return _bicubic_weights(n_in, n_out, scale_factor)
    raise ValueError(f"resize: mode must be one of {RESIZE_MODES}, got {mode!r}")


def resize(image: np.ndarray, size: tuple[int, int], mode: str, scale_factor: float | None = None) -> np.ndarray:
    """Resize a float HWC image to `size = (height, width)` as torch `F.interpolate` would.

    `scale_factor` reproduces a torch call made with `scale_factor=f` instead of `size`: torch then maps pixel centres
    with `1 / f` rather than `n_in / n_out` (they differ when `n_in * f` is not an integer), and the caller passes
    `size = floor(n * f)` as torch computes it. Real-ESRGAN's first-stage resize is such a call. The output keeps the
    input's float dtype and is not clipped (bicubic overshoots, as in torch).
    """
    if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"resize: expected a float HWC image, got shape {image.shape} dtype {image.dtype}")
    out_h, out_w = size
    w_h = resize_weights(image.shape[0], out_h, mode, scale_factor).astype(image.dtype)
    w_w = resize_weights(image.shape[1], out_w, mode, scale_factor).astype(image.dtype)
    return np.einsum("oh,hwc,pw->opc", w_h, image, w_w, optimize=True)


def scaled_size(size: tuple[int, int], scale_factor: float) -> tuple[int, int]:
    """Output size of torch `F.interpolate(scale_factor=f)`: `floor(n * f)` per axis."""
    return tuple(math.floor(float(n) * scale_factor) for n in size)


def bicubic_upsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HWC image (uint8, or float in [0, 1]) to `size` with torch bicubic; float32 in [0, 1].

    This is the SR conditioning resize (LR back to HR size before the VAE). The result is clipped to [0, 1] because
    bicubic overshoots at edges and the VAE expects a valid image, as it would get after any 8-bit round trip.
    """
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    else:
        raise ValueError(f"bicubic_upsample: expected uint8 or float image, got dtype {image.dtype}")
    return np.clip(resize(image, size, "bicubic"), 0.0, 1.0)
