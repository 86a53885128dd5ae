"""Sharding by rule table: regular expressions over parameter paths -> PartitionSpecs on a ("data", "fsdp") mesh.

FLUX.2-dev is 32B parameters (64 GB in bf16): it does not fit one accelerator with activations, so parameters are
fully sharded (FSDP) over the `fsdp` axis and gathered by XLA per scanned layer, while the batch is split over both
axes. The rules are data, as in big_vision and MaxText: the model code never mentions devices, and a LoRA tree or
optimizer state is sharded by the same table because its paths follow the same names.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from foa_jax import params as PARAMS

AXES = ("data", "fsdp")
BATCH = P(AXES)  # leading (batch) dimension split over every device

# First match wins. Stacked block kernels are (layers, in, out): shard `in`, keep the scanned layer axis whole so
# `lax.scan` slices a layer locally. LoRA factors shard their full-size side. Norm scales are tiny: replicate.
FSDP_RULES: tuple[tuple[str, P], ...] = (
    (r".*lora_A\.kernel$", P(None, "fsdp", None)),
    (r".*lora_B\.kernel$", P(None, None, "fsdp")),
    (r"^(transformer_blocks|single_transformer_blocks)\..*\.kernel$", P(None, "fsdp", None)),
    (r".*\.scale$", P()),
    (r".*\.kernel$", P("fsdp", None)),
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
    """The PartitionSpec of one parameter; a sharded dimension must divide evenly by its mesh axis."""
    for pattern, spec in rules:
        if re.match(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"{path}: rule {pattern!r} -> {spec} has more dimensions than shape {shape}")
            for dim, axis in zip(shape, spec):
                if axis is not None and dim % mesh.shape[axis]:
                    raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by mesh axis "
                                     f"{axis!r} of size {mesh.shape[axis]} (rule {pattern!r} -> {spec})")
            return spec
    raise ValueError(f"{path}: no sharding rule matches")


def shardings(tree, mesh: Mesh, rules=FSDP_RULES):
    """A tree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs), by the rule table."""
    flat = PARAMS.flatten(tree)
    return PARAMS.unflatten({path: NamedSharding(mesh, spec_for(path, tuple(leaf.shape), mesh, rules))
                             for path, leaf in flat.items()})


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-first arrays: dimension 0 over every device, the rest replicated."""
    return NamedSharding(mesh, P(AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
