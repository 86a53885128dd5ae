"""Real-ESRGAN second-order degradation (x4, `train_realesrgan_x4plus.yml`), host-side in NumPy.

The pipeline turns an HR crop into its training LR image:

    stage 1: blur (kernel 1) -> random resize -> Gaussian or Poisson noise -> JPEG
    stage 2: blur (kernel 2, p 0.8) -> random resize around HR/scale -> noise
    final:   50/50 either [resize to HR/scale + sinc] then JPEG, or JPEG then [resize to HR/scale + sinc]
    -> clamp, round to 8 bits

It is split like Real-ESRGAN itself (kernels drawn in the dataset, the rest drawn in the model's `feed_data`), except
that every random choice is drawn first, into a `DegradationPlan`, from one `np.random.Generator`; `apply_plan` then
only computes. A plan therefore depends on the seed alone, not on the image size, and can be inspected or logged.
`degrade(hr, seed)` gives the same LR bytes for the same seed, NumPy (the Generator's distributions) and Pillow
(libjpeg) versions.

Deviations from Real-ESRGAN, all deliberate:
- Input is the HR image itself. Real-ESRGAN degrades its unsharp-masked GT (`gt_usm`); we start at the blur.
- JPEG is Pillow's libjpeg (4:2:0 chroma subsampling, the drawn quality rounded to an integer) on the image rounded
  to 8 bits, decoded to 8 bits. Real-ESRGAN uses DiffJPEG (non-differentiable mode) on float images: fractional
  quality, quantisation tables scaled by a float factor (libjpeg rounds and clips them), zero padding to a multiple
  of 16 (libjpeg replicates edges), nearest-neighbour chroma upsampling (libjpeg-turbo interpolates) and a float
  output. The artefacts are alike in kind and strength, different in detail.
- Noise and all other randomness come from NumPy, not torch: same distributions, different streams. A noise field
  depends on its seed and on the image: NumPy's Poisson sampler consumes a varying number of uniforms, so changing
  one pixel level changes the Poisson draws after it (Gaussian fields depend on the seed and shape only).
- Reflect padding before a blur repeats the reflection when the image is smaller than the kernel radius (NumPy's
  `reflect`); torch's `reflect` raises there. Real-ESRGAN's 256-px crops never reach that case; small test crops do.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import signal, special

from foa_jax.data.resize import RESIZE_MODES, resize, scaled_size

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_DIRECTIONS = ("up", "down", "keep")
NOISE_KINDS = ("gaussian", "poisson")
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision rgb_to_grayscale, used by BasicSR


# ----------------------------------------------------------------------------------------------------------------- #
# Configuration
# ----------------------------------------------------------------------------------------------------------------- #


def _check_range(owner: str, name: str, value: tuple[float, float], low: float = -math.inf, high: float = math.inf):
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(f"{owner}.{name}: expected (lo, hi) with {low} <= lo <= hi <= {high}, got {value}")


def _check_probability(owner: str, name: str, value: float):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name}: expected a probability in [0, 1], got {value}")


def _check_distribution(owner: str, name: str, probs: tuple[float, ...], n: int):
    if len(probs) != n or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{owner}.{name}: expected {n} non-negative probabilities summing to 1, got {probs}")


@dataclass(frozen=True)
class StageConfig:
    """One degradation stage. Defaults are stage 1 of Real-ESRGAN x4plus; `STAGE2_DEFAULTS` holds stage 2's."""

    blur_prob: float = 1.0  # Real-ESRGAN always blurs in stage 1; `second_blur_prob` = 0.8 in stage 2
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self):
        name = type(self).__name__
        unknown = set(self.kernel_types) - set(KERNEL_TYPES)
        if unknown:
            raise ValueError(f"{name}.kernel_types: unknown {sorted(unknown)}, expected a subset of {KERNEL_TYPES}")
        _check_distribution(name, "kernel_probs", self.kernel_probs, len(self.kernel_types))
        _check_distribution(name, "resize_probs", self.resize_probs, len(RESIZE_DIRECTIONS))
        for prob in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _check_probability(name, prob, getattr(self, prob))
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"{name}.blur_sigma: expected positive sigmas, got {self.blur_sigma}")
        _check_range(name, "blur_sigma", self.blur_sigma)
        # The shape parameters are drawn below or above 1 with equal odds, the resize factor in [lo, 1] ('down') or
        # [1, hi] ('up'): each range must straddle 1.
        for straddling in ("betag_range", "betap_range", "resize_range"):
            value = getattr(self, straddling)
            if len(value) != 2 or not (0 < value[0] <= 1.0 <= value[1]):
                raise ValueError(f"{name}.{straddling}: expected (lo, hi) with 0 < lo <= 1 <= hi, got {value}")
        _check_range(name, "noise_range", self.noise_range, low=0.0)
        _check_range(name, "poisson_scale_range", self.poisson_scale_range, low=0.0)
        _check_range(name, "jpeg_range", self.jpeg_range, low=1.0, high=100.0)


