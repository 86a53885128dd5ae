"""FSDP rule table: the tiny preset on 8 forced host devices matches one device; the real preset shards on paper.

JAX fixes its device count at start-up, so the multi-device checks run in a fresh interpreter with
`--xla_force_host_platform_device_count=8`.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from foa_jax import sharding

DEVICES = 8


def _run_forced(function_name: str) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    code = f"import tests.test_sharding as t; t.{function_name}()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def check_tiny_forward_sharded_equals_single_device():
    import jax.numpy as jnp

    from foa_jax import sampling
    from foa_jax.models import flux2

    assert len(jax.devices()) == DEVICES
    config = flux2.preset("tiny")
    params = flux2.init(config, jax.random.key(0))
    img_ids, txt_ids = sampling.image_ids((4, 6), [(4, 6)]), sampling.text_ids(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, len(img_ids), config.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((8, 4, config.joint_attention_dim)).astype(np.float32)
    t = rng.uniform(size=8).astype(np.float32)
    g = np.full(8, 1.0, np.float32)

    def forward(p, x, ctx, t, g):
        return flux2.apply(p, config, x, ctx, t, img_ids, txt_ids, g)

    single = jax.jit(forward)(params, x, ctx, t, g)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    p_shard = sharding.shardings(params, mesh)
    batch = [sharding.batch_sharding(mesh, a.ndim) for a in (x, ctx, t, g)]
    sharded_fn = jax.jit(forward, in_shardings=(p_shard, *batch), out_shardings=sharding.batch_sharding(mesh, 3))
    params_on_mesh = jax.device_put(params, p_shard)
    kernel = params_on_mesh["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (2, 128 // 4, 128), "stacked kernels shard their input dim"
    out = sharded_fn(params_on_mesh, *(jax.device_put(a, s) for a, s in zip((x, ctx, t, g), batch)))
    assert len(out.sharding.device_set) == DEVICES
    diff = float(jnp.max(jnp.abs(out - single)))
    print(f"max abs diff sharded vs single device: {diff:.3e}")
    assert diff <= 1e-5


def check_flux2_dev_shards_on_paper():
    import jax.numpy as jnp

    from foa_jax import params as PARAMS
    from foa_jax.models import flux2

    config = flux2.preset("flux2-dev")
    shapes = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0), jnp.bfloat16))
    mesh = sharding.make_mesh(data=1, fsdp=DEVICES)
    tree = sharding.shardings(shapes, mesh)
    per_device = 0
    for path, leaf in PARAMS.flatten(shapes).items():
        spec = PARAMS.flatten(tree)[path].spec
        shard = [d // (mesh.shape[a] if a else 1) for d, a in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim)]
        per_device += int(np.prod(shard)) * 2
    total = flux2.param_count(config) * 2
    print(f"flux2-dev bf16 parameters per device on {DEVICES}-way FSDP: {per_device / 2**30:.2f} GiB "
          f"of {total / 2**30:.2f} GiB")
    assert per_device < 1.01 * total / DEVICES


def test_tiny_forward_on_8_devices_matches_single_device():
    assert "max abs diff" in _run_forced("check_tiny_forward_sharded_equals_single_device")


def test_flux2_dev_parameters_shard_evenly_over_8_devices():
    assert "GiB" in _run_forced("check_flux2_dev_shards_on_paper")


def test_rules_pick_the_right_dimension():
    mesh = sharding.make_mesh(data=1, fsdp=1)
    assert sharding.spec_for("transformer_blocks.attn.to_q.kernel", (8, 64, 64), mesh) == P(None, "fsdp", None)
    assert sharding.spec_for("x_embedder.kernel", (128, 64), mesh) == P("fsdp", None)
    assert sharding.spec_for("transformer_blocks.attn.norm_q.scale", (8, 128), mesh) == P()
    assert sharding.spec_for("transformer_blocks.attn.to_q.lora_B.kernel", (8, 4, 64), mesh) == P(None, None, "fsdp")


def test_indivisible_dimension_is_an_error():
    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 3}})()  # spec_for reads only the axis sizes
    with pytest.raises(ValueError, match=r"dimension 64 of shape \(8, 64, 64\) is not divisible by mesh axis 'fsdp'"):
        sharding.spec_for("transformer_blocks.attn.to_q.kernel", (8, 64, 64), fake)
    with pytest.raises(ValueError, match="mesh data=2 x fsdp=1 = 2 devices"):
        sharding.make_mesh(data=2, fsdp=1)
