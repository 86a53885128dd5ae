"""Parameter pytrees named like diffusers' state dicts, and the one rule that maps between the two.

A model's parameters are nested dicts whose keys are the dotted module path of the diffusers state dict, split at the
dots, with a Flax leaf name at the end:

    torch `transformer_blocks.3.attn.to_q.weight`  (out, in)
    jax   params["transformer_blocks"]["attn"]["to_q"]["kernel"][3]  (in, out)

Leaf names: `kernel` (Linear weight, transposed to (in, out); Conv weight, OIHW -> HWIO), `bias`, `scale` (a norm's
weight) and buffers such as `running_mean` keep their torch names. Block stacks that the model runs with `lax.scan`
are stored once with a leading layer axis, and their torch names carry the layer index after the stack name. Because
the rule is this short, conversion in either direction is a table derived from the JAX parameter template, never a
hand-written list of keys.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

SEP = "."
_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight"}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> `{dotted.path: leaf}` in insertion order."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict) -> dict:
    """`{dotted.path: leaf}` -> nested dict; the inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEP)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def stack_of(path: str, stacks: Iterable[str]) -> str | None:
    """The scanned stack a JAX path belongs to (`transformer_blocks`, ...), or None for unstacked parameters."""
    head = path.split(SEP, 1)[0]
    return head if head in tuple(stacks) else None


def torch_key(path: str, layer: int | None = None) -> str:
    """The diffusers state-dict key of one JAX leaf (of one layer, for stacked parameters)."""
    *module, leaf = path.split(SEP)
    leaf = _RENAMED_LEAVES.get(leaf, leaf)
    if layer is not None:
        module = [module[0], str(layer), *module[1:]]
    return SEP.join([*module, leaf])


def to_torch_layout(path: str, array: np.ndarray) -> np.ndarray:
    """JAX layout -> torch layout for one (unstacked) leaf: transpose Linear kernels, HWIO -> OIHW for convs."""
    if path.endswith("kernel"):
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        raise ValueError(f"{path}: a kernel must be 2-D or 4-D, got shape {array.shape}")
    return array


def from_torch_layout(path: str, array: np.ndarray) -> np.ndarray:
    """torch layout -> JAX layout for one leaf; the inverse of `to_torch_layout`.

    Returns a transposed view, not a copy: the converter writes it straight into its output buffer, so streaming a
    checkpoint never holds a second copy of the tensor in flight.
    """
    if path.endswith("kernel"):
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)
        raise ValueError(f"{path}: a kernel must be 2-D or 4-D, got shape {array.shape}")
    return array


def torch_shape(path: str, shape: tuple) -> tuple:
    """The torch shape of one unstacked JAX leaf of `shape`, without materialising it."""
    if path.endswith("kernel"):
        if len(shape) == 2:
            return (shape[1], shape[0])
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def count(tree) -> int:
    """Number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in flatten(tree).values()))
