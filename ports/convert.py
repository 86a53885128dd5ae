"""Strict conversion between diffusers-format torch state dicts and foa-jax parameter pytrees.

The mapping is derived from the JAX parameter template (`jax.eval_shape` of a model's `init`) through the naming rule
of `foa_jax.params`, so every expected torch key, its shape and its transform are known before a single tensor is
read. A conversion either produces every parameter from the checkpoint or fails listing every missing, unexpected and
mis-shaped key; nothing is zero-filled or left at its random initial value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from foa_jax import params as P

# Buffers torch keeps in a state dict that carry no information for inference.
IGNORED_TORCH_KEYS = ("bn.num_batches_tracked",)


class CheckpointMismatch(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""


@dataclass(frozen=True)
class Slot:
    """Where one torch tensor goes: the JAX leaf path, the layer index inside a stack (or None), and shapes."""

    path: str
    layer: int | None
    torch_shape: tuple
    jax_shape: tuple


def plan(template: dict, stacks: Iterable[str] = ()) -> dict[str, Slot]:
    """`{torch key: Slot}` for every leaf of `template` (arrays or ShapeDtypeStructs)."""
    slots = {}
    for path, leaf in P.flatten(template).items():
        shape = tuple(leaf.shape)
        if P.stack_of(path, stacks):
            for layer in range(shape[0]):
                slots[P.torch_key(path, layer)] = Slot(path, layer, P.torch_shape(path, shape[1:]), shape[1:])
        else:
            slots[P.torch_key(path)] = Slot(path, None, P.torch_shape(path, shape), shape)
    return slots


def check_keys(slots: Mapping[str, Slot], shapes: Mapping[str, tuple], source: str) -> None:
    """Raise `CheckpointMismatch` naming every missing, unexpected and mis-shaped key at once."""
    present = {k: tuple(v) for k, v in shapes.items() if k not in IGNORED_TORCH_KEYS}
    missing = sorted(set(slots) - set(present))
    unexpected = sorted(set(present) - set(slots))
    misshaped = sorted(
        f"{k}: checkpoint {present[k]}, model expects {slots[k].torch_shape}"
        for k in set(slots) & set(present)
        if present[k] != slots[k].torch_shape
    )
    if missing or unexpected or misshaped:
        parts = [f"{source} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                parts.append(f"  {len(keys)} {title}:\n    " + "\n    ".join(keys))
        raise CheckpointMismatch("\n".join(parts))


def fill(
    template: dict,
    slots: Mapping[str, Slot],
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    dtype,
) -> dict:
    """Build the parameter tree by streaming `(torch key, loader)` pairs into preallocated output arrays.

    Each loader materialises one tensor; it is transformed, cast and written into its slot, then dropped, so peak host
    memory is the output plus one tensor. Keys must already have passed `check_keys`.
    """
    out = {path: np.empty(leaf.shape, dtype=dtype) for path, leaf in P.flatten(template).items()}
    written = {path: 0 for path in out}
    for key, load in tensors:
        if key in IGNORED_TORCH_KEYS:
            continue
        slot = slots[key]
        value = P.from_torch_layout(slot.path, np.asarray(load()))
        if slot.layer is None:
            out[slot.path][...] = value
        else:
            out[slot.path][slot.layer] = value
        written[slot.path] += 1
    stacks = _stacks_of(slots)
    for path, leaf in P.flatten(template).items():
        expected = leaf.shape[0] if P.stack_of(path, stacks) else 1
        if written[path] != expected:
            raise CheckpointMismatch(f"{path}: {written[path]} of {expected} tensors were written")
    return P.unflatten(out)


def _stacks_of(slots: Mapping[str, Slot]) -> set[str]:
    return {s.path.split(P.SEP, 1)[0] for s in slots.values() if s.layer is not None}


def from_state_dict(template: dict, state_dict: Mapping[str, np.ndarray], stacks: Iterable[str] = (), dtype=np.float32,
                    source: str = "state dict") -> dict:
    """Convert an in-memory torch-style state dict (arrays or torch tensors) to a parameter tree, strictly."""
    slots = plan(template, stacks)
    check_keys(slots, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    return fill(template, slots, ((k, lambda v=v: _to_numpy(v)) for k, v in state_dict.items()), dtype)


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


def _to_numpy(value) -> np.ndarray:
    """torch tensor or array -> numpy, upcasting bf16 (which numpy lacks) to float32 on the way."""
    if hasattr(value, "detach"):
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)
