"""foa_jax.data.resize against torch F.interpolate (align_corners=False, no antialias), on a real photo."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from foa_jax.data.resize import bicubic_upsample, cubic_convolution, resize, scaled_size


def _torch_interpolate(image: np.ndarray, mode: str, **kwargs) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    return F.interpolate(chw, mode=mode, **kwargs)[0].numpy().transpose(1, 2, 0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.chelsea()[:75, :113].astype(np.float32) / 255.0  # odd sides exercise every border rule


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(18, 28), (11, 113), (75, 113), (150, 226), (100, 301), (1, 2)])
def test_resize_to_size_matches_torch(photo, mode, size):
    expected = _torch_interpolate(photo, mode, size=size)
    got = resize(photo, size, mode)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("factor", [0.15, 0.37, 0.999, 1.0, 1.23, 1.5])
def test_resize_by_scale_factor_matches_torch(photo, mode, factor):
    """Real-ESRGAN's first resize passes scale_factor: torch then maps centres with 1/f, not in/out."""
    expected = _torch_interpolate(photo, mode, scale_factor=factor)
    got = resize(photo, scaled_size(photo.shape[:2], factor), mode, scale_factor=factor)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5


def test_scale_factor_changes_the_sampling_grid(photo):
    """The two torch calls really differ, so passing the factor is not a no-op (guards the test above)."""
    size = scaled_size(photo.shape[:2], 0.37)
    assert np.abs(resize(photo, size, "bicubic", 0.37) - resize(photo, size, "bicubic")).max() > 1e-3


def test_cubic_convolution_is_a_partition_of_unity():
    """Keys' kernel at the four taps of any fractional offset sums to 1 (flat images stay flat)."""
    t = np.linspace(0.0, 1.0, 101)
    total = sum(cubic_convolution(t - offset) for offset in (-1, 0, 1, 2))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_bicubic_upsample_matches_torch_and_clips():
    lr = skimage.data.astronaut()[100:132, 200:248]
    expected = np.clip(_torch_interpolate(lr.astype(np.float32) / 255.0, "bicubic", size=(128, 192)), 0, 1)
    got = bicubic_upsample(lr, (128, 192))
    assert got.dtype == np.float32 and got.shape == (128, 192, 3)
    assert got.min() >= 0.0 and got.max() <= 1.0
    assert np.abs(got - expected).max() < 1e-5


def test_bad_inputs_raise():
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="mode"):
        resize(image, (4, 4), "nearest")
    with pytest.raises(ValueError, match="float HWC"):
        resize(image.astype(np.uint8), (4, 4), "area")
    with pytest.raises(ValueError, match="n_out=0"):
        resize(image, (0, 4), "bilinear")
    with pytest.raises(ValueError, match="dtype"):
        bicubic_upsample(image.astype(np.int32), (16, 16))
