"""foa_jax.data.degrade: kernels against direct formulas, blur and the whole pipeline against a torch transcription of
Real-ESRGAN's feed_data, noise statistics, JPEG, determinism, sizes and input validation, on skimage photos."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from scipy import integrate, special, stats

from foa_jax.data import degrade as dg
from foa_jax.data.resize import resize

CONFIG = dg.DegradationConfig()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:256, 128:384]


def _cov(sigma_x, sigma_y, theta):
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T


def _points(size):
    """(row, col) -> (x = col offset, y = row offset), BasicSR's grid convention, built independently."""
    half = size // 2
    return np.array([[(c - half, r - half) for c in range(size)] for r in range(size)], np.float64)


SHAPES = [(7, 0.5, 2.0, 0.3), (13, 3.0, 1.2, -2.5), (21, 1.0, 1.0, 0.0), (21, 2.7, 0.4, 1.9)]


@pytest.mark.parametrize("size,sigma_x,sigma_y,theta", SHAPES)
def test_gaussian_kernel_is_the_normal_density(size, sigma_x, sigma_y, theta):
    density = stats.multivariate_normal(mean=[0, 0], cov=_cov(sigma_x, sigma_y, theta)).pdf(_points(size))
    np.testing.assert_allclose(
        dg.generalized_gaussian_kernel(size, sigma_x, sigma_y, theta), density / density.sum(), rtol=1e-10, atol=1e-15
    )


