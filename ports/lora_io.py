"""foa-jax LoRA adapters <-> the PEFT/diffusers LoRA safetensors files that diffusers' FLUX.2 loaders read.

`export_lora` writes what `Flux2Pipeline.save_lora_weights` writes, so `Flux2Pipeline.load_lora_weights(path)` and
`Flux2Transformer2DModel.load_lora_adapter(path, use_safetensors=True)` load it (the latter's default
`use_safetensors=None` looks for a pickled `.bin` and never reads the header metadata):

    transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight                (r, in)
    transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight                (out, r)
    transformer.single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.lora_A.weight  ...
    __metadata__: {"format": "pt", "lora_adapter_metadata": JSON {"transformer.r": r, "transformer.lora_alpha": alpha,
                   "transformer.target_modules": [every adapted module with its layer index]}}

The metadata is what carries alpha: without it diffusers builds its `LoraConfig` from the tensors alone, with
`lora_alpha = r` (scale 1), and an adapter trained with alpha != rank would silently run at the wrong strength. With
it, diffusers passes the JSON (its `transformer.` prefix stripped) straight to `peft.LoraConfig(**...)`, so only
LoraConfig fields go there; `target_modules` names exact module paths, the set PEFT would otherwise infer.

`import_lora` reads that format and the files PEFT writes for the same model: `transformer.save_lora_adapter` (keys
without prefix, the LoraConfig JSON unprefixed in the header) and `PeftModel.save_pretrained` (`adapter_model.
safetensors`, keys under `base_model.model.`, the config in `adapter_config.json` beside it). A file with neither
header metadata nor `adapter_config.json` follows diffusers' convention, alpha = rank. The adapted modules must be
exactly one foa-jax target set (`attn`, `attn+add`, `attn+ffn`), with every layer present at one rank; anything
else fails naming the keys, as a checkpoint conversion does (`ports.convert.plan` / `check_keys` / `fill` over the
adapter template, since an adapter tree follows the same naming rule as the parameters).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from foa_jax import lora
from foa_jax import params as P
from foa_jax.models import flux2
from ports import convert

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights / save_lora_adapter
PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # PeftModel.save_pretrained
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."  # diffusers' Flux2LoraLoaderMixin.transformer_name, as save_lora_weights packs it
PEFT_PREFIX = "base_model.model."
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": convert.DTYPES["bfloat16"]}
# LoraConfig options that change what an adapter computes and that foa-jax's x·W + (alpha/r)·(x·A)·B cannot express.
_UNSUPPORTED_FLAGS = ("use_rslora", "use_dora", "lora_bias")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")


# ------------------------------------------------------------------------------------------------------------ export


def export_lora(path, lora_tree: dict, lora_config: lora.LoRAConfig, metadata: Mapping[str, str] | None = None,
                dtype: str = "float32") -> Path:
    """Write `lora_tree` as a diffusers FLUX.2 LoRA file; returns the file written.

    `path` is the `.safetensors` file, or a folder that gets `pytorch_lora_weights.safetensors` (the name diffusers
    looks for). `metadata` adds string entries to the safetensors header (provenance such as the run or step).
    The file is written next to its destination and renamed, so an interrupted export never leaves a torn file.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_lora: dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    state = convert.to_state_dict(lora_tree, flux2.STACKS)
    modules = _check_export(state, lora_config)
    header = {"format": "pt", METADATA_KEY: json.dumps({
        f"{PREFIX}r": lora_config.rank,
        f"{PREFIX}lora_alpha": lora_config.alpha if lora_config.alpha is not None else lora_config.rank,
        f"{PREFIX}target_modules": modules,
    }, indent=2, sort_keys=True)}
    for key, value in (metadata or {}).items():
        if key in header or not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"export_lora: metadata must map str to str and may not set {sorted(header)}; "
                             f"got {key!r}: {value!r}")
        header[key] = value
    tensors = {PREFIX + key: np.ascontiguousarray(value.astype(EXPORT_DTYPES[dtype])) for key, value in state.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.partial")
    save_file(tensors, str(partial), metadata=header)
    os.replace(partial, file)
    return file


def _check_export(state: Mapping[str, np.ndarray], config: lora.LoRAConfig) -> list[str]:
    """The adapted module names of `state`, after checking it is an adapter of `config`'s rank and target set."""
    problems = [f"{key}: not a lora_A/lora_B weight" for key in state if not _LORA_KEY.match(key)]
    modules = sorted({match["module"] for match in map(_LORA_KEY.match, state) if match})
    patterns = [re.compile(p) for p in lora.TARGET_SETS[config.targets]]
    for module in modules:
        if not any(p.match(_stacked(module)) for p in patterns):
            problems.append(f"{module}: not in target set {config.targets!r}")
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            problems.append(f"{module}: needs both lora_A and lora_B")
        elif a.shape[0] != config.rank or b.shape[1] != config.rank:
            problems.append(f"{module}: lora_A {a.shape} / lora_B {b.shape} do not have rank {config.rank}")
    if problems:
        raise ValueError("export_lora: the adapter does not match its LoRAConfig:\n  " + "\n  ".join(problems))
    return modules


# ------------------------------------------------------------------------------------------------------------ import


def import_lora(path, base, dtype=np.float32) -> tuple[dict, lora.LoRAConfig]:
    """(adapter tree, LoRAConfig) from a diffusers or PEFT LoRA file (or a folder holding one).

    `base` is the transformer's `Flux2Config` or its parameter tree (arrays or ShapeDtypeStructs): the adapter
    template, and so every expected key and shape, is derived from it.
    """
    file = _adapter_file(Path(path))
    tensors = convert.SafetensorsFile(file)
    with safe_open(str(file), framework="numpy") as f:  # header only: numpy cannot hold the bf16 tensors it reads
        header = f.metadata() or {}
    names = _strip_prefix(tensors.keys())
    shapes = {name: tensors.shape(raw) for name, raw in names.items()}
    peft_config = _peft_config(file, header)
    template = base if isinstance(base, dict) else jax.eval_shape(lambda: flux2.init(base, jax.random.key(0)))
    targets = _target_set(template, shapes, file)
    rank = int(peft_config.get("r") or shapes[min(k for k in shapes if k.endswith(".lora_A.weight"))][0])
    alpha = peft_config.get("lora_alpha", rank)
    config = lora.LoRAConfig(rank=rank, alpha=None if alpha == rank else float(alpha), targets=targets)
    adapter = jax.eval_shape(lambda: lora.init(template, config, jax.random.key(0)))
    slots = convert.plan(adapter, flux2.STACKS)
    convert.check_keys(slots, shapes, f"{file} (LoRA rank {rank}, target set {targets!r})")
    tree = convert.fill(adapter, slots, lambda name: tensors.read(names[name]), dtype)
    return tree, config


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist")
    found = [path / name for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME) if (path / name).is_file()]
    if len(found) != 1:
        raise FileNotFoundError(f"{path} must hold exactly one of {LORA_WEIGHT_NAME}, {PEFT_WEIGHT_NAME}; "
                                f"found {[f.name for f in found]} (pass the file instead)")
    return found[0]


