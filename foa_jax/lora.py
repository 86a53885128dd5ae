"""LoRA as its own parameter pytree, keyed by the diffusers module paths it adapts.

An adapter mirrors the base tree at the adapted Linears only: `lora[...]["to_q"] = {"lora_A": {"kernel": (L, in, r)},
"lora_B": {"kernel": (L, r, out)}}` for a stacked block Linear (PEFT's names, so export is the naming rule of
`foa_jax.params`). The transformer applies it inside the matmuls (`x·W + s·(x·A)·B`, s = alpha/rank) through the
scanned stacks, so the merged weight is never formed during training; the base tree is a separate argument and is
never differentiated, so gradients and optimizer state exist only for the adapter. `B = 0` at init (PEFT's
convention) makes a fresh adapter reproduce the base model exactly.

Target sets (SPEC §2, paper App. C.2; single-block modules named explicitly):
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
from dataclasses import dataclass

import jax
import jax.numpy as jnp

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


def merge(params: dict, lora: dict, config: LoRAConfig) -> dict:
    """Base weights with the adapter folded in, `W + s·A·B` (for export or adapter-free inference)."""
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


def count(lora: dict) -> int:
    return P.count(lora)
