"""Sharding by rule table: regular expressions over parameter paths -> PartitionSpecs on a ("data", "fsdp") mesh.

FLUX.2-dev is 32B parameters (64 GB in bf16): it does not fit one accelerator with activations, so parameters are
fully sharded (FSDP) over the `fsdp` axis and gathered by XLA per scanned layer, while the batch is split over both
axes. The rules are data, as in big_vision and MaxText: the model code never mentions devices. A leaf's path is every
key on the way to it joined by dots (`transformer.transformer_blocks.attn.to_q.kernel` in a frozen tree,
`opt_state.1.0.mu.transformer_blocks.attn.to_q.lora_A.kernel` in a train state), and rules are searched in it, so a
LoRA tree, its optimizer moments and a frozen base nested in a dict are sharded by the same table.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from foa_jax import train

AXES = ("data", "fsdp")
BATCH = P(AXES)  # leading (batch) dimension split over every device

# First match wins (`re.search` in the dotted path). Stacked block kernels are (layers, in, out): shard `in`, keep the
# scanned layer axis whole so `lax.scan` slices a layer locally. LoRA factors shard their full-size side. The VAE and
# LPIPS (convolutions, a few hundred MB) and norm scales are replicated, as is everything else that is not a kernel
# (quantisation scales, the prompt embedding, step counters, keys).
FSDP_RULES: tuple[tuple[str, P], ...] = (
    (r"lora_A\.kernel$", P(None, "fsdp", None)),
    (r"lora_B\.kernel$", P(None, None, "fsdp")),
    (r"(^|\.)(encoder|decoder|quant_conv|post_quant_conv|net\.slice\d+|lin\d+)\.", P()),
    (r"(^|\.)(transformer_blocks|single_transformer_blocks)\..*\.kernel$", P(None, "fsdp", None)),
    (r"\.scale$", P()),
    (r"\.kernel$", P("fsdp", None)),
    (r".*", P()),
)


def make_mesh(data: int = 1, fsdp: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); fsdp defaults to the devices left after `data`."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp = len(devices) // data if fsdp is None else fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {len(devices)} are available")
    return Mesh(np.array(devices).reshape(data, fsdp), AXES)


def spec_for(path: str, shape: tuple, mesh: Mesh, rules=FSDP_RULES) -> P:
    """The PartitionSpec of the leaf at dotted `path`; a sharded dimension must divide evenly by its mesh axis."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"{path}: rule {pattern!r} -> {spec} has more dimensions than shape {shape}")
            for dim, axis in zip(shape, spec):
                if axis is not None and dim % mesh.shape[axis]:
                    raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by mesh axis "
                                     f"{axis!r} of size {mesh.shape[axis]} (rule {pattern!r} -> {spec})")
            return spec
    raise ValueError(f"{path}: no sharding rule matches")


def path_of(key_path) -> str:
    """A leaf's key path (dict keys, sequence indices, attribute names: optax states are tuples and namedtuples)
    as the dotted string the rules are searched in."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator=".")


def shardings(tree, mesh: Mesh, rules=FSDP_RULES):
    """A tree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs in any pytree: parameter dicts, train
    states with optax optimizer state, `sr.Models`), by the rule table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_of(path), tuple(leaf.shape), mesh, rules)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-first arrays: dimension 0 over every device, the rest replicated."""
    return NamedSharding(mesh, P(AXES, *([None] * (ndim - 1))))


def train_batch_shardings(batch, mesh: Mesh):
    """Shardings of a train step's batch, whose leaves are (grad_accum, batch, ...): the batch axis split over every
    device, the accumulation axis whole, since the step scans over it on every device."""
    devices = mesh.size

    def one(path, leaf):
        if len(leaf.shape) < 2 or leaf.shape[1] % devices:
            raise ValueError(f"train batch {path_of(path)!r}: shape {tuple(leaf.shape)} needs a batch axis (axis 1, "
                             f"after the accumulation axis) divisible by the mesh's {devices} devices")
        return NamedSharding(mesh, P(None, AXES, *([None] * (len(leaf.shape) - 2))))

    return jax.tree_util.tree_map_with_path(one, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def jit_train_step(loss_fn: Callable, optim: train.OptimConfig, mesh: Mesh, state, frozen, batch,
                   rules=FSDP_RULES):
    """`train.make_step` with in/out shardings from the rule table for `mesh`.

    `state`, `frozen` and `batch` (arrays or ShapeDtypeStructs) give the trees' structure and shapes. The state comes
    back sharded as it went in, so a second call reuses the first call's program; metrics are replicated. Place the
    arguments with `place` and `train_batch_shardings`.
    """
    state_shardings = shardings(state, mesh, rules)
    metrics = jax.eval_shape(train.train_step(loss_fn, optim), state, frozen, batch)[1]
    in_shardings = (state_shardings, shardings(frozen, mesh, rules), train_batch_shardings(batch, mesh))
    out_shardings = (state_shardings, jax.tree.map(lambda _: replicated(mesh), metrics))
    return train.make_step(loss_fn, optim, (in_shardings, out_shardings))


def place(tree, mesh: Mesh, rules=FSDP_RULES):
    """`tree` on `mesh`, sharded by the rule table."""
    return jax.device_put(tree, shardings(tree, mesh, rules))
