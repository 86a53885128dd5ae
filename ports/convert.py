"""Strict, streaming conversion of FLUX.2 checkpoints (diffusers or BFL format) to foa-jax parameter trees.

    python -m ports.convert SRC --out DIR [--dtype bfloat16|float32] [--kind auto|transformer|vae]
                            [--config CONFIG.json | --preset NAME]

SRC is a diffusers model folder (`config.json` + `diffusion_pytorch_model*.safetensors`, sharded with its index json
or not), a diffusers pipeline folder (its `transformer/` and `vae/` are both converted), or one `.safetensors` file in
diffusers or Black Forest Labs format (`flux2-dev.safetensors`, `ae.safetensors`, with or without the
`model.diffusion_model.` prefix). The output is an orbax checkpoint plus `foa_config.json` per model.

The mapping is derived from the JAX parameter template (`jax.eval_shape` of the model's `init`) through the naming
rule of `foa_jax.params`, so every expected key, shape and transform is known before a tensor is read: a conversion
either produces every parameter from the checkpoint or fails listing every missing, unexpected and mis-shaped key;
nothing is zero-filled. Tensors are read one at a time and written into preallocated output arrays, so peak host
memory is the output plus about one tensor.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
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
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class CheckpointMismatch(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""


# ------------------------------------------------------------------------------------------------- the two models


@dataclass(frozen=True)
class ModelKind:
    """What conversion needs to know about one model family."""

    name: str
    config_from_diffusers: Callable[[dict], object]
    presets: Mapping[str, object]
    init: Callable
    stacks: tuple[str, ...]
    bfl_marker: str  # a key only this model's BFL checkpoints have

    def template(self, config) -> dict:
        return jax.eval_shape(lambda: self.init(config, jax.random.key(0)))


KINDS = {
    "transformer": ModelKind("transformer", flux2.Flux2Config.from_diffusers, flux2.PRESETS, flux2.init,
                             flux2.STACKS, "single_stream_modulation.lin.weight"),
    "vae": ModelKind("vae", vae.VAEConfig.from_diffusers, vae.PRESETS, vae.init, (), "decoder.up.0.block.0.conv1.weight"),
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
    """Raise `CheckpointMismatch` naming every missing, unexpected and mis-shaped key at once."""
    found = mismatches(slots, shapes)
    if any(found.values()):
        parts = [f"{source} does not match the model:"]
        parts += [f"  {len(keys)} {title}:\n    " + "\n    ".join(keys) for title, keys in found.items() if keys]
        raise CheckpointMismatch("\n".join(parts))


def fill(template: dict, slots: Mapping[str, Slot], tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
         dtype) -> dict:
    """Build the parameter tree by streaming `(diffusers key, loader)` pairs into preallocated output arrays.

    Each loader materialises one tensor; it is transformed, cast and written into its slot, then dropped. Keys must
    already have passed `check_keys`; a key delivered twice or never is still caught here.
    """
    out = {path: np.empty(leaf.shape, dtype=dtype) for path, leaf in P.flatten(template).items()}
    written: dict[str, set] = {path: set() for path in out}
    for key, load in tensors:
        if key in IGNORED_TORCH_KEYS:
            continue
        slot = slots[key]
        value = P.from_torch_layout(slot.path, np.asarray(load()))
        if slot.layer is None:
            out[slot.path][...] = value
        else:
            out[slot.path][slot.layer] = value
        written[slot.path].add(slot.layer)
    for path, leaf in P.flatten(template).items():
        expected = set(range(leaf.shape[0])) if any(s.path == path and s.layer is not None for s in slots.values()) \
            else {None}
        if written[path] != expected:
            raise CheckpointMismatch(f"{path}: layers {sorted(expected - written[path], key=str)} were never written")
    return P.unflatten(out)


def from_state_dict(template: dict, state_dict: Mapping[str, object], stacks: Iterable[str] = (), dtype=np.float32,
                    source: str = "state dict") -> dict:
    """Convert an in-memory diffusers-format state dict (numpy arrays or torch tensors) to a parameter tree."""
    slots = plan(template, stacks)
    check_keys(slots, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    return fill(template, slots, ((k, lambda v=v: to_numpy(v)) for k, v in state_dict.items()), dtype)


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

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        begin, _ = entry["data_offsets"]
        out = np.empty(entry["shape"], self.DTYPES[entry["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


class SafetensorsSource:
    """Lazy, key-by-key access to one or more `.safetensors` files, in diffusers or BFL naming.

    `shapes()` reads only headers; `tensors()` yields `(diffusers key, loader)` pairs in file order, each loader
    materialising a single tensor (a fused BFL qkv is read once and yields its three thirds).
    """

    def __init__(self, files: list[Path], kind: ModelKind, up_blocks: int = 4):
        self.files, self.kind, self.up_blocks = files, kind, up_blocks
        self._files = [SafetensorsFile(f) for f in files]
        raw_keys = [k for f in self._files for k in f.keys()]
        self.prefix = BFL_PREFIX if raw_keys and all(k.startswith(BFL_PREFIX) for k in raw_keys) else ""
        names = {k[len(self.prefix):] for k in raw_keys}
        self.is_bfl = kind.bfl_marker in names
        self.rules = TRANSFORMER_BFL_RULES if kind.name == "transformer" else VAE_BFL_RULES

    @property
    def name(self) -> str:
        return ", ".join(str(f) for f in self.files) + (" (BFL format)" if self.is_bfl else "")

    def _entries(self) -> Iterator[tuple[str, SafetensorsFile, str]]:
        for file in self._files:
            for key in file.keys():
                yield key[len(self.prefix):], file, key

    def _mapped(self, name: str) -> tuple[list[str], str | None]:
        if not self.is_bfl:
            return [name], None
        targets, op = bfl_to_diffusers_names(name, self.rules, self.up_blocks)
        return (targets or [f"<BFL key without a diffusers name> {name}"]), op

    def shapes(self) -> dict[str, tuple]:
        out = {}
        for name, file, raw in self._entries():
            targets, op = self._mapped(name)
            for target, target_shape in zip(targets, _bfl_shapes(file.shape(raw), op, len(targets))):
                out[target] = target_shape
        return out

    def tensors(self) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        for name, file, raw in self._entries():
            targets, op = self._mapped(name)
            values = _bfl_values(file.read(raw), op, len(targets))
            for target, value in zip(targets, values):
                yield target, (lambda v=value: v)
            del values


def _model_files(folder: Path) -> list[Path]:
    """The safetensors shards of a diffusers model folder, from its index json when sharded."""
    indices = sorted(folder.glob("*.safetensors.index.json"))
    if indices:
        weight_map = json.loads(indices[0].read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{indices[0]} lists shards that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file")
    return files


def _config_for(kind: ModelKind, source: SafetensorsSource, config_json: dict | None, preset: str | None):
    """The model config: the folder's/user's diffusers config, a named preset, or the preset whose shapes match."""
    if config_json is not None:
        return kind.config_from_diffusers(config_json)
    if preset is not None:
        if preset not in kind.presets:
            raise ValueError(f"unknown {kind.name} preset {preset!r}; known: {sorted(kind.presets)}")
        return kind.presets[preset]
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
    """(kind, config, source) for a model folder or a single file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    config_json = json.loads(Path(config_path).read_text()) if config_path else None
    files = [path] if path.is_file() else _model_files(path)
    if path.is_dir() and config_json is None and (path / "config.json").exists():
        config_json = json.loads((path / "config.json").read_text())
    kind = KINDS[kind_name] if kind_name != "auto" else _detect_kind(files, config_json)
    up_blocks = len(config_json["block_out_channels"]) if kind.name == "vae" and config_json else 4
    if kind.name == "vae" and preset and preset in kind.presets:
        up_blocks = len(kind.presets[preset].block_out_channels)
    source = SafetensorsSource(files, kind, up_blocks)
    return kind, _config_for(kind, source, config_json, preset), source


