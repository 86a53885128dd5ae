"""The files the stages hand each other, each written and read here only: mined candidates and preference pairs.

Both are `.npz` archives written under a temporary name and renamed into place (a killed writer leaves the old file or
none), holding their arrays, a JSON `meta` and `sha256`, the hash of every array's name, dtype, shape and bytes.
Reading recomputes the hash: a truncated, zeroed or edited file is a `CorruptArtifact` naming the file, never data.
Weights folders have their own owner, `ports.weights`.

    candidates/{i:05d}.npz   one per mined LR input: latents (K', N, C) float32 final packed latents, cond (N, C) LR
                             reference tokens, images (K', H, W, 3) uint8 decoded candidates, lr, hr uint8, seeds (K',)
                             int64, scores (K', M) float64 raw metric values; meta: metric names
    pairs_{profile}.npz      input_index, winner, loser, gap, seed_w, seed_l, z_w, z_l, cond (P, N, C); meta: preset,
                             model configs, the Flux2SR fingerprint, metric sets, reward config, K, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

_HASH, _META = "sha256", "meta"


class CorruptArtifact(ValueError):
    """A stage file that is unreadable, incomplete or does not match the hash written with it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def content_hash(arrays: Mapping[str, np.ndarray], meta: Mapping) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save(path, arrays: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    """Write `arrays` and `meta` (JSON-able) with their hash, atomically."""
    path = Path(path)
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    if _HASH in arrays or _META in arrays:
        raise ValueError(f"{path}: array names {_HASH!r} and {_META!r} are reserved")
    meta = json.loads(json.dumps(meta, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, **{_META: np.asarray(json.dumps(meta)), _HASH: np.asarray(content_hash(arrays, meta))})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    """`(arrays, meta)` of a file `save` wrote, after checking its hash."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CorruptArtifact(path, f"unreadable ({type(err).__name__}: {err}); delete it to have it made again") \
            from err
    if _HASH not in arrays or _META not in arrays:
        raise CorruptArtifact(path, f"no {_HASH!r}/{_META!r} entries: not written by experiments.artifacts")
    stored_hash, meta = str(arrays.pop(_HASH)), json.loads(str(arrays.pop(_META)))
    if content_hash(arrays, meta) != stored_hash:
        raise CorruptArtifact(path, "its contents do not match the hash written with them (damaged or edited)")
    return arrays, meta


def is_valid(path) -> bool:
    """Whether `path` exists and passes `load`'s checks: resume re-does a unit of work whose file does not."""
    try:
        load(path)
    except (FileNotFoundError, CorruptArtifact):
        return False
    return True


# ------------------------------------------------------------------------------------------------------ candidates


def candidate_path(out: Path, index: int) -> Path:
    return Path(out) / "candidates" / f"{index:05d}.npz"


def save_candidates(out: Path, index: int, *, latents, cond, images, lr, hr, seeds, scores, metric_names) -> Path:
    return save(candidate_path(out, index), {"latents": latents, "cond": cond, "images": images, "lr": lr, "hr": hr,
                                             "seeds": np.asarray(seeds, np.int64), "scores": scores},
                {"metric_names": list(metric_names), "input": index})


def load_candidates(out: Path, index: int) -> dict[str, np.ndarray]:
    arrays, meta = load(candidate_path(out, index))
    return {**arrays, "metric_names": tuple(meta["metric_names"])}


# ------------------------------------------------------------------------------------------------------------ pairs


PAIR_ARRAYS = ("input_index", "winner", "loser", "gap", "seed_w", "seed_l", "z_w", "z_l", "cond")


def pairs_path(out: Path, profile: str) -> Path:
    return Path(out) / f"pairs_{profile}.npz"


def save_pairs(path, arrays: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    missing = sorted(set(PAIR_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"save_pairs({path}): missing arrays {missing}")
    return save(path, arrays, meta)


def load_pairs(path, expected_fingerprint: str, expected_preset: str) -> dict:
    """The arrays of a pairs file and its `meta`, refused unless they were mined with the expected Flux2SR (its
    fingerprint) and preset: DPO on another model's latents would train on the wrong pairs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mined pairs; run `python -m experiments.mine` first")
    arrays, meta = load(path)
    if meta.get("preset") != expected_preset:
        raise ValueError(f"{path}: pairs were mined with preset {meta.get('preset')!r}, expected {expected_preset!r}")
    if meta.get("sft_fingerprint") != expected_fingerprint:
        raise ValueError(f"{path}: pairs were mined with the Flux2SR of fingerprint {meta.get('sft_fingerprint')} "
                         f"({meta.get('sft_weights')}), but this run's has {expected_fingerprint}; re-run "
                         f"`python -m experiments.mine --sft <this model>`")
    return {**arrays, "meta": meta}
