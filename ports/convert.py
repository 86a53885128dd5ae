"""Strict, streaming conversion of FLUX.2 checkpoints (diffusers or BFL format) to foa-jax parameter trees, and back.

    python -m ports.convert SRC --out DIR [--dtype bfloat16|float16|float32] [--kind auto|transformer|vae]
                            [--config CONFIG.json | --preset NAME] [--force]

SRC is a diffusers model folder (`config.json` + `diffusion_pytorch_model*.safetensors`, sharded with its index json
or not), a diffusers pipeline folder (its `transformer/` and `vae/` are both converted), or one `.safetensors` file in
diffusers or Black Forest Labs format (`flux2-dev.safetensors`, `ae.safetensors`, with or without the
`model.diffusion_model.` prefix). The output is an orbax checkpoint plus `foa_config.json` per model, in bfloat16
unless `--dtype` says otherwise.

The mapping is derived from the JAX parameter template (`jax.eval_shape` of the model's `init`) through the naming
rule of `foa_jax.params`, so every expected key, shape and transform is known before a tensor is read: a conversion
either produces every parameter from the checkpoint or fails listing every missing, unexpected and mis-shaped key;
nothing is zero-filled. The CLI builds the parameters a group of leaves at a time and saves each group before
building the next, so peak host memory is about one group (at least the largest leaf, a whole block stack) plus one
source tensor plus orbax's write buffers, not the whole output; it measures and prints its own peak.

`save_diffusers` goes the other way: a diffusers model folder that `from_pretrained` and `load` both read.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from foa_jax import params as P
from foa_jax.models import flux2, vae

# Buffers torch keeps in a state dict that carry no information for inference.
IGNORED_TORCH_KEYS = ("bn.num_batches_tracked",)
BFL_PREFIX = "model.diffusion_model."
FOA_CONFIG = "foa_config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
# Leaves are saved in groups of about this many bytes (a larger leaf alone): each orbax partial save costs a
# fixed time that grows with the saves before it, so one per leaf is slow for the VAE's ~190 small leaves.
GROUP_BYTES = 32 * 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


class ConversionError(ValueError):
    """A checkpoint or a conversion request the user can fix; the CLI prints `summary` and exits with status 2."""

    @property
    def summary(self) -> str:
        return " ".join(str(self).split())


class CheckpointMismatch(ConversionError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self._summary = summary

    @property
    def summary(self) -> str:
        return self._summary or super().summary


# ------------------------------------------------------------------------------------------------- the two models


@dataclass(frozen=True)
class ModelKind:
    """What conversion needs to know about one model family."""

    name: str
    diffusers_class: str
    config_from_diffusers: Callable[[dict], object]
    presets: Mapping[str, object]
    init: Callable
    stacks: tuple[str, ...]
    bfl_marker: str  # a key only this model's BFL checkpoints have

    def template(self, config) -> dict:
        return jax.eval_shape(lambda: self.init(config, jax.random.key(0)))


KINDS = {
    "transformer": ModelKind("transformer", "Flux2Transformer2DModel", flux2.Flux2Config.from_diffusers,
                             flux2.PRESETS, flux2.init, flux2.STACKS, "single_stream_modulation.lin.weight"),
    "vae": ModelKind("vae", "AutoencoderKLFlux2", vae.VAEConfig.from_diffusers, vae.PRESETS, vae.init, (),
                     "decoder.up.0.block.0.conv1.weight"),
}


# ------------------------------------------------------------------------------------------------- the core mapping


@dataclass(frozen=True)
class Slot:
    """Where one torch tensor goes: the JAX leaf path, the layer index inside a stack (or None), and shapes."""

    path: str
    layer: int | None
    torch_shape: tuple


def plan(template: dict, stacks: Iterable[str] = ()) -> dict[str, Slot]:
    """`{diffusers key: Slot}` for every leaf of `template` (arrays or ShapeDtypeStructs)."""
    slots = {}
    for path, leaf in P.flatten(template).items():
        shape = tuple(leaf.shape)
        if P.stack_of(path, stacks):
            for layer in range(shape[0]):
                slots[P.torch_key(path, layer)] = Slot(path, layer, P.torch_shape(path, shape[1:]))
        else:
            slots[P.torch_key(path)] = Slot(path, None, P.torch_shape(path, shape))
    return slots


def mismatches(slots: Mapping[str, Slot], shapes: Mapping[str, tuple]) -> dict[str, list[str]]:
    """Every missing, unexpected and mis-shaped key of a checkpoint (`{key: torch shape}`) against a plan."""
    present = {k: tuple(v) for k, v in shapes.items() if k not in IGNORED_TORCH_KEYS}
    return {
        "missing": sorted(set(slots) - set(present)),
        "unexpected": sorted(set(present) - set(slots)),
        "wrong shape": sorted(f"{k}: checkpoint {present[k]}, model expects {slots[k].torch_shape}"
                              for k in set(slots) & set(present) if present[k] != slots[k].torch_shape),
    }


def check_keys(slots: Mapping[str, Slot], shapes: Mapping[str, tuple], source: str) -> None:
    """Raise `CheckpointMismatch` naming every missing, unexpected and mis-shaped key at once (and, for one line,
    their counts with the first few of each)."""
    found = {title: keys for title, keys in mismatches(slots, shapes).items() if keys}
    if found:
        parts = [f"{source} does not match the model:"]
        parts += [f"  {len(keys)} {title}:\n    " + "\n    ".join(keys) for title, keys in found.items()]
        summary = "; ".join(f"{len(keys)} {title} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                            for title, keys in found.items())
        raise CheckpointMismatch("\n".join(parts), f"{source} does not match the model: {summary}")


def leaf_groups(template: dict, itemsize: int, budget: int = GROUP_BYTES) -> list[list[str]]:
    """The template's leaf paths in order, cut into runs of at most `budget` bytes (a larger leaf alone)."""
    groups, size = [[]], 0
    for path, leaf in P.flatten(template).items():
        nbytes = int(np.prod(leaf.shape)) * itemsize
        if groups[-1] and size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    return groups


