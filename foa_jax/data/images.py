"""Reading image files as uint8 RGB, whatever their mode, and finding the bad ones in a folder before a run needs them.

Every file becomes an (H, W, 3) uint8 RGB array, upright:
- EXIF orientation is applied (`ImageOps.exif_transpose`): phone photos store pixels sideways plus a tag, and a crop
  of the sideways pixels would train on rotated scenes.
- Transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour, 16-bit grey with tRNS) is composited on white:
  `round(c * a + 255 * (1 - a))`, `a` in [0, 1]. Dropping the alpha instead would expose whatever colour the encoder
  left under fully transparent pixels (often black, sometimes garbage); white is what a viewer shows.
- 16-bit greyscale (`I;16*`, and `I`, which Pillow uses for 16-bit PGM) is scaled, not clipped:
  `round(v * 255 / 65535)`. Pillow's own `convert("L")` clips at 255, turning most of a 16-bit image white. `I`
  values outside [0, 65535] are an error. 16-bit RGB/RGBA PNGs reach us through Pillow's decoder as the high byte,
  `floor(v / 256)` (libpng's `strip_16`), which differs from rounding by at most one level.
- Float (`F`) images are taken as [0, 1]; values outside it are an error, since any rescaling would be a guess.
- Bilevel, palette, CMYK, YCbCr, HSV: Pillow's conversion to RGB. CMYK uses Pillow's naive formula, and embedded ICC
  profiles are not applied (pixels are taken as sRGB).
- Multi-frame files (GIF, TIFF) give their first frame.
A file Pillow cannot identify or decode (corrupt, truncated, empty, unsupported mode) raises `BadImage`, which names
the file and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ORIENTATION_TAG = 0x0112
SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90: width and height swap


class BadImage(ValueError):
    """An image file that cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _open_upright(path: Path) -> Image.Image:
    """Decode the whole file (so truncation shows up here, not later) and apply its EXIF orientation."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception as err:  # Pillow raises many types on corrupt input (OSError, SyntaxError, struct.error, ...)
        raise BadImage(path, _describe(err)) from err


def _scale_16bit(values: np.ndarray, path: Path, mode: str) -> np.ndarray:
    values = values.astype(np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise BadImage(path, f"mode {mode} values span [{values.min()}, {values.max()}], outside the 16-bit range")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(values: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise BadImage(path, f"mode F values span [{np.nanmin(values)}, {np.nanmax(values)}], expected [0, 1]")
    return np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour (H, W, 3) and alpha (H, W) -> uint8 RGB over a white background, rounded."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(img)
        grey = _grey_to_rgb(_scale_16bit(raw, path, mode))
        if "transparency" in img.info:
            return composite_on_white(grey, np.where(raw == img.info["transparency"], 0, 255))
        return grey
    if mode == "F":
        return _grey_to_rgb(_scale_float(np.asarray(img), path))
    try:
        if _has_alpha(img):
            rgba = np.asarray(img.convert("RGBA"))
            return composite_on_white(rgba[..., :3], rgba[..., 3])
        return np.asarray(img.convert("RGB"))
    except ValueError as err:  # modes Pillow cannot convert to RGB (e.g. LAB without a colour-management profile)
        raise BadImage(path, f"cannot convert mode {mode} to RGB ({err})") from err


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, upright; raises `BadImage` naming the file and the reason."""
    path = Path(path)
    image = _to_rgb(_open_upright(path), path)
    return np.ascontiguousarray(image, dtype=np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the upright image, from the header alone (no pixel decoding)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(ORIENTATION_TAG)
    except MemoryError:
        raise
    except Exception as err:
        raise BadImage(path, _describe(err)) from err
    return (width, height) if orientation in SWAPPED_ORIENTATIONS else (height, width)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_folder(
    folder: str | Path, progress: Callable[[int, int], None] | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(readable images, [(bad image, reason)]) of `folder`, each file fully decoded once.

    Decoding the whole file is what catches truncation: a header read accepts a JPEG cut in half. A run scans first,
    reports the bad files by name and goes on with the good ones.
    """
    paths = list_images(folder)
    good, bad = [], []
    for done, path in enumerate(paths, 1):
        try:
            read_image(path)
            good.append(path)
        except BadImage as err:
            bad.append((path, err.reason))
        if progress is not None:
            progress(done, len(paths))
    return good, bad