@pytest.mark.parametrize("size,sigma_x,sigma_y,theta", SHAPES)
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.7])
def test_generalized_and_plateau_kernels_match_basicsr_formulas(size, sigma_x, sigma_y, theta, beta):
    points = _points(size)
    q = np.einsum("...i,ij,...j->...", points, np.linalg.inv(_cov(sigma_x, sigma_y, theta)), points)
    generalized = np.exp(-0.5 * q**beta)
    plateau = 1.0 / (q**beta + 1.0)
    got_g = dg.generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta)
    got_p = dg.plateau_kernel(size, sigma_x, sigma_y, theta, beta)
    np.testing.assert_allclose(got_g, generalized / generalized.sum(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got_p, plateau / plateau.sum(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("size,cutoff", [(7, math.pi / 3), (13, 1.3), (21, math.pi / 5), (9, math.pi)])
def test_sinc_kernel_is_the_inverse_fourier_transform_of_a_disc(size, cutoff):
    """h(r) = 1/(2π) ∫_0^ωc ρ J0(ρ r) dρ, integrated numerically (independent of the closed form with J1)."""
    points = _points(size)
    radii = np.hypot(points[..., 0], points[..., 1])
    values = np.vectorize(lambda r: integrate.quad(lambda rho: rho * special.j0(rho * r), 0, cutoff)[0])(radii)
    expected = np.pad(values / values.sum(), (21 - size) // 2)
    np.testing.assert_allclose(dg.sinc_kernel(size, cutoff, pad_to=21), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("stage", [1, 2])
def test_random_kernels_are_normalised_and_point_symmetric(stage):
    rng = np.random.default_rng(stage)
    for _ in range(300):
        kernel = dg.random_kernel(rng, CONFIG, stage)
        assert kernel.shape == (21, 21) and np.isfinite(kernel).all()
        assert abs(kernel.sum() - 1.0) < 1e-9
        np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-12)


def _torch_filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """BasicSR's filter2D: reflect pad by k//2, then a per-channel conv2d."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[:, None]
    k = kernel.shape[0]
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    weight = torch.from_numpy(kernel.astype(np.float32))[None, None]
    return F.conv2d(x, weight)[:, 0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("hw", [(64, 96), (15, 11)])
def test_filter2d_matches_torch_reflect_conv(hw):
    image = skimage.data.coffee()[: hw[0], : hw[1]].astype(np.float32) / 255.0
    kernel = dg.generalized_gaussian_kernel(21, 2.5, 0.7, 0.6, 0.8)[:, ::-1]  # asymmetric: catches a flipped kernel
    kernel = np.pad(kernel[:19, :17], ((1, 1), (2, 2)))  # odd, off-centre mass: catches shifts
    got = dg.filter2d(image, kernel)
    assert got.dtype == np.float32 and got.shape == image.shape
    assert np.abs(got - _torch_filter2d(image, kernel)).max() < 1e-5


def test_gaussian_noise_statistics():
    flat = np.full((256, 256, 3), 0.5, np.float32)
    color = dg.add_gaussian_noise(flat, 10.0, False, np.random.default_rng(0)) - 0.5
    gray = dg.add_gaussian_noise(flat, 10.0, True, np.random.default_rng(0)) - 0.5
    assert abs(color.std() / (10 / 255) - 1) < 0.01 and abs(color.mean()) < 1e-3
    assert abs(np.corrcoef(color[..., 0].ravel(), color[..., 1].ravel())[0, 1]) < 0.02
    assert abs(gray.std() / (10 / 255) - 1) < 0.02
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_poisson_noise_statistics():
    """Two grey levels -> BasicSR's photon scale vals = 2**ceil(log2(2)) = 2: noise std = scale * sqrt(v * 2) / 2."""
    image = np.full((256, 256, 3), 0.25, np.float32)
    image[128:] = 0.75
    scale = 0.05
    color = dg.add_poisson_noise(image, scale, False, np.random.default_rng(1)) - image
    for rows, level in ((slice(0, 128), 0.25), (slice(128, 256), 0.75)):
        expected_std = scale * math.sqrt(level * 2) / 2
        assert abs(color[rows].std() / expected_std - 1) < 0.02
        assert abs(color[rows].mean()) < 0.02 * expected_std + 1e-4
    gray = dg.add_poisson_noise(image, scale, True, np.random.default_rng(1)) - image
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    luma = float(np.float32(0.25) * dg.GRAY_WEIGHTS.sum())  # the luma of a grey pixel, rounded to 8 bits below
    luma_q = round(luma * 255) / 255
    assert abs(gray[:128].std() / (scale * math.sqrt(luma_q * 2) / 2) - 1) < 0.03


def test_jpeg_quality_effect(astronaut):
    image = astronaut.astype(np.float32) / 255.0
    errors = [np.abs(dg.jpeg_compress(image, q) - image).mean() for q in (30, 50, 70, 95)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.01 < errors[0] < 0.05
    with pytest.raises(ValueError, match="quality"):
        dg.jpeg_compress(image, 0)


def test_plan_frequencies_follow_the_config():
    rng = np.random.default_rng(0)
    plans = [dg.sample_plan(rng, CONFIG) for _ in range(3000)]

    def rate(predicate):
        return np.mean([predicate(p) for p in plans])

    tolerance = 0.03  # ~3.5 binomial standard deviations at p = 0.5, n = 3000
    for stage, probs in (("stage1", (0.2, 0.7, 0.1)), ("stage2", (0.3, 0.4, 0.3))):
        draws = [getattr(p, stage) for p in plans]
        for direction, prob in zip(("up", "down", "keep"), probs):
            assert abs(np.mean([d.resize.direction == direction for d in draws]) - prob) < tolerance
        assert abs(np.mean([d.noise.kind == "gaussian" for d in draws]) - 0.5) < tolerance
        assert abs(np.mean([d.noise.gray for d in draws]) - 0.4) < tolerance
    assert rate(lambda p: p.stage1.kernel is not None) == 1.0
    assert abs(rate(lambda p: p.stage2.kernel is not None) - 0.8) < tolerance
    assert abs(rate(lambda p: p.final_sinc is not None) - 0.8) < tolerance
    assert abs(rate(lambda p: p.jpeg_first) - 0.5) < tolerance
    assert abs(rate(lambda p: p.final_mode == "bicubic") - 1 / 3) < tolerance
    s1 = [p.stage1 for p in plans]
    assert all(0.15 <= s.resize.factor <= 1.5 and 30 <= s.jpeg_quality <= 95 for s in s1)
    assert all(1 <= s.noise.strength <= 30 for s in s1 if s.noise.kind == "gaussian")
    assert all(0.05 <= p.stage2.noise.strength <= 2.5 for p in plans if p.stage2.noise.kind == "poisson")


def _torch_feed_data(hr: np.ndarray, plan: dg.DegradationPlan, scale: int) -> np.ndarray:
    """Real-ESRGAN's `feed_data` transcribed with torch ops, taking its random draws from `plan`. Noise and JPEG are
    the module's own (torch's RNG and DiffJPEG cannot be matched), so this checks the order, sizes and resizes."""

    def to_t(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]

    def to_np(t):
        return t[0].numpy().transpose(1, 2, 0)

    def blur(t, kernel):
        return to_t(_torch_filter2d(to_np(t), kernel))

    def noise(t, draw):
        return to_t(dg.apply_noise(to_np(t), draw))

    def jpeg(t, quality):
        return to_t(dg.jpeg_compress(to_np(torch.clamp(t, 0, 1)), quality))

    def resize_back_and_sinc(t):
        t = F.interpolate(t, size=(ori_h // scale, ori_w // scale), mode=plan.final_mode)
        return t if plan.final_sinc is None else blur(t, plan.final_sinc)

    out = to_t(hr)
    ori_h, ori_w = out.shape[2:]
    s1, s2 = plan.stage1, plan.stage2
    out = blur(out, s1.kernel)
    out = F.interpolate(out, scale_factor=s1.resize.factor, mode=s1.resize.mode)
    out = jpeg(noise(out, s1.noise), s1.jpeg_quality)
    if s2.kernel is not None:
        out = blur(out, s2.kernel)
    size = (int(ori_h / scale * s2.resize.factor), int(ori_w / scale * s2.resize.factor))
    out = noise(F.interpolate(out, size=size, mode=s2.resize.mode), s2.noise)
    if plan.jpeg_first:
        out = resize_back_and_sinc(jpeg(out, s2.jpeg_quality))
    else:
        out = jpeg(resize_back_and_sinc(out), s2.jpeg_quality)
    return to_np(torch.clamp((out * 255.0).round(), 0, 255)).astype(np.uint8)


def _gaussian_noise_only(plan: dg.DegradationPlan) -> dg.DegradationPlan:
    """NumPy's Poisson sampler consumes a varying number of uniforms, so one flipped 8-bit level reshuffles the rest
    of its field: Poisson draws become Gaussian ones (a fixed field per seed and shape) for this comparison. Some noise
    must stay: after a JPEG the image is 8-bit again and an area average lands exactly on half levels, where float32
    rounding would decide the next JPEG's input."""

    def gaussian(draw: dg.NoiseDraw) -> dg.NoiseDraw:
        return draw if draw.kind == "gaussian" else dataclasses.replace(draw, kind="gaussian", strength=2.0)

    return dataclasses.replace(
        plan,
        stage1=dataclasses.replace(plan.stage1, noise=gaussian(plan.stage1.noise)),
        stage2=dataclasses.replace(plan.stage2, noise=gaussian(plan.stage2.noise)),
    )


def test_pipeline_matches_torch_transcription_of_feed_data(astronaut):
    # A sub-level dither: with an 8-bit input, a near-identity kernel and a 2-pixel area average land exactly on
    # half levels, where float32 noise decides the rounding before JPEG.
    dither = np.random.default_rng(0).uniform(0.1, 0.4, astronaut.shape)
    image = ((astronaut + dither) / 256.0).astype(np.float32)
    seen, exact = set(), 0
    for seed in range(12):
        plan = _gaussian_noise_only(dg.sample_plan(np.random.default_rng(seed), CONFIG))
        seen.add((plan.jpeg_first, plan.stage1.resize.mode))
        expected = _torch_feed_data(image, plan, CONFIG.scale).astype(np.int16)
        got = dg.to_uint8(dg.apply_plan(image, plan, CONFIG)).astype(np.int16)
        assert got.shape == expected.shape == (64, 64, 3)
        # Resize/blur agree to ~1e-6; a rare 8-bit level flipped by that before a JPEG moves pixels of its block a
        # little. A wrong order, size or mode would move the whole image by several levels.
        diff = np.abs(got - expected)
        assert diff.mean() < 0.1 and diff.max() <= 8, (seed, diff.mean(), diff.max())
        exact += int(diff.max() == 0)
    assert exact >= 6, exact
    assert len(seen) == 6  # both final orders with each first-stage resize mode


def test_same_seed_same_bytes_different_seed_differs(astronaut):
    first = dg.degrade(astronaut, 123)
    assert first.tobytes() == dg.degrade(astronaut.copy(), 123).tobytes()
    others = [dg.degrade(astronaut, seed) for seed in (124, 125)]
    assert all(o.tobytes() != first.tobytes() for o in others)


def test_plan_depends_on_the_seed_only():
    a, b = (dg.sample_plan(np.random.default_rng(7), CONFIG) for _ in range(2))
    assert a.stage1.resize == b.stage1.resize and a.stage2.noise == b.stage2.noise
    np.testing.assert_array_equal(a.stage1.kernel, b.stage1.kernel)


@pytest.mark.parametrize(
    "name,hw", [("astronaut", (64, 64)), ("coffee", (96, 128)), ("chelsea", (256, 256)), ("coffee", (16, 20))]
)
def test_output_size_dtype_and_content(name, hw):
    hr = getattr(skimage.data, name)()[: hw[0], : hw[1]]
    reference = resize(hr.astype(np.float32) / 255.0, (hw[0] // 4, hw[1] // 4), "area")
    correlations = []
    for seed in range(4):
        lr = dg.degrade(hr, seed)
        assert lr.shape == (hw[0] // 4, hw[1] // 4, 3) and lr.dtype == np.uint8
        correlations.append(np.corrcoef(lr.ravel().astype(np.float64), reference.ravel())[0, 1])
    if min(hw) >= 64:  # the LR still shows the HR scene (heavy noise lowers but does not destroy correlation)
        assert np.mean(correlations) > 0.7, correlations


def test_float_input_matches_uint8_input(astronaut):
    from_float = dg.degrade(astronaut.astype(np.float64) / 255.0, 5).astype(np.int16)
    from_uint8 = dg.degrade(astronaut, 5).astype(np.int16)
    assert np.abs(from_float - from_uint8).mean() < 0.05


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((66, 64, 3), np.uint8), "multiples of scale=4, got 66x64"),
        (np.zeros((64, 64, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((64, 64), np.uint8), r"\(H, W, 3\)"),
        (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
        (np.full((64, 64, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((64, 64, 3), np.int32), "dtype"),
        (np.zeros((64, 64, 3), np.uint16), "dtype"),
        (np.zeros((12, 64, 3), np.uint8), ">= 16"),
    ],
)
def test_bad_inputs_raise(image, match):
    with pytest.raises(ValueError, match=match):
        dg.degrade(image, 0)


def test_non_array_input_raises():
    with pytest.raises(TypeError, match="numpy array"):
        dg.degrade([[[0, 0, 0]]], 0)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"kernel_probs": (0.5, 0.25, 0.12, 0.03, 0.12, 0.03)}, "kernel_probs"),
        ({"kernel_types": ("iso", "box"), "kernel_probs": (0.5, 0.5)}, "kernel_types"),
        ({"blur_sigma": (3.0, 0.2)}, "blur_sigma"),
        ({"betag_range": (1.5, 4.0)}, "betag_range"),
        ({"resize_range": (0.3, 0.9)}, "resize_range"),
        ({"resize_probs": (0.3, 0.3, 0.3)}, "resize_probs"),
        ({"gray_noise_prob": 1.5}, "gray_noise_prob"),
        ({"jpeg_range": (30.0, 120.0)}, "jpeg_range"),
    ],
)
def test_stage_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dg.StageConfig(**change)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"scale": 0}, "scale"),
        ({"kernel_sizes": (7, 8)}, "kernel_sizes"),
        ({"resize_modes": ("area", "nearest")}, "resize_modes"),
        ({"final_sinc_prob": -0.1}, "final_sinc_prob"),
        ({"final_sinc_cutoff": (1.0, 4.0)}, "final_sinc_cutoff"),
    ],
)
def test_degradation_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **change)


def test_defaults_are_realesrgan_x4plus():
    assert CONFIG.stage2.blur_prob == 0.8 and CONFIG.stage2.blur_sigma == (0.2, 1.5)
    assert CONFIG.stage2.resize_probs == (0.3, 0.4, 0.3) and CONFIG.stage2.resize_range == (0.3, 1.2)
    assert CONFIG.stage2.noise_range == (1, 25) and CONFIG.stage2.poisson_scale_range == (0.05, 2.5)
    assert CONFIG.stage1.noise_range == (1, 30) and CONFIG.stage1.poisson_scale_range == (0.05, 3)
    assert CONFIG.kernel_sizes == tuple(range(7, 22, 2)) and CONFIG.final_sinc_prob == 0.8


def test_unknown_noise_kind_raises():
    with pytest.raises(ValueError, match="speckle"):
        dg.apply_noise(np.zeros((4, 4, 3), np.float32), dg.NoiseDraw("speckle", 1.0, False, 0))
