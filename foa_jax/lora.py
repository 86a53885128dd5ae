"""LoRA as its own parameter pytree, keyed by the diffusers module paths it adapts.

An adapter mirrors the base tree at the adapted Linears only: `lora[...]["to_q"] = {"lora_A": {"kernel": (L, in, r)},
"lora_B": {"kernel": (L, r, out)}}` for a stacked block Linear (PEFT's names, so export is the naming rule of
`foa_jax.params`). The transformer applies it inside the matmuls (`x·W + s·(x·A)·B`, s = alpha/rank) through the
scanned stacks, so the merged weight is never formed during training; the base tree is a separate argument and is
never differentiated, so gradients and optimizer state exist only for the adapter. `B = 0` at init (PEFT's
convention) makes a fresh adapter reproduce the base model exactly.

`Adapter` is a tree together with its `LoRAConfig`: `flux2.apply(..., lora=Adapter(tree, config))` applies it at its
own scale alpha/rank, as diffusers and PEFT apply the same file, so a user never passes the scale by hand. A bare tree
is the training form (the optimizer state mirrors it); its scale is then an explicit `lora_scale`.

Target sets (paper App. C.2, docs/method.md "LoRA"; single-block modules named explicitly):
- `attn`: double blocks `attn.to_q`, `attn.to_k`, `attn.to_v`, `attn.to_out.0`; single blocks
  `attn.to_qkv_mlp_proj` and `attn.to_out` (the fused QKV+MLP-in and attention+MLP-out projections, as diffusers'
  FLUX.2 LoRA examples target them).
- `attn+add` (default): `attn` plus the text-stream projections `attn.add_q_proj`, `attn.add_k_proj`,
  `attn.add_v_proj`, `attn.to_add_out`.
- `attn+ffn`: `attn` plus `ff.linear_in`, `ff.linear_out`, `ff_context.linear_in`, `ff_context.linear_out`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from foa_jax import params as P

_ATTN = (r"^transformer_blocks\.attn\.(to_q|to_k|to_v|to_out\.0)$",
         r"^single_transformer_blocks\.attn\.(to_qkv_mlp_proj|to_out)$")
_ADD = (r"^transformer_blocks\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
_FFN = (r"^transformer_blocks\.(ff|ff_context)\.(linear_in|linear_out)$",)
TARGET_SETS = {"attn": _ATTN, "attn+add": _ATTN + _ADD, "attn+ffn": _ATTN + _FFN}


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (None = r, so the scale is 1), and the target set by name."""

    rank: int = 64
    alpha: float | None = None
    targets: str = "attn+add"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha}")
        if self.targets not in TARGET_SETS:
            raise ValueError(f"LoRAConfig.targets must be one of {sorted(TARGET_SETS)}, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@struct.dataclass
class Adapter:
    """A LoRA tree with the config it was made with, so that it carries its own scale alpha/rank.

    A pytree whose config is static: it passes through `jax.jit`, `jax.grad` and `jax.tree.map` like the bare tree,
    and `flux2.apply(..., lora=adapter)` equals diffusers/PEFT running the same adapter file. From a file:
    `Adapter(*ports.lora_io.import_lora(path, base))`.
    """

    params: dict
    config: LoRAConfig = struct.field(pytree_node=False)

    @property
    def scale(self) -> float:
        return self.config.scale


def resolve(lora, lora_scale: float | None = None) -> tuple[dict | None, float]:
    """`(tree, scale)` to apply for `lora` given as an `Adapter`, a bare tree or None.

    An `Adapter` is applied at its own alpha/rank times `lora_scale` (a strength, 1 when None, like the `scale` that
    diffusers passes through `joint_attention_kwargs`). A bare tree is applied at `lora_scale`, which is then its
    alpha/rank; left None it is 1 (alpha = rank), with a warning, because a PEFT file with alpha != rank would run
    at the wrong strength.
    """
    if isinstance(lora, Adapter):
        return lora.params, lora.scale * (1.0 if lora_scale is None else lora_scale)
    if lora is not None and lora_scale is None:
        warnings.warn("a bare LoRA tree without lora_scale runs at scale 1.0 (alpha = rank): pass "
                      "lora.Adapter(tree, config) to apply it at its own alpha/rank, or lora_scale=config.scale",
                      stacklevel=3)
    return lora, 1.0 if lora_scale is None else lora_scale


def target_modules(params, config: LoRAConfig) -> list[str]:
    """Dotted module paths (stacked names, no layer index) of every Linear the target set adapts."""
    patterns = [re.compile(p) for p in TARGET_SETS[config.targets]]
    modules = [path[: -len(".kernel")] for path in P.flatten(params) if path.endswith(".kernel")]
    return [m for m in modules if any(p.match(m) for p in patterns)]


def init(params, config: LoRAConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """A fresh adapter for `params` (arrays or ShapeDtypeStructs): A ~ U(±1/sqrt(in)) as PEFT's kaiming-uniform(√5),
    B = 0, so `apply` with it equals `apply` without it."""
    flat = P.flatten(params)
    modules = target_modules(params, config)
    if not modules:
        raise ValueError(f"LoRA target set {config.targets!r} matches no Linear of these parameters")
    keys = jax.random.split(key, len(modules))
    out = {}
    for module, k in zip(modules, keys):
        *lead, fan_in, fan_out = flat[module + ".kernel"].shape
        bound = 1.0 / math.sqrt(fan_in)
        out[f"{module}.lora_A.kernel"] = jax.random.uniform(k, (*lead, fan_in, config.rank), dtype, -bound, bound)
        out[f"{module}.lora_B.kernel"] = jnp.zeros((*lead, config.rank, fan_out), dtype)
    return P.unflatten(out)


def merge(params: dict, lora, config: LoRAConfig | None = None) -> dict:
    """Base weights with the adapter folded in, `W + s·A·B` (for export or adapter-free inference); `lora` is an
    `Adapter` (its own scale) or a bare tree with its `config`."""
    if isinstance(lora, Adapter):
        lora, config = lora.params, lora.config
    if config is None:
        raise TypeError("lora.merge: a bare LoRA tree needs its LoRAConfig (or pass a lora.Adapter)")
    flat = dict(P.flatten(params))
    lora_flat = P.flatten(lora)
    for path in lora_flat:
        if not path.endswith(".lora_A.kernel"):
            continue
        module = path[: -len(".lora_A.kernel")]
        a, b = lora_flat[path], lora_flat[f"{module}.lora_B.kernel"]
        w = flat[module + ".kernel"]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * config.scale
        flat[module + ".kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return P.unflatten(flat)


def count(lora) -> int:
    return P.count(lora.params if isinstance(lora, Adapter) else lora)