def build_leaves(template: dict, slots: Mapping[str, Slot], paths: Iterable[str], read: Callable[[str], object],
                 dtype) -> dict[str, np.ndarray]:
    """`{path: array}` for the leaves `paths` of `template`, each torch tensor read (`read(diffusers key)`),
    transformed, cast and written into its slot of a preallocated output, then dropped.

    Keys must already have passed `check_keys`, so every slot has its tensor and every output is fully written.
    """
    keys = {}
    for key, slot in slots.items():
        keys.setdefault(slot.path, []).append(key)
    flat = P.flatten(template)
    out = {}
    for path in paths:
        out[path] = np.empty(flat[path].shape, dtype=dtype)
        for key in keys[path]:
            slot = slots[key]
            out[path][... if slot.layer is None else slot.layer] = P.from_torch_layout(path, np.asarray(read(key)))
    return out


def fill(template: dict, slots: Mapping[str, Slot], read: Callable[[str], object], dtype) -> dict:
    """The whole parameter tree in memory, every leaf built by `build_leaves`."""
    return P.unflatten(build_leaves(template, slots, P.flatten(template), read, dtype))


def from_state_dict(template: dict, state_dict: Mapping[str, object], stacks: Iterable[str] = (), dtype=np.float32,
                    source: str = "state dict") -> dict:
    """Convert an in-memory diffusers-format state dict (numpy arrays or torch tensors) to a parameter tree."""
    slots = plan(template, stacks)
    check_keys(slots, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    return fill(template, slots, lambda key: to_numpy(state_dict[key]), dtype)


def to_state_dict(params: dict, stacks: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The inverse: a parameter tree -> `{diffusers key: numpy array in torch layout}`."""
    out = {}
    for path, leaf in P.flatten(params).items():
        array = np.asarray(leaf)
        if P.stack_of(path, stacks):
            for layer in range(array.shape[0]):
                out[P.torch_key(path, layer)] = P.to_torch_layout(path, array[layer])
        else:
            out[P.torch_key(path)] = P.to_torch_layout(path, array)
    return out


def to_numpy(value) -> np.ndarray:
    """torch tensor or array -> numpy; bf16 (which numpy lacks natively) goes through float32 exactly."""
    if hasattr(value, "detach"):
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# ------------------------------------------------------------------------------------------- BFL <-> diffusers names

# (BFL module, diffusers module(s), op). `{i}`/`{j}` are layer indices, `{u}` an up-block index that BFL numbers from
# the bottom and diffusers from the top. ops: "split" = fused qkv -> thirds, "swap" = (shift, scale) -> (scale, shift),
# "conv1x1" = a 1x1 conv weight that diffusers stores as a Linear.
TRANSFORMER_BFL_RULES = (
    ("img_in", ("x_embedder",), None),
    ("txt_in", ("context_embedder",), None),
    ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",), None),
    ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",), None),
    ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",), None),
    ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",), None),
    ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",), None),
    ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",), None),
    ("single_stream_modulation.lin", ("single_stream_modulation.linear",), None),
    ("final_layer.linear", ("proj_out",), None),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ("double_blocks.{i}.img_attn.qkv",
     tuple(f"transformer_blocks.{{i}}.attn.{n}" for n in ("to_q", "to_k", "to_v")), "split"),
    ("double_blocks.{i}.txt_attn.qkv",
     tuple(f"transformer_blocks.{{i}}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")), "split"),
    ("double_blocks.{i}.img_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_q",), None),
    ("double_blocks.{i}.img_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_k",), None),
    ("double_blocks.{i}.txt_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_added_q",), None),
    ("double_blocks.{i}.txt_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_added_k",), None),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), None),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), None),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.linear_in",), None),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.linear_out",), None),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.linear_in",), None),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.linear_out",), None),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",), None),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.attn.to_out",), None),
    ("single_blocks.{i}.norm.query_norm", ("single_transformer_blocks.{i}.attn.norm_q",), None),
    ("single_blocks.{i}.norm.key_norm", ("single_transformer_blocks.{i}.attn.norm_k",), None),
)

_VAE_RESNET = ("norm1", "conv1", "norm2", "conv2")
VAE_BFL_RULES = (
    *((f"{side}.{name}", (f"{side}.{name}",), None) for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")),
    ("encoder.norm_out", ("encoder.conv_norm_out",), None),
    ("decoder.norm_out", ("decoder.conv_norm_out",), None),
    ("encoder.quant_conv", ("quant_conv",), None),
    ("decoder.post_quant_conv", ("post_quant_conv",), None),
    *((f"encoder.down.{{i}}.block.{{j}}.{n}", (f"encoder.down_blocks.{{i}}.resnets.{{j}}.{n}",), None)
      for n in _VAE_RESNET),
    ("encoder.down.{i}.block.{j}.nin_shortcut", ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut",), None),
    ("encoder.down.{i}.downsample.conv", ("encoder.down_blocks.{i}.downsamplers.0.conv",), None),
    *((f"decoder.up.{{u}}.block.{{j}}.{n}", (f"decoder.up_blocks.{{u}}.resnets.{{j}}.{n}",), None)
      for n in _VAE_RESNET),
    ("decoder.up.{u}.block.{j}.nin_shortcut", ("decoder.up_blocks.{u}.resnets.{j}.conv_shortcut",), None),
    ("decoder.up.{u}.upsample.conv", ("decoder.up_blocks.{u}.upsamplers.0.conv",), None),
    *((f"{side}.mid.block_{k + 1}.{n}", (f"{side}.mid_block.resnets.{k}.{n}",), None)
      for side in ("encoder", "decoder") for k in (0, 1) for n in (*_VAE_RESNET, "nin_shortcut")),
    *((f"{side}.mid.attn_1.{bfl}", (f"{side}.mid_block.attentions.0.{ours}",), op)
      for side in ("encoder", "decoder")
      for bfl, ours, op in (("norm", "group_norm", None), ("q", "to_q", "conv1x1"), ("k", "to_k", "conv1x1"),
                            ("v", "to_v", "conv1x1"), ("proj_out", "to_out.0", "conv1x1"))),
    ("bn", ("bn",), None),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
                      .replace(r"\{u\}", r"(?P<u>\d+)") + "$")


def _fill_template(template: str, groups: dict, up_blocks: int) -> str:
    if "u" in groups:
        groups = {**groups, "u": str(up_blocks - 1 - int(groups["u"]))}
    return template.format(**groups)


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def bfl_to_diffusers_names(key: str, rules, up_blocks: int) -> tuple[list[str], str | None]:
    """The diffusers key(s) a BFL key becomes, and the op that turns its tensor into theirs."""
    module, leaf = _split_key(key)
    leaf = "weight" if leaf == "scale" else leaf
    for bfl, ours, op in rules:
        match = _pattern(bfl).match(module)
        if match:
            return [f"{_fill_template(t, match.groupdict(), up_blocks)}.{leaf}" for t in ours], op
    return [], None


def _bfl_shapes(shape: tuple, op: str | None, parts: int) -> list[tuple]:
    if op == "split":
        return [(shape[0] // 3, *shape[1:])] * parts
    if op == "conv1x1" and len(shape) == 4:
        return [tuple(shape[:2])]
    return [tuple(shape)]


def _bfl_values(value: np.ndarray, op: str | None, parts: int) -> list[np.ndarray]:
    if op == "split":
        return list(np.split(value, 3, axis=0))
    if op == "swap":
        shift, scale = np.split(value, 2, axis=0)
        return [np.concatenate([scale, shift], axis=0)]
    if op == "conv1x1" and value.ndim == 4:
        return [value[:, :, 0, 0]]
    return [value]


def diffusers_to_bfl(state_dict: Mapping[str, np.ndarray], kind: str, up_blocks: int = 4) -> dict[str, np.ndarray]:
    """The inverse mapping, diffusers -> BFL names and layouts (fuses qkv, swaps back, 1x1 convs), in memory."""
    rules = TRANSFORMER_BFL_RULES if kind == "transformer" else VAE_BFL_RULES
    out = {}
    for bfl, ours, op in rules:
        pattern = _pattern(ours[0])
        for key in state_dict:
            module, leaf = _split_key(key)
            match = pattern.match(module)
            if not match:
                continue
            groups = match.groupdict()
            sources = [state_dict[f"{t.format(**groups)}.{leaf}"] for t in ours]
            bfl_leaf = "scale" if "norm.query_norm" in bfl or "norm.key_norm" in bfl else leaf
            value = np.asarray(sources[0])
            if op == "split":
                value = np.concatenate([np.asarray(s) for s in sources], axis=0)
            elif op == "swap":
                scale, shift = np.split(value, 2, axis=0)
                value = np.concatenate([shift, scale], axis=0)
            elif op == "conv1x1" and value.ndim == 2:
                value = value[:, :, None, None]
            out[f"{_fill_template(bfl, groups, up_blocks)}.{bfl_leaf}"] = value
    for key in state_dict:
        if key in IGNORED_TORCH_KEYS:
            out[key] = np.asarray(state_dict[key])
    return out


# ---------------------------------------------------------------------------------------------------------- sources


class SafetensorsFile:
    """Header-only opening and one-tensor-at-a-time reading of a `.safetensors` file, without mmap.

    The format is an 8-byte little-endian header length, a JSON header (`dtype`, `shape`, `data_offsets` per key) and
    the raw data. Reading a tensor with a plain `readinto` keeps host memory at exactly that tensor; the safetensors
    library's mmap would instead leave every page it touched resident (it shows in RSS as a second copy of the
    checkpoint by the end of a conversion).
    """

    DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file size {size}")
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise CheckpointMismatch(f"{self.path} is not a readable safetensors file: {err}") from err
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in self.DTYPES:
                raise CheckpointMismatch(f"{self.path}: {key} has unsupported dtype {entry['dtype']}")
            nbytes = int(np.prod(entry["shape"])) * np.dtype(self.DTYPES[entry["dtype"]]).itemsize
            if end - begin != nbytes or self.data_start + end > size:
                raise CheckpointMismatch(f"{self.path}: {key} data is truncated or inconsistent with its header "
                                         f"(offsets {begin}..{end}, {nbytes} bytes expected, file {size} bytes)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple:
        return tuple(self.entries[key]["shape"])

    def itemsize(self, key: str) -> int:
        return np.dtype(self.DTYPES[self.entries[key]["dtype"]]).itemsize

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        begin, _ = entry["data_offsets"]
        out = np.empty(entry["shape"], self.DTYPES[entry["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


@dataclass(frozen=True)
class _Entry:
    """Where a diffusers key's tensor lives: its file and raw key, and the BFL op and part that turn it into ours."""

    file: SafetensorsFile
    raw: str
    op: str | None
    part: int
    shape: tuple


class SafetensorsSource:
    """Lazy, key-by-key access to one or more `.safetensors` files, in diffusers or BFL naming.

    `shapes()` reads only headers; `read(key)` materialises the one tensor a diffusers key names (the third of a fused
    BFL qkv reads the fused tensor, so each of its three parts reads it once).
    """

    def __init__(self, files: list[Path], kind: ModelKind, up_blocks: int = 4):
        self.files, self.kind, self.up_blocks = files, kind, up_blocks
        opened = [SafetensorsFile(f) for f in files]
        raw_keys = [k for f in opened for k in f.keys()]
        self.prefix = BFL_PREFIX if raw_keys and all(k.startswith(BFL_PREFIX) for k in raw_keys) else ""
        self.is_bfl = kind.bfl_marker in {k[len(self.prefix):] for k in raw_keys}
        rules = TRANSFORMER_BFL_RULES if kind.name == "transformer" else VAE_BFL_RULES
        self.entries: dict[str, _Entry] = {}
        for file in opened:
            for raw in file.keys():
                name = raw[len(self.prefix):]
                targets, op = bfl_to_diffusers_names(name, rules, up_blocks) if self.is_bfl else ([name], None)
                targets = targets or [f"<BFL key without a diffusers name> {name}"]
                for part, (target, shape) in enumerate(zip(targets, _bfl_shapes(file.shape(raw), op, len(targets)))):
                    self.entries[target] = _Entry(file, raw, op, part, shape)

    @property
    def name(self) -> str:
        return ", ".join(str(f) for f in self.files) + (" (BFL format)" if self.is_bfl else "")

    def shapes(self) -> dict[str, tuple]:
        return {key: entry.shape for key, entry in self.entries.items()}

    def nbytes(self, key: str) -> int:
        entry = self.entries[key]
        return int(np.prod(entry.shape)) * entry.file.itemsize(entry.raw)

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        return _bfl_values(entry.file.read(entry.raw), entry.op, 3 if entry.op == "split" else 1)[entry.part]


def _model_files(folder: Path) -> list[Path]:
    """The safetensors shards of a diffusers model folder, from its index json when sharded."""
    indices = sorted(folder.glob("*.safetensors.index.json"))
    if indices:
        weight_map = _read_json(indices[0])["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{indices[0]} lists shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file")
    return files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def _detect_kind(files: list[Path], config_json: dict | None) -> tuple[ModelKind, str]:
    """The model a checkpoint holds, and the evidence: the config's `_class_name`, else the key names."""
    for kind in KINDS.values():
        if config_json and config_json.get("_class_name") == kind.diffusers_class:
            return kind, f"its config's _class_name is {kind.diffusers_class}"
    keys = {k.removeprefix(BFL_PREFIX) for k in SafetensorsFile(files[0]).keys()}
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return KINDS["vae"], "its keys start with encoder. and decoder."
    return KINDS["transformer"], "no key starts with encoder. or decoder."


def _declared_config(kind: ModelKind, config_json: dict | None, config_file: Path | None, preset: str | None):
    """The config the user or the folder gives (a diffusers config.json or a preset name), or None."""
    if config_json is not None:
        try:
            return kind.config_from_diffusers(config_json)
        except (TypeError, ValueError) as err:
            raise ConversionError(f"{config_file} is not a {kind.diffusers_class} config: {err}") from err
    if preset is not None:
        if preset not in kind.presets:
            raise ConversionError(f"unknown {kind.name} preset {preset!r}; known: {sorted(kind.presets)}")
        return kind.presets[preset]
    return None


def _matching_preset(kind: ModelKind, source: SafetensorsSource):
    """The preset whose shapes the checkpoint has; else a mismatch against the closest preset."""
    shapes = source.shapes()
    scored = []
    for name, config in kind.presets.items():
        found = mismatches(plan(kind.template(config), kind.stacks), shapes)
        if not any(found.values()):
            return config
        scored.append((sum(len(v) for v in found.values()), name))
    best = min(scored)[1]
    check_keys(plan(kind.template(kind.presets[best]), kind.stacks), shapes,
               f"{source.name} matches no {kind.name} preset ({sorted(kind.presets)}; pass --config); "
               f"closest, {best!r},")
    raise AssertionError("unreachable")


def open_source(path: Path, kind_name: str, config_path: Path | None = None, preset: str | None = None):
    """(kind, config, source) for a model folder or a single file; a `kind_name` the checkpoint contradicts is an
    error that says what it holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if config_path:
        config_file = Path(config_path)
    elif path.is_dir() and (path / "config.json").exists():
        config_file = path / "config.json"
    else:
        config_file = None
    config_json = _read_json(config_file) if config_file else None
    files = [path] if path.is_file() else _model_files(path)
    kind, evidence = _detect_kind(files, config_json)
    if kind_name not in ("auto", kind.name):
        raise ConversionError(f"{path} holds a {kind.name} checkpoint ({evidence}), not a {kind_name}: pass "
                              f"--kind {kind.name} or --kind auto")
    config = _declared_config(kind, config_json, config_file, preset)
    up_blocks = len(config.block_out_channels) if kind.name == "vae" and config is not None else 4
    source = SafetensorsSource(files, kind, up_blocks)
    return kind, config if config is not None else _matching_preset(kind, source), source


@dataclass(frozen=True)
class Conversion:
    """A checkpoint checked against its model: every slot of the template has its tensor, with the right shape."""

    model: ModelKind
    config: object
    source: SafetensorsSource
    template: dict
    slots: dict[str, Slot]

    def groups(self, dtype, read: Callable[[str], np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The parameters as `{path: array}` groups (`leaf_groups`), each built only when asked for; `read`
        (default: the source's) lets a caller watch every tensor go by."""
        for paths in leaf_groups(self.template, np.dtype(dtype).itemsize):
            yield build_leaves(self.template, self.slots, paths, read or self.source.read, dtype)


def open_conversion(path, kind: str = "auto", config_path=None, preset=None) -> Conversion:
    """Open a checkpoint and check every key and shape before a tensor is read."""
    model, config, source = open_source(Path(path), kind, config_path, preset)
    template = model.template(config)
    slots = plan(template, model.stacks)
    check_keys(slots, source.shapes(), source.name)
    return Conversion(model, config, source, template, slots)


def convert(path, kind: str = "auto", dtype="float32", config_path=None, preset=None):
    """Read a checkpoint -> (params, config, model) in memory, tensor by tensor, strictly."""
    conversion = open_conversion(path, kind, config_path, preset)
    params = fill(conversion.template, conversion.slots, conversion.source.read,
                  DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return params, conversion.config, conversion.model


# ------------------------------------------------------------------------------------------------ converted folders


def write_params(folder: Path, groups: Iterable[Mapping[str, object]]) -> None:
    """Write `{path: array}` groups as one orbax checkpoint at `folder`, each group saved (and free to be dropped)
    before the next is asked for.

    It is written under another name beside `folder` and renamed when complete, so an interrupted write never
    leaves a checkpoint that loads; a leftover of one is removed first, since orbax would add to it. (Not a hidden
    name: orbax finds its pending saves with a glob that skips those.)
    """
    import orbax.checkpoint.experimental.v1 as ocp

    folder = Path(folder).absolute()
    staging = folder.with_name(f"{folder.name}.writing")
    for leftover in folder.parent.glob(f"{staging.name}*"):  # orbax stages partial saves under a suffix
        shutil.rmtree(leftover)
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False  # nothing changes a leaf while it is written: no copy needed
    # zstd holds a compressed copy of each array while writing it, about one more leaf of host memory; the disk it
    # saves is the cheaper resource.
    context.array.saving.use_compression = False
    with context:
        for group in groups:
            ocp.partial.save(staging, P.unflatten(dict(group)))
        ocp.partial.finalize(staging)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _write_meta(out_dir: Path, model: ModelKind, config, dtype, num_parameters: int, source: str) -> None:
    meta = {"kind": model.name, "config": config.to_diffusers(), "dtype": str(np.dtype(dtype)), "source": source,
            "num_parameters": num_parameters}
    (out_dir / FOA_CONFIG).write_text(json.dumps(meta, indent=2, default=list))


def save(out_dir: Path, params: dict, config, model: ModelKind, source: str) -> Path:
    """Write an orbax checkpoint of `params` (already in memory: one group) and `foa_config.json` describing it."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = P.flatten(params)
    write_params(out_dir / "params", [flat])
    _write_meta(out_dir, model, config, next(iter(flat.values())).dtype, P.count(params), source)
    return out_dir


def save_conversion(out_dir: Path, conversion: Conversion, dtype, source: str,
                    read: Callable[[str], np.ndarray] | None = None) -> Path:
    """Convert and write in one pass: each leaf group is built, saved and dropped before the next is read, so the
    whole parameter tree is never in memory."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_params(out_dir / "params", conversion.groups(dtype, read))
    _write_meta(out_dir, conversion.model, conversion.config, dtype, P.count(conversion.template), source)
    return out_dir


def _kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def load(path, kind: str, dtype=None):
    """(params, config) from a converted folder (`foa_config.json` + orbax) or straight from a diffusers/BFL source.

    A converted checkpoint is checked against the template its config implies before restoring, so a checkpoint of
    another preset or a damaged one fails naming the mismatching arrays.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    model = _kind(kind)
    path = Path(path).absolute()  # orbax reads no metadata through a relative path
    if path.is_dir() and (path / kind).is_dir() and not (path / FOA_CONFIG).exists() and \
            not (path / "config.json").exists():
        path = path / kind  # a pipeline or converted-pipeline root
    if not (path / FOA_CONFIG).exists():
        params, config, _ = convert(path, kind, dtype or "float32")
        return params, config
    meta = _read_json(path / FOA_CONFIG)
    if meta.get("kind") != kind:
        raise CheckpointMismatch(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    config = model.config_from_diffusers(meta["config"])
    template = model.template(config)
    stored = {k: tuple(v.shape) for k, v in P.flatten(dict(ocp.metadata(path / "params").metadata)).items()}
    expected = {k: tuple(v.shape) for k, v in P.flatten(template).items()}
    problems = {
        "missing": sorted(set(expected) - set(stored)),
        "unexpected": sorted(set(stored) - set(expected)),
        "wrong shape": sorted(f"{k}: checkpoint {stored[k]}, config expects {expected[k]}"
                              for k in set(expected) & set(stored) if expected[k] != stored[k]),
    }
    if any(problems.values()):
        raise CheckpointMismatch(f"{path / 'params'} does not match its {FOA_CONFIG}:\n" + "\n".join(
            f"  {len(v)} {k}: {v}" for k, v in problems.items() if v))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(meta["dtype"]), sharding=device),
                          template)
    params = ocp.load(path / "params", target)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params, config


def load_transformer(path, dtype=None):
    """(params, Flux2Config) from a converted checkpoint, a diffusers folder or a single BFL/diffusers file."""
    return load(path, "transformer", dtype)


def load_vae(path, dtype=None):
    """(params, VAEConfig) from a converted checkpoint, a diffusers folder or a single BFL/diffusers file."""
    return load(path, "vae", dtype)


# ------------------------------------------------------------------------------------------------ diffusers folders


def save_diffusers(out_dir, params: dict, config, kind: str) -> Path:
    """Write a diffusers model folder (`config.json`, `diffusion_pytorch_model.safetensors` in torch layout and the
    parameters' dtype) that diffusers' `from_pretrained` and `load` both read: the way back to torch."""
    from safetensors.numpy import save_file

    model = _kind(kind)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(params, model.stacks)
    if "bn.running_mean" in state:  # torch's BatchNorm also keeps a step counter, which our tree has no use for
        state["bn.num_batches_tracked"] = np.zeros((), np.int64)
    save_file({key: np.require(value, requirements="C") for key, value in state.items()}, out_dir / DIFFUSERS_WEIGHTS)
    (out_dir / "config.json").write_text(json.dumps({"_class_name": model.diffusers_class, **config.to_diffusers()},
                                                    indent=2, default=list))
    return out_dir


# ------------------------------------------------------------------------------------------------------------- CLI


class PeakMemory:
    """This process's peak resident memory over a `with` block, from the kernel's own high-water mark.

    Linux resets the mark on request (`/proc/self/clear_refs`), so the peak is the block's own, spikes included
    (sampling RSS misses them); elsewhere `peak_mib` stays None rather than report the whole process's life.
    """

    def __enter__(self):
        self.start_mib = self.peak_mib = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self
        self.start_mib = self._status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.start_mib is not None:
            self.peak_mib = self._status_mib("VmHWM") - self.start_mib

    @staticmethod
    def _status_mib(field: str) -> float:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)[1]) / 1024


@contextlib.contextmanager
def _progress(conversion: Conversion, desc: str) -> Iterator[Callable[[str], np.ndarray]]:
    """A `read` that moves a tqdm bar on stderr for every tensor: bytes read of the total, time left, tensors."""
    from tqdm import tqdm

    source, slots = conversion.source, conversion.slots
    done = itertools.count(1)
    with tqdm(total=sum(source.nbytes(key) for key in slots), desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr) as bar:
        def read(key: str) -> np.ndarray:
            value = source.read(key)
            bar.set_postfix_str(f"{next(done)}/{len(slots)} tensors", refresh=False)
            bar.update(value.nbytes)
            return value

        yield read


def _convert_one(src: Path, kind: str, out: Path, args: argparse.Namespace) -> None:
    """Convert one model into `out` behind a progress bar; then its size, time and measured peak host memory."""
    import orbax.checkpoint.experimental.v1  # noqa: F401  (imported first: the peak is the conversion's alone)

    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    with PeakMemory() as memory:
        conversion = open_conversion(src, kind, args.config, args.preset)
        with _progress(conversion, conversion.model.name) as read:
            save_conversion(out, conversion, dtype, str(src), read)
    itemsize = np.dtype(dtype).itemsize
    count = P.count(conversion.template)
    output_mib = count * itemsize / 2**20
    leaf_mib = max(int(np.prod(leaf.shape)) for leaf in P.flatten(conversion.template).values()) * itemsize / 2**20
    tensor_mib = max(conversion.source.nbytes(key) for key in conversion.slots) / 2**20
    print(f"{conversion.model.name}: {count:,} parameters ({args.dtype}) from {src} -> {out} in "
          f"{time.perf_counter() - start:.1f} s")
    if memory.peak_mib is None:
        print("  peak host memory: not measured (it needs Linux's /proc/self/clear_refs)")
    else:
        print(f"  peak host memory {memory.peak_mib:.0f} MiB above the {memory.start_mib:.0f} MiB at start: "
              f"{memory.peak_mib / output_mib:.2f}x the {output_mib:.0f} MiB written (largest leaf {leaf_mib:.0f} MiB, "
              f"largest source tensor {tensor_mib:.0f} MiB)")


def _sources(src: Path, kind: str, out: Path) -> list[tuple[Path, str, Path]]:
    """(source, kind, output folder) per model: a pipeline folder expands to its transformer and vae."""
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir() and kind == "auto" and not (src / "config.json").exists():
        parts = [(src / name, name, out / name) for name in ("transformer", "vae") if (src / name).is_dir()]
        if parts:
            return parts
    return [(src, kind, out)]


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"--out {out} exists and is not empty: pass --force to replace the checkpoint in it "
                              f"(params/ and {FOA_CONFIG}), or choose another folder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ports.convert", description=__doc__.split("\n\n")[0],
        epilog="Peak host memory is about the largest parameter leaf (a whole block stack) plus one source tensor, "
               "not the whole output; every run prints the peak it measured.")
    parser.add_argument("src", type=Path, help="diffusers model or pipeline folder, or one .safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a pipeline gets out/transformer, out/vae)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the written parameters (default: bfloat16, the dtype FLUX.2's weights are "
                             "released in, at half the disk and host memory of float32; the models compute in their "
                             "config's dtype either way). A float32 source is rounded: pass float32 to keep it exact")
    parser.add_argument("--kind", choices=("auto", "transformer", "vae"), default="auto",
                        help="which model SRC holds (default: from its config.json or key names)")
    parser.add_argument("--config", type=Path, help="diffusers config.json for a single-file checkpoint")
    parser.add_argument("--preset", help="preset name for a single-file checkpoint (default: the one whose shapes match)")
    parser.add_argument("--force", action="store_true",
                        help=f"replace the checkpoint (params/, {FOA_CONFIG}) in a non-empty --out; other files stay")
    return parser


def main(argv=None) -> int:
    """The CLI: a problem the user can fix is one line on stderr and exit status 2, not a traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        targets = _sources(args.src, args.kind, args.out)
        for _, _, out in targets:
            _check_output(out, args.force)
        print(f"writing {args.dtype} parameters" + (" (the default; --dtype float32 keeps float32 weights exact)"
                                                    if args.dtype == "bfloat16" else ""), flush=True)
        for src, kind, out in targets:
            _convert_one(src, kind, out, args)
    except (ConversionError, FileNotFoundError) as err:
        message = err.summary if isinstance(err, ConversionError) else " ".join(str(err).split())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _map_large_blocks() -> None:
    """Have glibc give every block of 1 MiB or more its own mapping, so that a freed tensor or leaf goes back to the
    OS at once. Its default threshold rises to the largest block freed so far, and blocks below it then stay in the
    heap: with a conversion's one-use buffers of every size, that kept about another leaf resident. A process-wide
    setting, so only the CLI makes it; without glibc's `mallopt` it does nothing."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 2**20)


if __name__ == "__main__":
    _map_large_blocks()
    sys.exit(main())