def _strip_prefix(keys: list[str]) -> dict[str, str]:
    """`{diffusers name: file key}`: the pipeline's `transformer.` or PeftModel's `base_model.model.` removed."""
    for prefix in (PREFIX, PEFT_PREFIX):
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys}
    return {k: k for k in keys}


def _peft_config(file: Path, header: Mapping[str, str]) -> dict:
    """The adapter's LoraConfig fields: from the header (diffusers), else `adapter_config.json` (PEFT), else {}."""
    if METADATA_KEY in header:
        fields, source = json.loads(header[METADATA_KEY]), f"{file} header {METADATA_KEY}"
        if any(k.startswith(PREFIX) for k in fields):
            fields = {k[len(PREFIX):]: v for k, v in fields.items() if k.startswith(PREFIX)}
    elif (file.parent / PEFT_CONFIG_NAME).is_file():
        fields, source = json.loads((file.parent / PEFT_CONFIG_NAME).read_text()), str(file.parent / PEFT_CONFIG_NAME)
    else:
        return {}
    problems = [f"{flag}=true" for flag in _UNSUPPORTED_FLAGS if fields.get(flag)]
    if fields.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={fields['peft_type']!r}")
    for pattern, default in (("rank_pattern", fields.get("r")), ("alpha_pattern", fields.get("lora_alpha"))):
        problems += [f"{pattern}[{k!r}]={v}" for k, v in (fields.get(pattern) or {}).items() if v != default]
    if problems:
        raise ValueError(f"{source}: LoRA options foa-jax cannot represent (one rank and alpha for every module, "
                         f"scale alpha/rank, no DoRA or bias): {problems}")
    return fields


def _stacked(module: str) -> str:
    """`transformer_blocks.3.attn.to_q` -> `transformer_blocks.attn.to_q`: the adapter-tree path of a module."""
    head, *rest = module.split(P.SEP)
    if head in flux2.STACKS and rest and rest[0].isdigit():
        return P.SEP.join([head, *rest[1:]])
    return module


def _target_set(template: dict, shapes: Mapping[str, tuple], source) -> str:
    """The foa-jax target set whose modules are exactly the adapted ones."""
    not_lora = sorted(k for k in shapes if not _LORA_KEY.match(k))
    if not_lora:
        raise convert.CheckpointMismatch(f"{source}: keys that are not LoRA lora_A/lora_B weights of a diffusers "
                                         f"FLUX.2 module path: {not_lora}")
    adapted = {_stacked(_LORA_KEY.match(k)["module"]) for k in shapes}
    lines = []
    for name in lora.TARGET_SETS:
        expected = set(lora.target_modules(template, lora.LoRAConfig(targets=name)))
        if expected == adapted:
            return name
        lines.append(f"{name!r}: adapted but not in it {sorted(adapted - expected)}, "
                     f"in it but not adapted {sorted(expected - adapted)}")
    raise ValueError(f"{source}: the adapted modules {sorted(adapted)} are no foa-jax LoRA target set:\n  "
                     + "\n  ".join(lines))
