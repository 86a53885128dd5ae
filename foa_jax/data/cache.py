"""On-disk latent cache for SFT and DPO (docs/method.md "Data": each training sample is cached as FLUX.2 VAE latents).

Per sample `i` of a `Dataset`, one file `samples/{i:08d}.npz` holds
- `z_hr`  (N, C) float32: tokens of the HR crop,
- `c`     (N, C) float32: tokens of the LR image bicubic-upsampled to HR size (the reference tokens),
- `hr`, `lr` uint8 images, if `store_images` (pixel losses and metrics need them; they dominate the size at full
  scale, where a trainer that only needs latents can leave them out),
- `index`, so a file in the wrong place is caught.
Tokens are computed by a caller-supplied `encode(images) -> tokens`, (B, H, W, 3) float32 in [0, 1] -> (B, N, C), so
this module knows nothing of the VAE; with ours it is `lambda x: vae.encode_tokens(params, config, 2 * x - 1)`, the
same arithmetic as `sr.condition`. The upsampled LR stays float (not rounded to 8 bits), as at inference. Tokens are
stored as float32 whatever the encoder's dtype (npz cannot hold bfloat16 without pickling).

`manifest.json` holds the cache's identity: data config, photo fingerprint (names and sizes), the encoder's
fingerprint (any string the caller derives from the VAE, e.g. `fingerprint(vae_params)`), whether images are stored,
and the token shape. Opening or extending a cache with another identity is an error listing every difference.
The sample count is not part of the identity: sample `i` depends only on the identity and `i`, so a build with a
larger count extends a cache.

Builds resume: every file is written to `<name>.tmp` and renamed into place, so a killed build leaves complete files
or none; on restart, each existing file is fully read (zip CRCs, keys, shapes, dtypes, index) and only the missing or
invalid ones are encoded. One builder per cache folder at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foa_jax.data.dataset import Dataset
from foa_jax.data.resize import bicubic_upsample

FORMAT = 1
MANIFEST = "manifest.json"
TOKEN_KEYS = ("z_hr", "c")
IMAGE_KEYS = ("hr", "lr")

Encode = Callable[[np.ndarray], Any]


class CorruptSample(ValueError):
    """A sample file that is missing, unreadable, or holds the wrong arrays."""


@dataclass(frozen=True)
class CacheIdentity:
    """Everything the cached arrays depend on; two caches with equal identities hold the same samples."""

    data: dict  # DataConfig.to_json()
    photos: str  # Dataset.fingerprint()
    encoder: str  # the caller's fingerprint of the encoder (VAE weights and config)
    store_images: bool
    format: int = FORMAT

    @classmethod
    def of(cls, dataset: Dataset, encoder: str, store_images: bool = True) -> CacheIdentity:
        return cls(dataset.config.to_json(), dataset.fingerprint(), encoder, store_images)

    def differences(self, other: CacheIdentity) -> list[str]:
        """`field: this != other` for every leaf (dotted path) that differs."""
        mine, theirs = _flatten(asdict(self)), _flatten(asdict(other))
        return [f"{key}: {mine.get(key, '<absent>')!r} != {theirs.get(key, '<absent>')!r}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def fingerprint(tree: Any) -> str:
    """Hash of a nested dict of arrays (names, dtypes, shapes, bytes): an encoder identity for `build`."""
    digest = hashlib.sha256()
    for path, leaf in sorted(_flatten(tree).items()):
        array = np.asarray(leaf)
        digest.update(f"{path}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(root: Path, identity: CacheIdentity, count: int, tokens: list[int] | None, complete: bool):
    manifest = {"identity": asdict(identity), "count": count, "tokens": tokens, "complete": complete}
    _write_atomic(root / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no latent cache at {root}: {path} is missing "
                                f"(build it with foa_jax.data.cache.build)")
    manifest = json.loads(path.read_text())
    manifest["identity"] = CacheIdentity(**manifest["identity"])
    return manifest


def sample_path(root: Path, index: int) -> Path:
    return Path(root) / "samples" / f"{index:08d}.npz"


def _expected_shapes(identity: CacheIdentity, tokens: Sequence[int]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    shapes = {key: (tuple(tokens), np.dtype(np.float32)) for key in TOKEN_KEYS}
    shapes["index"] = ((), np.dtype(np.int64))
    if identity.store_images:
        gt = identity.data["gt_size"]
        lr = gt // identity.data["degradation"]["scale"]
        shapes["hr"] = ((gt, gt, 3), np.dtype(np.uint8))
        shapes["lr"] = ((lr, lr, 3), np.dtype(np.uint8))
    return shapes


def read_sample(path: Path, index: int, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """Every array of a sample file, fully read and checked against `shapes`; `CorruptSample` says what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError as err:
        raise CorruptSample(f"sample {index}: {path} is missing") from err
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise CorruptSample(f"sample {index}: cannot read {path} ({type(err).__name__}: {err})") from err
    if set(arrays) != set(shapes):
        raise CorruptSample(f"sample {index}: {path} holds {sorted(arrays)}, expected {sorted(shapes)}")
    for key, (shape, dtype) in shapes.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise CorruptSample(f"sample {index}: {path} {key} is {arrays[key].dtype} {arrays[key].shape}, "
                                f"expected {dtype} {shape}")
    if int(arrays["index"]) != index:
        raise CorruptSample(f"sample {index}: {path} holds sample {int(arrays['index'])}")
    return arrays


