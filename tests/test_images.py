"""foa_jax.data.images: every image mode against a direct NumPy computation on the stored values, EXIF orientations
against NumPy flips/rotations of the raw decode, and bad files (corrupt, truncated, empty) reported by name."""

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from foa_jax.data import images
from foa_jax.data.images import BadImage, image_size, list_images, read_image, scan_folder


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A non-square colour crop, so a wrong rotation cannot go unnoticed."""
    return np.ascontiguousarray(skimage.data.astronaut()[100:124, 150:182])


def _white_composite(rgb, alpha):
    """Independent reference: Pillow's own alpha compositing over an opaque white image."""
    rgba = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def test_rgb_png_round_trips_exactly(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == photo.shape
    np.testing.assert_array_equal(out, photo)


def test_rgba_is_composited_on_white(tmp_path, photo):
    h, w = photo.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    a = alpha[..., None] / 255.0
    np.testing.assert_array_equal(out, np.rint(photo * a + 255 * (1 - a)).astype(np.uint8))
    assert np.abs(out.astype(int) - _white_composite(photo, alpha)).max() <= 1
    np.testing.assert_array_equal(out[:, 0], 255)  # fully transparent -> white, whatever colour lies beneath
    np.testing.assert_array_equal(out[:, -1], photo[:, -1])  # opaque -> the colour itself


def test_la_is_grey_composited_on_white(tmp_path, photo):
    grey = photo[..., 1]
    alpha = np.tile(np.linspace(0, 255, grey.shape[1]).round().astype(np.uint8), (grey.shape[0], 1))
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    expected = np.rint(grey * (alpha / 255.0) + 255 * (1 - alpha / 255.0)).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)


def test_greyscale_l_is_repeated_to_rgb(tmp_path, photo):
    grey = photo[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), np.repeat(grey[..., None], 3, axis=-1))


def test_bilevel_is_black_and_white(tmp_path, photo):
    bits = photo[..., 0] > 128
    Image.fromarray(bits).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "a.png")[..., 2], np.where(bits, 255, 0))


SIXTEEN_BIT = np.concatenate([np.arange(0, 65536, 97), [65535, 128, 129, 257 + 128]]).astype(np.uint16)


@pytest.mark.parametrize("suffix,mode", [(".png", "I;16"), (".pgm", "I"), (".tif", "I;16")])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, suffix, mode):
    values = SIXTEEN_BIT[: (len(SIXTEEN_BIT) // 8) * 8].reshape(8, -1)
    cv2.imwrite(str(tmp_path / f"a{suffix}"), values)
    assert Image.open(tmp_path / f"a{suffix}").mode == mode
    out = read_image(tmp_path / f"a{suffix}")
    expected = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    clipped = np.asarray(Image.open(tmp_path / f"a{suffix}").convert("L"))
    assert (clipped == 255).mean() > 0.9 and (expected == 255).mean() < 0.01  # what Pillow alone would have done


def test_16bit_grey_with_transparent_value(tmp_path):
    values = np.array([[0, 1000, 65535], [1000, 30000, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png", transparency=1000)
    out = read_image(tmp_path / "a.png")[..., 0]
    np.testing.assert_array_equal(out, [[0, 255, 255], [255, round(30000 * 255 / 65535), 255]])


def test_16bit_rgb_png_is_the_high_byte(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    values[0, 0] = (0, 65535, 257 * 100 + 200)
    cv2.imwrite(str(tmp_path / "a.png"), values[..., ::-1])
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, values >> 8)
    assert np.abs(out - np.round(values / 257.0)).max() <= 1


def test_float_image_in_unit_range_and_out_of_range(tmp_path):
    values = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    Image.fromarray(values, "F").save(tmp_path / "a.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif")[..., 1], np.rint(values.astype(np.float64) * 255))
    Image.fromarray(values * 3, "F").save(tmp_path / "b.tif")
    with pytest.raises(BadImage, match=r"b\.tif.*mode F"):
        read_image(tmp_path / "b.tif")


def test_palette_is_looked_up(tmp_path, photo):
    indexed = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    indexed.save(tmp_path / "a.png")
    stored = Image.open(tmp_path / "a.png")
    palette = np.array(stored.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), palette[np.asarray(stored)])


def test_palette_transparency_becomes_white(tmp_path, photo):
    indexed = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    indices = np.asarray(indexed)
    transparent = int(indices[0, 0])
    indexed.save(tmp_path / "a.png", transparency=transparent)
    palette = np.array(indexed.getpalette(), np.uint8).reshape(-1, 3)
    expected = np.where((indices == transparent)[..., None], 255, palette[indices])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), expected)


def test_cmyk_jpeg_uses_the_naive_formula(tmp_path, photo):
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "a.jpg", quality=95)
    stored = Image.open(tmp_path / "a.jpg")
    assert stored.mode == "CMYK"
    cmyk = np.asarray(stored).astype(np.float64)
    expected = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255.0
    assert np.abs(read_image(tmp_path / "a.jpg") - expected).max() <= 1.0


# EXIF orientation tag -> what a viewer does to the stored pixels (TIFF/EXIF spec), written out in NumPy.
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, photo, orientation):
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    Image.fromarray(photo).save(tmp_path / "a.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    out = read_image(tmp_path / "a.jpg")
    np.testing.assert_array_equal(out, ORIENTATIONS[orientation](stored))
    assert image_size(tmp_path / "a.jpg") == out.shape[:2]


def _noisy_bytes(tmp_path, suffix):
    noisy = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / f"whole{suffix}")
    return (tmp_path / f"whole{suffix}").read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_raise_naming_the_file(tmp_path, suffix):
    data = _noisy_bytes(tmp_path, suffix)
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(BadImage) as err:
        read_image(tmp_path / f"cut{suffix}")
    assert err.value.path == tmp_path / f"cut{suffix}" and f"cut{suffix}" in str(err.value)
    assert "truncated" in err.value.reason or "broken" in err.value.reason


def test_corrupt_and_empty_files_raise(tmp_path):
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("noise.png", "empty.jpg"):
        with pytest.raises(BadImage, match=name):
            read_image(tmp_path / name)
    with pytest.raises(BadImage, match="noise.png"):
        image_size(tmp_path / "noise.png")


def test_scan_folder_reports_bad_files_and_keeps_going(tmp_path, photo):
    data = _noisy_bytes(tmp_path, ".jpg")
    (tmp_path / "whole.jpg").unlink()
    Image.fromarray(photo).save(tmp_path / "b_good.png")
    Image.fromarray(photo).save(tmp_path / "D_GOOD.JPG")
    (tmp_path / "a_cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()
    calls = []
    good, bad = scan_folder(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert list_images(tmp_path) == sorted(tmp_path / n for n in ("D_GOOD.JPG", "a_cut.jpg", "b_good.png",
                                                                  "c_corrupt.png"))
    assert good == [tmp_path / "D_GOOD.JPG", tmp_path / "b_good.png"]
    assert [path.name for path, _ in bad] == ["a_cut.jpg", "c_corrupt.png"]
    assert all(reason for _, reason in bad)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
