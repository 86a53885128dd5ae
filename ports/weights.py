"""Weights folders: the one format in which the project stores a trained Flux2SR (and the tiny VAE), and reads it back.

    folder/
        manifest.json                          format, every file's sha256 and size, provenance (command, commit, data)
        vae/config.json, vae/diffusion_pytorch_model.safetensors            a diffusers AutoencoderKLFlux2 folder
        transformer/config.json, .../diffusion_pytorch_model.safetensors    a full-weight transformer (tiny preset)
        lora.safetensors                        or a Flux2SR LoRA on a base given separately (the real presets)
        prompt_embedding.safetensors           the cached prompt embedding (absent from a VAE-only folder)

Everything is safetensors in diffusers' layout, so `AutoencoderKLFlux2.from_pretrained(folder / "vae")`,
`Flux2Transformer2DModel.from_pretrained(folder / "transformer")` and `load_lora_adapter(folder / "lora.safetensors",
use_safetensors=True)` read it in torch, and `ports.convert.load` reads the model folders in JAX. Every file's hash is
written at save time and checked before anything is loaded: a truncated, zeroed or edited file is an error naming it,
never a model that quietly computes something else. A folder is written under a temporary name and renamed into
place, so a killed save leaves no half folder. `fingerprint` (the hash of the hash list) identifies the model without
reading its tensors again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from foa_jax import lora as lora_lib
from foa_jax.models import flux2, vae
from ports import convert, lora_io, text_encoder

FORMAT = "foa-jax weights folder 1"
MANIFEST = "manifest.json"
VAE = "vae"
TRANSFORMER = "transformer"
LORA = "lora.safetensors"
PROMPT = "prompt_embedding.safetensors"
_CHUNK = 1 << 20


class CorruptWeights(ValueError):
    """A weights folder whose files do not match its manifest (missing, truncated, edited) or that has none."""


@dataclass(frozen=True)
class Weights:
    """A loaded weights folder. `transformer` is set for a full-weight model, `lora` for an adapter on a base."""

    vae: dict
    vae_config: vae.VAEConfig
    prompt: np.ndarray | None
    prompt_meta: dict | None
    manifest: dict
    transformer: dict | None = None
    transformer_config: flux2.Flux2Config | None = None
    lora: dict | None = None
    lora_config: lora_lib.LoRAConfig | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(where: Path | None = None) -> str:
    """The commit of the code that runs (`+dirty` when tracked files differ from it), or "unknown" outside git."""
    where = Path(where or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=30)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(**extra) -> dict:
    """What made a folder: the exact command line, the commit, the time; callers add data and figures."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name else \
        f"python {sys.argv[0]}"
    return {"command": " ".join([program, *map(shlex.quote, sys.argv[1:])]), "commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def save(folder, *, vae_params: dict, vae_config: vae.VAEConfig, provenance: Mapping[str, Any],
         prompt: np.ndarray | None = None, prompt_meta: Mapping | None = None,
         transformer: tuple[dict, flux2.Flux2Config] | None = None,
         lora: tuple[dict, lora_lib.LoRAConfig] | None = None, overwrite: bool = False) -> Path:
    """Write a weights folder (float32 tensors) and its manifest; returns the folder.

    At most one of `transformer` (a full-weight model) and `lora` (an adapter) may be given; a folder with neither
    and no prompt is a VAE-only folder (the tiny VAE stage's). An existing folder is an error unless `overwrite`.
    """
    folder = Path(folder)
    if transformer is not None and lora is not None:
        raise ValueError("weights.save: give a full transformer or a LoRA, not both")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists: remove it or pass overwrite=True")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert.save_diffusers(tmp / VAE, _tree_float32(vae_params), vae_config, "vae")
    if transformer is not None:
        params, config = transformer
        convert.save_diffusers(tmp / TRANSFORMER, _tree_float32(params), config, "transformer")
    if lora is not None:
        tree, config = lora
        lora_io.export_lora(tmp / LORA, _tree_float32(tree), config)
    if prompt is not None:
        text_encoder.save_prompt_embedding(tmp / PROMPT, np.asarray(prompt, np.float32), dict(prompt_meta or {}))
    files = {path.relative_to(tmp).as_posix(): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
             for path in sorted(tmp.rglob("*")) if path.is_file()}
    manifest = {"format": FORMAT, "files": files, "provenance": dict(provenance)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    write_part_manifests(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


def write_part_manifests(folder) -> None:
    """A `manifest.json` in each model subfolder (`vae/`, `transformer/`), derived from the folder's manifest: the
    subfolder is a diffusers folder that may be copied on its own, and it keeps saying what made it and its hashes.
    The folder's manifest does not list these files, so its hashes and fingerprint are unchanged."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    made = {key: manifest["provenance"].get(key) for key in ("command", "commit", "created")}
    for part in (VAE, TRANSFORMER):
        files = {name.removeprefix(f"{part}/"): entry for name, entry in manifest["files"].items()
                 if name.startswith(f"{part}/")}
        if files:
            record = {"format": f"{FORMAT} part", "part_of": f"../{MANIFEST}", "files": files, "provenance": made}
            (folder / part / MANIFEST).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _tree_float32(tree):
    if isinstance(tree, Mapping):
        return {k: _tree_float32(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptWeights(f"{folder} is not a weights folder: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeights(f"{path} is unreadable: {err}") from err
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CorruptWeights(f"{path}: expected format {FORMAT!r} with a files table, got {manifest.get('format')!r}")
    return manifest


def verify(folder) -> dict:
    """The manifest, after checking every listed file's size and sha256; any difference is an error naming the file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CorruptWeights(f"{path} is listed in {folder / MANIFEST} but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptWeights(f"{path} has {path.stat().st_size} bytes, its manifest says {entry['bytes']} "
                                 f"(truncated or replaced)")
        if file_sha256(path) != entry["sha256"]:
            raise CorruptWeights(f"{path} does not match the sha256 in {folder / MANIFEST} (the file was changed or "
                                 f"damaged after it was written)")
    return manifest


def fingerprint(folder) -> str:
    """Identity of the model a folder holds: the hash of its (verified) files' hashes."""
    manifest = verify(folder)
    listing = json.dumps({k: v["sha256"] for k, v in sorted(manifest["files"].items())})
    return hashlib.sha256(listing.encode()).hexdigest()


def load(folder, lora_base: dict | None = None) -> Weights:
    """Verify and read a weights folder. A LoRA folder needs `lora_base`, the transformer tree it adapts."""
    folder = Path(folder)
    manifest = verify(folder)
    files = manifest["files"]
    if f"{VAE}/config.json" not in files:
        raise CorruptWeights(f"{folder}: a weights folder holds {VAE}/; the manifest lists {sorted(files)}")
    vae_params, vae_config = convert.load_vae(folder / VAE)
    prompt, prompt_meta = text_encoder.load_prompt_embedding(folder / PROMPT) if PROMPT in files else (None, None)
    transformer = transformer_config = adapter = adapter_config = None
    if f"{TRANSFORMER}/config.json" in files:
        transformer, transformer_config = convert.load_transformer(folder / TRANSFORMER)
    if LORA in files:
        if lora_base is None:
            raise ValueError(f"{folder / LORA} is a LoRA: pass the base transformer it adapts (lora_base)")
        adapter, adapter_config = lora_io.import_lora(folder / LORA, lora_base)
    return Weights(vae_params, vae_config, prompt, prompt_meta, manifest, transformer, transformer_config, adapter,
                   adapter_config)
