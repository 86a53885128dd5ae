"""Training pairs: random HR crops of `gt_size` from a set of photos -> Real-ESRGAN degradation -> LR.

Sample `i` is a pure function of `(config, photo names and sizes, i)`: a trainer that resumes at step `s` asks for
indices from `s * batch_size` on and sees exactly the pairs an uninterrupted run would have seen, and the latent cache
can build any subset of samples in any order. Indices run over epochs of `len(photos) * crops_per_image` samples;
within an epoch every photo gives `crops_per_image` crops, in an order shuffled per epoch, so consecutive samples come
from different photos.

Photos smaller than `gt_size` on either side are skipped, with a message naming them. Upscaling them instead would
make "HR" crops whose fine detail is interpolation, which is exactly the blur the SR model must learn to undo.

Evaluation sets come as folders of LR/HR pairs (`paired_folders`): the names are matched and the sizes checked before
any pixel is decoded, and nothing is skipped, since a test set with a missing image changes the metric.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from foa_jax.data.degrade import DegradationConfig, degrade, min_hr_side
from foa_jax.data.images import image_size, list_images, read_image, scan_folder

Report = Callable[[str], None]


@dataclass(frozen=True)
class DataConfig:
    """What defines the training pairs; a latent cache records it and refuses to mix pairs of different configs.

    `token_factor` is the VAE's pixels per token (`vae.VAEConfig.token_factor`, 16 for every FLUX.2-shaped preset):
    HR crops must tile into whole tokens. The scale is the degradation's (`degradation.scale`), kept in one place.
    """

    gt_size: int = 512  # the paper's crop at full scale; the tiny preset uses 256
    crops_per_image: int = 1  # crops per photo per epoch
    hflip: bool = False  # mirror half of the crops (seeded per sample): twice the views of a small photo set
    seed: int = 0
    token_factor: int = 16
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def __post_init__(self):
        name = type(self).__name__
        for key, low in (("gt_size", 1), ("crops_per_image", 1), ("seed", 0), ("token_factor", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}.{key}: expected an int >= {low}, got {value!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"{name}.hflip: expected a bool, got {self.hflip!r}")
        if not isinstance(self.degradation, DegradationConfig):
            raise TypeError(f"{name}.degradation: expected a DegradationConfig, got {type(self.degradation).__name__}")
        multiple = math.lcm(self.scale, self.token_factor)
        if self.gt_size % multiple:
            raise ValueError(f"{name}.gt_size: expected a multiple of {multiple} (scale {self.scale} and token factor "
                             f"{self.token_factor}), got {self.gt_size}")
        smallest = min_hr_side(self.degradation)
        if self.gt_size < smallest:
            raise ValueError(f"{name}.gt_size: the degradation needs HR sides >= {smallest}, got {self.gt_size}")

    @property
    def scale(self) -> int:
        return self.degradation.scale

    @property
    def lr_size(self) -> int:
        return self.gt_size // self.scale

    @classmethod
    def preset(cls, name: str) -> DataConfig:
        if name not in PRESETS:
            raise ValueError(f"DataConfig.preset: unknown preset {name!r}, expected one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_json(self) -> dict:
        """Plain JSON types (tuples become lists), so identities compare equal after a round trip through a file."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS = {
    "full": DataConfig(),
    # 256-px crops keep FLUX.2's 16x layout at 256 tokens and are large enough for NIQE.
    "tiny": DataConfig(gt_size=256),
}


# ----------------------------------------------------------------------------------------------------------------------
# Photo sources: a Mapping name -> uint8 RGB image. A dict of arrays works as is; folders are read on demand.


class FolderPhotos(Mapping):
    """The readable images of some folders, decoded when asked for; names are `folder name/file name`.

    Every file is decoded once at construction (`scan_folder`) so bad files are reported by name up front and left
    out, instead of stopping a run hours in. Sizes come from the headers, so the dataset can skip small photos without
    keeping pixels in memory.
    """

    def __init__(self, folders: list[str | Path], report: Report = print):
        self._paths: dict[str, Path] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        for folder in map(Path, folders):
            good, bad = scan_folder(folder)
            for path, reason in bad:
                report(f"skipping unreadable image {path}: {reason}")
            for path in good:
                name = f"{folder.name}/{path.name}"
                if name in self._paths:
                    raise ValueError(f"FolderPhotos: {path} and {self._paths[name]} share the name {name!r}; "
                                     f"give the folders different names")
                self._paths[name] = path
                self._sizes[name] = image_size(path)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._paths:
            raise KeyError(f"FolderPhotos: no photo named {name!r}")
        return read_image(self._paths[name])

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def size(self, name: str) -> tuple[int, int]:
        return self._sizes[name]


def _photo_size(photos: Mapping[str, np.ndarray], name: str) -> tuple[int, int]:
    if isinstance(photos, FolderPhotos):
        return photos.size(name)
    image = photos[name]
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"photo {name!r}: expected a uint8 (H, W, 3) array, got {description}")
    return image.shape[:2]


# ----------------------------------------------------------------------------------------------------------------------
# Training pairs


class CropSpec(NamedTuple):
    """Where sample `index` comes from: photo, crop corner, the degradation's seed and whether it is mirrored."""

    index: int
    source: str
    top: int
    left: int
    degradation_seed: int
    flip: bool = False


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
    order = np.random.default_rng([seed, 0, epoch]).permutation(length)
    order.flags.writeable = False
    return order