# ----------------------------------------------------------------------------------------------------------------------
# Building


def _check_identity(root: Path, manifest: dict, identity: CacheIdentity) -> None:
    differences = manifest["identity"].differences(identity)
    if differences:
        raise ValueError(f"latent cache {root} was built with a different identity (cache != requested): "
                         + "; ".join(differences) + ". Use another folder, or delete this one to rebuild it.")


def _encode_tokens(encode: Encode, images: np.ndarray, tokens_per_image: int, what: str) -> np.ndarray:
    tokens = np.asarray(encode(images), np.float32)
    if tokens.ndim != 3 or tokens.shape[:2] != (len(images), tokens_per_image):
        raise ValueError(f"encode({what} images {images.shape}) returned shape {tokens.shape}, expected "
                         f"({len(images)}, {tokens_per_image}, C)")
    return tokens


def build(root: str | Path, dataset: Dataset, count: int, encode: Encode, encoder: str, *,
          store_images: bool = True, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
          report: Callable[[str], None] = print) -> LatentCache:
    """Encode samples `0 .. count-1` of `dataset` into `root`, resuming whatever a previous build left.

    `encode` maps (B, H, W, 3) float32 images in [0, 1] to (B, N, C) tokens; `encoder` is its fingerprint.
    `progress(done, total)` is called after every batch, over the samples this call encodes.
    """
    if count < 1 or batch_size < 1:
        raise ValueError(f"cache.build: count and batch_size must be >= 1, got {count} and {batch_size}")
    root = Path(root)
    (root / "samples").mkdir(parents=True, exist_ok=True)
    identity = CacheIdentity.of(dataset, encoder, store_images)
    tokens_shape = None
    if (root / MANIFEST).exists():
        manifest = _read_manifest(root)
        _check_identity(root, manifest, identity)
        tokens_shape = manifest["tokens"]
    _write_manifest(root, identity, count, tokens_shape, complete=False)
    for stale in (root / "samples").glob("*.tmp"):
        stale.unlink()

    todo = []
    for index in range(count):
        path = sample_path(root, index)
        if not path.exists() or tokens_shape is None:
            todo.append(index)
            continue
        try:
            read_sample(path, index, _expected_shapes(identity, tokens_shape))
        except CorruptSample as err:
            report(f"redoing {err}")
            todo.append(index)
    report(f"latent cache {root}: {count - len(todo)} of {count} samples present, encoding {len(todo)}")

    gt = dataset.config.gt_size
    tokens_per_image = (gt // dataset.config.token_factor) ** 2
    for start in range(0, len(todo), batch_size):
        indices = todo[start:start + batch_size]
        lrs, hrs = zip(*(dataset.pair(i) for i in indices))
        z_hr = _encode_tokens(encode, np.stack(hrs).astype(np.float32) / 255.0, tokens_per_image, "HR")
        c = _encode_tokens(encode, np.stack([bicubic_upsample(lr, (gt, gt)) for lr in lrs]), tokens_per_image, "LR")
        if tokens_shape is None:
            tokens_shape = list(z_hr.shape[1:])
            _write_manifest(root, identity, count, tokens_shape, complete=False)
        if list(z_hr.shape[1:]) != tokens_shape or c.shape != z_hr.shape:
            raise ValueError(f"encode returned tokens of shape {z_hr.shape[1:]} (HR) and {c.shape[1:]} (LR); "
                             f"the cache at {root} holds {tuple(tokens_shape)}")
        for k, index in enumerate(indices):
            arrays = {"z_hr": z_hr[k], "c": c[k], "index": np.int64(index)}
            if store_images:
                arrays.update(hr=hrs[k], lr=lrs[k])
            _write_atomic(sample_path(root, index), lambda f, a=arrays: np.savez(f, **a))
        if progress is not None:
            progress(start + len(indices), len(todo))

    _write_manifest(root, identity, count, tokens_shape, complete=True)
    return LatentCache(root, identity)


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class LatentCache:
    """A complete cache, read sample by sample; `expected` (if given) must equal the identity it was built with."""

    def __init__(self, root: str | Path, expected: CacheIdentity | None = None):
        self.root = Path(root)
        manifest = _read_manifest(self.root)
        if expected is not None:
            _check_identity(self.root, manifest, expected)
        if not manifest["complete"]:
            raise ValueError(f"latent cache {self.root} is incomplete (a build was interrupted): run build again to "
                             f"finish it")
        self.identity: CacheIdentity = manifest["identity"]
        self.count: int = manifest["count"]
        self.tokens_shape = tuple(manifest["tokens"])
        self.shapes = _expected_shapes(self.identity, self.tokens_shape)

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(f"latent cache {self.root}: index {index} outside [0, {self.count})")
        return read_sample(sample_path(self.root, index), index, self.shapes)

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked arrays of the given samples: z_hr, c (B, N, C), index (B,), and hr, lr (B, H, W, 3) if stored."""
        samples = [self.sample(int(i)) for i in indices]
        return {key: np.stack([s[key] for s in samples]) for key in self.shapes}

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """`batch_size` distinct samples drawn uniformly by `rng`."""
        return self.batch(rng.choice(self.count, size=batch_size, replace=False))