def _detect_kind(files: list[Path], config_json: dict | None) -> ModelKind:
    if config_json and config_json.get("_class_name") == "Flux2Transformer2DModel":
        return KINDS["transformer"]
    if config_json and config_json.get("_class_name") == "AutoencoderKLFlux2":
        return KINDS["vae"]
    keys = {k.removeprefix(BFL_PREFIX) for k in SafetensorsFile(files[0]).keys()}
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return KINDS["vae"]
    return KINDS["transformer"]


def convert(path, kind: str = "auto", dtype="float32", config_path=None, preset=None):
    """Read a checkpoint -> (params, config), streaming tensor by tensor, strictly."""
    model, config, source = open_source(Path(path), kind, config_path, preset)
    template = model.template(config)
    slots = plan(template, model.stacks)
    check_keys(slots, source.shapes(), source.name)
    params = fill(template, slots, source.tensors(), DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return params, config, model


# ------------------------------------------------------------------------------------------------ converted folders


def save(out_dir: Path, params: dict, config, model: ModelKind, source: str) -> Path:
    """Write an orbax checkpoint of `params` and `foa_config.json` describing it."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", params, force=True)
    leaves = P.flatten(params)
    meta = {
        "kind": model.name,
        "config": config.to_diffusers(),
        "dtype": str(next(iter(leaves.values())).dtype),
        "source": source,
        "num_parameters": P.count(params),
    }
    (out_dir / FOA_CONFIG).write_text(json.dumps(meta, indent=2, default=list))
    return out_dir


def load(path, kind: str, dtype=None):
    """(params, config) from a converted folder (`foa_config.json` + orbax) or straight from a diffusers/BFL source.

    A converted checkpoint is checked against the template its config implies before restoring, so a checkpoint of
    another preset or a damaged one fails naming the mismatching arrays.
    """
    path = Path(path).absolute()  # orbax reads no metadata through a relative path
    if path.is_dir() and (path / kind).is_dir() and not (path / FOA_CONFIG).exists() and \
            not (path / "config.json").exists():
        path = path / kind  # a pipeline or converted-pipeline root
    if not (path / FOA_CONFIG).exists():
        params, config, _ = convert(path, kind, dtype or "float32")
        return params, config
    import orbax.checkpoint as ocp

    meta = json.loads((path / FOA_CONFIG).read_text())
    if meta.get("kind") != kind:
        raise CheckpointMismatch(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    model = KINDS[kind]
    config = model.config_from_diffusers(meta["config"])
    stored_dtype = meta["dtype"]
    template = model.template(config)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path / "params").item_metadata
        stored_shapes = {k: tuple(v.shape) for k, v in P.flatten(dict(stored)).items()}
        expected = {k: tuple(v.shape) for k, v in P.flatten(template).items()}
        problems = {
            "missing": sorted(set(expected) - set(stored_shapes)),
            "unexpected": sorted(set(stored_shapes) - set(expected)),
            "wrong shape": sorted(f"{k}: checkpoint {stored_shapes[k]}, config expects {expected[k]}"
                                  for k in set(expected) & set(stored_shapes) if expected[k] != stored_shapes[k]),
        }
        if any(problems.values()):
            raise CheckpointMismatch(f"{path / 'params'} does not match its {FOA_CONFIG}:\n" + "\n".join(
                f"  {len(v)} {k}: {v}" for k, v in problems.items() if v))
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(stored_dtype)), template)
        params = checkpointer.restore(path / "params", target)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params, config


def load_transformer(path, dtype=None):
    """(params, Flux2Config) from a converted checkpoint, a diffusers folder or a single BFL/diffusers file."""
    return load(path, "transformer", dtype)


def load_vae(path, dtype=None):
    """(params, VAEConfig) from a converted checkpoint, a diffusers folder or a single BFL/diffusers file."""
    return load(path, "vae", dtype)


# ------------------------------------------------------------------------------------------------------------- CLI


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sources(src: Path, kind: str) -> list[tuple[Path, str]]:
    """A pipeline folder expands to its transformer and vae; anything else is one source."""
    if src.is_dir() and kind == "auto" and not (src / "config.json").exists():
        parts = [(src / name, name) for name in ("transformer", "vae") if (src / name).is_dir()]
        if parts:
            return parts
    return [(src, kind)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ports.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="diffusers model or pipeline folder, or one .safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a pipeline gets out/transformer, out/vae)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--kind", choices=("auto", "transformer", "vae"), default="auto")
    parser.add_argument("--config", type=Path, help="diffusers config.json for a single-file checkpoint")
    parser.add_argument("--preset", help="preset name for a single-file checkpoint (default: the one whose shapes match)")
    args = parser.parse_args(argv)

    sources = _sources(args.src, args.kind)
    for src, kind in sources:
        start_rss, start = _peak_rss_mb(), time.perf_counter()
        params, config, model = convert(src, kind, args.dtype, args.config, args.preset)
        after_convert = _peak_rss_mb()
        out = args.out / model.name if len(sources) > 1 else args.out
        save(out, params, config, model, str(src))
        output_mb = sum(a.nbytes for a in P.flatten(params).values()) / 2**20
        largest_mb = max(np.prod(s.torch_shape) for s in plan(params, model.stacks).values()) * 4 / 2**20
        print(f"{model.name}: {P.count(params):,} parameters ({args.dtype}) from {src} -> {out} "
              f"in {time.perf_counter() - start:.1f} s")
        print(f"  peak host memory during conversion: {after_convert - start_rss:.1f} MiB above start "
              f"(output {output_mb:.1f} MiB, largest tensor {largest_mb:.1f} MiB in float32); "
              f"after saving: {_peak_rss_mb() - start_rss:.1f} MiB")
        del params
    return 0


if __name__ == "__main__":
    sys.exit(main())