STAGE2_DEFAULTS = {
    "blur_prob": 0.8,
    "blur_sigma": (0.2, 1.5),
    "resize_probs": (0.3, 0.4, 0.3),
    "resize_range": (0.3, 1.2),
    "noise_range": (1.0, 25.0),
    "poisson_scale_range": (0.05, 2.5),
}


@dataclass(frozen=True)
class DegradationConfig:
    """Every parameter of the second-order degradation; defaults are Real-ESRGAN `train_realesrgan_x4plus.yml`.

    The sinc cut-off ranges, kernel sizes and rotation range are hard-coded in Real-ESRGAN's dataset; they are fields
    here so nothing is hidden. Stage 2's `jpeg_range` is the JPEG of the final step.
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)  # every kernel is zero-padded to the largest
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi)  # for kernel sizes < sinc_large_size
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_size: int = 13
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(**STAGE2_DEFAULTS))

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"{name}.scale: expected a positive int, got {self.scale!r}")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"{name}.kernel_sizes: expected odd sizes >= 1, got {self.kernel_sizes}")
        _check_range(name, "rotation_range", self.rotation_range)
        for cutoff in ("sinc_cutoff_small", "sinc_cutoff_large", "final_sinc_cutoff"):
            _check_range(name, cutoff, getattr(self, cutoff), low=1e-6, high=math.pi)
        _check_probability(name, "final_sinc_prob", self.final_sinc_prob)
        if not self.resize_modes or set(self.resize_modes) - set(RESIZE_MODES):
            raise ValueError(
                f"{name}.resize_modes: expected a non-empty subset of {RESIZE_MODES}, got {self.resize_modes}"
            )
        for stage in ("stage1", "stage2"):
            if not isinstance(getattr(self, stage), StageConfig):
                raise TypeError(f"{name}.{stage}: expected a StageConfig, got {type(getattr(self, stage))}")

    @property
    def padded_kernel_size(self) -> int:
        return max(self.kernel_sizes)


# ----------------------------------------------------------------------------------------------------------------- #
# Blur kernels (BasicSR `basicsr/data/degradations.py` formulas)
# ----------------------------------------------------------------------------------------------------------------- #


def kernel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets `(x, y)` from the kernel centre; `x` runs along columns, `y` along rows (BasicSR's mesh_grid)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")
    axis = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(axis, axis)


def mahalanobis_sq(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """`v^T Σ^-1 v` on the kernel grid, with `Σ = R(θ) diag(σx², σy²) R(θ)^T` (BasicSR's sigma_matrix2).

    Written through the rotated coordinates `R(θ)^T v` instead of inverting Σ numerically.
    """
    x, y = kernel_grid(size)
    along = x * math.cos(theta) + y * math.sin(theta)
    across = -x * math.sin(theta) + y * math.cos(theta)
    return (along / sigma_x) ** 2 + (across / sigma_y) ** 2


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0
) -> np.ndarray:
    """`exp(-q^β / 2)`, normalised; β = 1 is the (an)isotropic Gaussian (BasicSR's bivariate_Gaussian)."""
    kernel = np.exp(-0.5 * mahalanobis_sq(size, sigma_x, sigma_y, theta) ** beta)
    return kernel / kernel.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """`1 / (1 + q^β)`, normalised: a flat top with heavy tails (BasicSR's bivariate_plateau)."""
    kernel = 1.0 / (mahalanobis_sq(size, sigma_x, sigma_y, theta) ** beta + 1.0)
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> np.ndarray:
    """Circularly symmetric ideal low-pass filter `ω_c J1(ω_c r) / (2π r)`, normalised (BasicSR's
    circular_lowpass_kernel); the centre takes the limit `ω_c² / (4π)`. Zero-padded to `pad_to` if larger.

    It imitates ringing and overshoot artefacts, which is why Real-ESRGAN mixes it into the blur kernels.
    """
    x, y = kernel_grid(size)
    r = np.hypot(x, y)
    centre = r == 0
    r_safe = np.where(centre, 1.0, r)
    kernel = np.where(centre, cutoff**2 / (4 * math.pi), cutoff * special.j1(cutoff * r_safe) / (2 * math.pi * r_safe))
    kernel = kernel / kernel.sum()
    return pad_kernel(kernel, pad_to) if pad_to > size else kernel


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a square odd kernel symmetrically to `size` (so every stage's kernel has one shape)."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0 or (size - kernel.shape[0]) % 2:
        raise ValueError(f"pad_kernel: cannot pad a {kernel.shape[0]}-kernel to {size}")
    return np.pad(kernel, pad)


def _beta_around_one(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    """BasicSR's shape draw: below 1 or above 1 with equal odds, so both regimes are seen equally often."""
    if rng.uniform() < 0.5:
        return rng.uniform(beta_range[0], 1.0)
    return rng.uniform(1.0, beta_range[1])


def mixed_kernel(
    rng: np.random.Generator, kernel_type: str, size: int, stage: StageConfig, rotation_range: tuple[float, float]
) -> np.ndarray:
    """A kernel of one type with random shape parameters (BasicSR's random_mixed_kernels, no multiplicative noise)."""
    sigma_x = rng.uniform(*stage.blur_sigma)
    if kernel_type.endswith("aniso"):
        sigma_y = rng.uniform(*stage.blur_sigma)
        theta = rng.uniform(*rotation_range)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kernel_type in ("iso", "aniso"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta)
    if kernel_type.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _beta_around_one(rng, stage.betag_range))
    if kernel_type.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, _beta_around_one(rng, stage.betap_range))
    raise ValueError(f"mixed_kernel: unknown kernel type {kernel_type!r}, expected one of {KERNEL_TYPES}")


def random_kernel(rng: np.random.Generator, config: DegradationConfig, stage: int) -> np.ndarray:
    """A stage's blur kernel as Real-ESRGAN's dataset draws it: random odd size, sinc with `sinc_prob`, else a mixed
    kernel; zero-padded to `config.padded_kernel_size` (21)."""
    stage_config = _stage(config, stage)
    size = int(rng.choice(config.kernel_sizes))
    if rng.uniform() < stage_config.sinc_prob:
        cutoff_range = config.sinc_cutoff_small if size < config.sinc_large_size else config.sinc_cutoff_large
        kernel = sinc_kernel(size, rng.uniform(*cutoff_range))
    else:
        kernel_type = str(rng.choice(stage_config.kernel_types, p=stage_config.kernel_probs))
        kernel = mixed_kernel(rng, kernel_type, size, stage_config, config.rotation_range)
    return pad_kernel(kernel, config.padded_kernel_size)


def random_final_sinc(rng: np.random.Generator, config: DegradationConfig) -> np.ndarray | None:
    """The final sinc filter with probability `final_sinc_prob`, else None (Real-ESRGAN's identity pulse)."""
    if rng.uniform() >= config.final_sinc_prob:
        return None
    size = int(rng.choice(config.kernel_sizes))
    return sinc_kernel(size, rng.uniform(*config.final_sinc_cutoff), pad_to=config.padded_kernel_size)


def _stage(config: DegradationConfig, stage: int) -> StageConfig:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    return config.stage1 if stage == 1 else config.stage2


# ----------------------------------------------------------------------------------------------------------------- #
# Image operations: float32 HWC RGB in [0, 1]
# ----------------------------------------------------------------------------------------------------------------- #


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with a square odd kernel after reflect padding: BasicSR's `filter2D` (torch conv2d is a
    correlation). Computed by FFT, which costs the same for any kernel size."""
    k = kernel.shape[0]
    if kernel.shape != (k, k) or k % 2 == 0:
        raise ValueError(f"filter2d: expected a square odd kernel, got shape {kernel.shape}")
    pad = k // 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    flipped = kernel[::-1, ::-1, None].astype(image.dtype)
    return signal.fftconvolve(padded, flipped, mode="valid", axes=(0, 1)).astype(image.dtype)


def add_gaussian_noise(image: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, (σ/255)²) noise, one field shared by all channels if `gray`; clipped to [0, 1]."""
    h, w, c = image.shape
    noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(image + noise, 0.0, 1.0)


def _poisson_residual(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """BasicSR's shot noise: quantise to 8 bits, count the distinct levels, take `vals` = that count rounded up to a
    power of two as the photon scale, and return `Poisson(img * vals) / vals - img`."""
    levels = np.clip(np.round(image * 255.0), 0, 255)
    distinct = np.count_nonzero(np.bincount(levels.astype(np.int64).ravel(), minlength=256))
    vals = 2.0 ** math.ceil(math.log2(distinct))
    quantised = levels / 255.0
    return (rng.poisson(quantised * vals) / vals - quantised).astype(np.float32)


def add_poisson_noise(image: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Shot noise times `scale`; if `gray`, drawn on the luma image and shared by all channels; clipped to [0, 1]."""
    source = (image @ GRAY_WEIGHTS)[..., None] if gray else image
    return np.clip(image + _poisson_residual(source, rng) * np.float32(scale), 0.0, 1.0)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode with Pillow's libjpeg at `quality` (4:2:0, like DiffJPEG); the input is rounded to 8 bits."""
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_compress: quality must be in [1, 100], got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image), "RGB").save(buffer, format="JPEG", quality=int(quality), subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / np.float32(255.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] and round to 8 bits (round half to even, as torch.round)."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------- #
# The plan: every random choice of one degradation
# ----------------------------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ResizeDraw:
    direction: str  # up, down or keep
    factor: float  # relative to the stage's reference size (the input in stage 1, HR/scale in stage 2)
    mode: str


@dataclass(frozen=True)
class NoiseDraw:
    kind: str  # gaussian (strength = σ on 0..255) or poisson (strength = scale)
    strength: float
    gray: bool
    seed: int  # the noise field's own Generator seed, so the plan stays small and replayable


@dataclass(frozen=True, eq=False)
class StageDraw:
    kernel: np.ndarray | None  # None: no blur in this stage
    resize: ResizeDraw
    noise: NoiseDraw
    jpeg_quality: int


@dataclass(frozen=True, eq=False)
class DegradationPlan:
    stage1: StageDraw
    stage2: StageDraw
    final_mode: str  # resize mode of the last resize to HR/scale
    final_sinc: np.ndarray | None  # None: Real-ESRGAN's identity pulse
    jpeg_first: bool  # final order: JPEG then [resize + sinc], else [resize + sinc] then JPEG


def _draw_resize(rng: np.random.Generator, stage: StageConfig, modes: tuple[str, ...]) -> ResizeDraw:
    direction = str(rng.choice(RESIZE_DIRECTIONS, p=stage.resize_probs))
    if direction == "up":
        factor = rng.uniform(1.0, stage.resize_range[1])
    elif direction == "down":
        factor = rng.uniform(stage.resize_range[0], 1.0)
    else:
        factor = 1.0
    return ResizeDraw(direction, float(factor), str(rng.choice(modes)))


def _draw_noise(rng: np.random.Generator, stage: StageConfig) -> NoiseDraw:
    if rng.uniform() < stage.gaussian_noise_prob:
        kind, strength = "gaussian", rng.uniform(*stage.noise_range)
    else:
        kind, strength = "poisson", rng.uniform(*stage.poisson_scale_range)
    gray = bool(rng.uniform() < stage.gray_noise_prob)
    return NoiseDraw(kind, float(strength), gray, int(rng.integers(2**63)))


def _draw_stage(rng: np.random.Generator, config: DegradationConfig, stage: int) -> StageDraw:
    stage_config = _stage(config, stage)
    kernel = random_kernel(rng, config, stage)
    blurred = bool(rng.uniform() < stage_config.blur_prob)
    resize_draw = _draw_resize(rng, stage_config, config.resize_modes)
    noise = _draw_noise(rng, stage_config)
    quality = round(rng.uniform(*stage_config.jpeg_range))
    return StageDraw(kernel if blurred else None, resize_draw, noise, quality)


def sample_plan(rng: np.random.Generator, config: DegradationConfig) -> DegradationPlan:
    """Draw every random choice of one degradation, in a fixed order. As in Real-ESRGAN, a stage's kernel is drawn
    before the coin that decides whether the stage blurs at all."""
    stage1 = _draw_stage(rng, config, 1)
    stage2 = _draw_stage(rng, config, 2)
    final_sinc = random_final_sinc(rng, config)
    final_mode = str(rng.choice(config.resize_modes))
    jpeg_first = bool(rng.uniform() < 0.5)
    return DegradationPlan(stage1, stage2, final_mode, final_sinc, jpeg_first)


# ----------------------------------------------------------------------------------------------------------------- #
# Applying a plan
# ----------------------------------------------------------------------------------------------------------------- #


def min_hr_side(config: DegradationConfig) -> int:
    """Smallest HR side (a multiple of `scale`) for which no intermediate image shrinks to zero pixels."""
    side = config.scale
    while (
        math.floor(side * config.stage1.resize_range[0]) < 1
        or int(side / config.scale * config.stage2.resize_range[0]) < 1
    ):
        side += config.scale
    return side


def apply_noise(image: np.ndarray, noise: NoiseDraw) -> np.ndarray:
    """Add the noise a plan drew, from its own Generator seeded with `noise.seed`."""
    if noise.kind not in NOISE_KINDS:
        raise ValueError(f"apply_noise: kind must be one of {NOISE_KINDS}, got {noise.kind!r}")
    add = add_gaussian_noise if noise.kind == "gaussian" else add_poisson_noise
    return add(image, noise.strength, noise.gray, np.random.default_rng(noise.seed))


def _resize_and_sinc(image: np.ndarray, size: tuple[int, int], plan: DegradationPlan) -> np.ndarray:
    out = resize(image, size, plan.final_mode)
    return out if plan.final_sinc is None else filter2d(out, plan.final_sinc)


def apply_plan(hr: np.ndarray, plan: DegradationPlan, config: DegradationConfig) -> np.ndarray:
    """Degrade a float32 HWC image in [0, 1] as `plan` says; returns the float32 LR before the 8-bit rounding.

    Sizes follow Real-ESRGAN exactly: stage 1 resizes by `scale_factor` (torch: floor(n * f), centres mapped with
    1 / f), stage 2 to `int(n / scale * f)`, the final resize to `n // scale`.
    """
    h, w = hr.shape[:2]
    s1, s2 = plan.stage1, plan.stage2

    out = hr if s1.kernel is None else filter2d(hr, s1.kernel)
    factor = s1.resize.factor
    out = resize(out, scaled_size(out.shape[:2], factor), s1.resize.mode, scale_factor=factor)
    out = apply_noise(out, s1.noise)
    out = jpeg_compress(out, s1.jpeg_quality)

    if s2.kernel is not None:
        out = filter2d(out, s2.kernel)
    factor = s2.resize.factor
    out = resize(out, (int(h / config.scale * factor), int(w / config.scale * factor)), s2.resize.mode)
    out = apply_noise(out, s2.noise)

    lr_size = (h // config.scale, w // config.scale)
    if plan.jpeg_first:
        out = _resize_and_sinc(jpeg_compress(out, s2.jpeg_quality), lr_size, plan)
    else:
        out = jpeg_compress(_resize_and_sinc(out, lr_size, plan), s2.jpeg_quality)
    return out


def _validated_float_image(hr: np.ndarray, config: DegradationConfig) -> np.ndarray:
    if not isinstance(hr, np.ndarray):
        raise TypeError(f"degrade: expected a numpy array, got {type(hr).__name__}")
    if hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"degrade: expected an HWC RGB image of shape (H, W, 3), got shape {hr.shape}")
    h, w = hr.shape[:2]
    if h % config.scale or w % config.scale:
        raise ValueError(
            f"degrade: HR sides must be multiples of scale={config.scale}, got {h}x{w} "
            f"(crop to {h - h % config.scale}x{w - w % config.scale})"
        )
    smallest = min_hr_side(config)
    if min(h, w) < smallest:
        raise ValueError(f"degrade: HR sides must be >= {smallest} for this config, got {h}x{w}")
    if hr.dtype == np.uint8:
        return hr.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(hr.dtype, np.floating):
        raise ValueError(f"degrade: expected dtype uint8 or float in [0, 1], got {hr.dtype}")
    if not np.all(np.isfinite(hr)):
        raise ValueError("degrade: float HR image contains NaN or inf")
    if hr.min() < 0.0 or hr.max() > 1.0:
        raise ValueError(f"degrade: float HR image must lie in [0, 1], got [{hr.min()}, {hr.max()}]")
    return hr.astype(np.float32)


def degrade(hr: np.ndarray, seed: int, config: DegradationConfig = DegradationConfig()) -> np.ndarray:
    """HR image (uint8, or float in [0, 1]; HWC RGB, sides multiples of `scale`) -> LR uint8 of size HR / scale.

    The same seed always gives the same plan, whatever the image, and the same LR bytes for the same image.
    """
    image = _validated_float_image(hr, config)
    plan = sample_plan(np.random.default_rng(seed), config)
    return to_uint8(apply_plan(image, plan, config))