class Dataset:
    """Deterministic, indexable training pairs `(lr uint8 (s, s, 3), hr uint8 (S, S, 3))`, S = gt_size, s = S/scale."""

    def __init__(self, config: DataConfig, photos: Mapping[str, np.ndarray], report: Report = print):
        self.config = config
        self.photos = photos
        sizes = {name: _photo_size(photos, name) for name in sorted(photos)}
        small = [name for name, (h, w) in sizes.items() if min(h, w) < config.gt_size]
        if small:
            listed = ", ".join(f"{name} ({sizes[name][0]}x{sizes[name][1]})" for name in small)
            report(f"skipping {len(small)} photos smaller than gt_size={config.gt_size}: {listed}")
        self.sizes = {name: size for name, size in sizes.items() if name not in small}
        self.names = list(self.sizes)
        if not self.names:
            raise ValueError(f"Dataset: no photo has both sides >= gt_size={config.gt_size} "
                             f"(got {len(sizes)} photos: {sizes})")

    @property
    def epoch_length(self) -> int:
        return len(self.names) * self.config.crops_per_image

    def fingerprint(self) -> str:
        """Hash of the photo names and sizes the samples are drawn from (pixel contents are not hashed)."""
        listing = json.dumps([[name, *self.sizes[name]] for name in self.names])
        return hashlib.sha256(listing.encode()).hexdigest()[:16]

    def spec(self, index: int) -> CropSpec:
        if index < 0:
            raise ValueError(f"Dataset.spec: index must be >= 0, got {index}")
        epoch, position = divmod(index, self.epoch_length)
        slot = int(_epoch_order(self.config.seed, epoch, self.epoch_length)[position])
        name = self.names[slot // self.config.crops_per_image]
        h, w = self.sizes[name]
        rng = np.random.default_rng([self.config.seed, 1, index])
        top = int(rng.integers(0, h - self.config.gt_size + 1))
        left = int(rng.integers(0, w - self.config.gt_size + 1))
        degradation_seed = int(rng.integers(0, 2**63))
        flip = self.config.hflip and bool(rng.integers(0, 2))  # drawn last: specs without flips stay as they were
        return CropSpec(index, name, top, left, degradation_seed, flip)

    def hr(self, index: int, spec: CropSpec | None = None) -> np.ndarray:
        """The HR crop of sample `index` alone (no degradation): what autoencoder training needs."""
        spec = spec or self.spec(index)
        size = self.config.gt_size
        crop = self.photos[spec.source][spec.top:spec.top + size, spec.left:spec.left + size]
        return np.ascontiguousarray(crop[:, ::-1] if spec.flip else crop)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec(index)
        hr = self.hr(index, spec)
        return degrade(hr, spec.degradation_seed, self.config.degradation), hr

    def iterate(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pairs `start, start + 1, ...` without end."""
        index = start
        while True:
            yield self.pair(index)
            index += 1

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stacked `(lr (B, s, s, 3), hr (B, S, S, 3))` batches of consecutive samples from index `start` on."""
        if batch_size < 1:
            raise ValueError(f"Dataset.batches: batch_size must be >= 1, got {batch_size}")
        index = start
        while True:
            lrs, hrs = zip(*(self.pair(i) for i in range(index, index + batch_size)))
            yield np.stack(lrs), np.stack(hrs)
            index += batch_size


def pairs(config: DataConfig, photos: Mapping[str, np.ndarray], count: int,
          report: Report = print) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `count` training pairs as a list."""
    dataset = Dataset(config, photos, report)
    return [dataset.pair(i) for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation pairs from folders


class EvalPair(NamedTuple):
    name: str
    lr: np.ndarray
    hr: np.ndarray


def _keyed(paths: list[Path], suffix: str, side: str) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    for path in paths:
        key = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if key in keyed:
            raise ValueError(f"paired_folders: {side} files {keyed[key].name} and {path.name} both match the name "
                             f"{key!r}")
        keyed[key] = path
    return keyed


def paired_folders(lr_dir: str | Path, hr_dir: str | Path, scale: int = 4, lr_suffix: str = "",
                   hr_suffix: str = "") -> list[EvalPair]:
    """LR/HR image pairs matched by file stem (minus `lr_suffix`/`hr_suffix`, e.g. "_LR4", "_HR"), sorted by name.

    Unmatched names and LR * scale != HR sizes are errors listing every offender, raised from names and headers
    before any image is decoded.
    """
    lr = _keyed(list_images(lr_dir), lr_suffix, "LR")
    hr = _keyed(list_images(hr_dir), hr_suffix, "HR")
    if not lr or not hr:
        raise ValueError(f"paired_folders: no images in {lr_dir if not lr else hr_dir}")
    only_lr, only_hr = sorted(set(lr) - set(hr)), sorted(set(hr) - set(lr))
    if only_lr or only_hr:
        raise ValueError(f"paired_folders: unmatched names; only in LR {lr_dir}: {only_lr}; "
                         f"only in HR {hr_dir}: {only_hr}")
    names = sorted(lr)
    mismatched = []
    for name in names:
        (lh, lw), (hh, hw) = image_size(lr[name]), image_size(hr[name])
        if (lh * scale, lw * scale) != (hh, hw):
            mismatched.append(f"{lr[name].name} {lh}x{lw} (x{scale} = {lh * scale}x{lw * scale}) vs "
                              f"{hr[name].name} {hh}x{hw}")
    if mismatched:
        raise ValueError("paired_folders: LR x scale != HR size for " + "; ".join(mismatched))
    return [EvalPair(name, read_image(lr[name]), read_image(hr[name])) for name in names]
