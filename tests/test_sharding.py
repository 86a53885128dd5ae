"""FSDP rule table: the tiny preset's forward and train steps on 8 forced host devices match one device; the real
preset shards on paper; train states and batches get their shardings.

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


def _tiny_models():
    """The tiny preset's models, one block of each kind (the stacks are scanned: depth changes no sharding)."""
    from foa_jax import sr
    from foa_jax.models import flux2, vae

    config = flux2.preset("tiny", num_layers=1, num_single_layers=1, scan_unroll=1)
    v_config = vae.VAEConfig.preset("tiny")
    prompt = np.random.default_rng(3).standard_normal((1, 4, config.joint_attention_dim)).astype(np.float32)
    return sr.Models(flux2.init(config, jax.random.key(0)), vae.init(v_config, jax.random.key(1)), prompt, config,
                     v_config)


def _two_steps(step, state, frozen, batch):
    """Metrics of two calls and the final trainable tree, as NumPy."""
    metrics = []
    for _ in range(2):
        state, m = step(state, frozen, batch)
        metrics.append(jax.device_get(m))
    return metrics, jax.device_get(state["params"])


def _compare(name, single, sharded, step):
    (m1, p1), (m8, p8) = single, sharded
    loss = max(abs(float(a["loss"]) - float(b["loss"])) for a, b in zip(m1, m8))
    params = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                 for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(f"{name}: 2 steps on {DEVICES} devices vs one: loss {loss:.1e}, trained weights {params:.1e}, "
          f"{step._cache_size()} compilation(s)")
    assert loss <= 1e-5 and params <= 1e-5
    assert step._cache_size() == 1, "the second call recompiled"


def check_tiny_train_steps_sharded_equal_single_device():
    """Tiny SFT (the whole transformer trains, flow matching as the tiny preset) and DPO (a LoRA against the base,
    two accumulated micro-batches) steps on a (data 2, fsdp 4) mesh against one device. The policy starts away from
    the base and β is 10: the margin is a difference of float32 errors near 3, whose rounding (~1e-7) β multiplies."""
    from foa_jax import dpo, losses, lora as lora_lib, sr, train

    assert len(jax.devices()) == DEVICES
    models = _tiny_models()
    grid, rng = (2, 2), np.random.default_rng(0)
    channels = models.transformer_config.in_channels
    size = grid[0] * models.vae_config.token_factor
    mesh = sharding.make_mesh(data=2, fsdp=4)

    def run(loss_fn, optim, trainable, frozen, batch):
        single = _two_steps(train.make_step(loss_fn, optim),
                            train.init_state(trainable, optim, jax.random.key(5)), frozen, batch)
        state = sharding.place(train.init_state(trainable, optim, jax.random.key(5)), mesh)
        step = sharding.jit_train_step(loss_fn, optim, mesh, state, frozen, batch)
        sharded_batch = jax.device_put(batch, sharding.train_batch_shardings(batch, mesh))
        return single, _two_steps(step, state, sharding.place(frozen, mesh), sharded_batch), step

    tokens = lambda n: rng.standard_normal((n, 8, grid[0] * grid[1], channels)).astype(np.float32)  # noqa: E731
    sft_batch = {"z": tokens(1), "cond": tokens(1), "hr": rng.uniform(size=(1, 8, size, size, 3)).astype(np.float32)}
    sft = sr.sft_loss("full", losses.SFTLossConfig(lambda_pix=0.0, lambda_lpips=0.0), grid)
    optim = train.OptimConfig(lr=1e-4, warmup=1, weight_decay=0.0)
    single, sharded, step = run(sft, optim, models.transformer, {"models": models.replace(transformer=None),
                                                                 "lpips": None}, sft_batch)
    _compare("SFT", single, sharded, step)

    policy = lora_lib.init(models.transformer, lora_lib.LoRAConfig(rank=4), jax.random.key(6))
    policy = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(7), a.shape), policy)
    dpo_batch = {"z_w": tokens(2), "z_l": tokens(2), "cond": tokens(2)}
    dpo_loss = sr.dpo_loss(dpo.DPOConfig(beta=10.0), grid)
    optim = train.OptimConfig(lr=1e-4, warmup=1, weight_decay=0.0, grad_accum=2)
    single, sharded, step = run(dpo_loss, optim, policy, {"models": models, "reference": None}, dpo_batch)
    _compare("DPO", single, sharded, step)


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


def test_tiny_train_steps_on_8_devices_match_single_device():
    out = _run_forced("check_tiny_train_steps_sharded_equal_single_device")
    assert "SFT: 2 steps" in out and "DPO: 2 steps" in out, out


def test_train_state_shardings_follow_the_parameter_rules():
    """Optimizer moments (inside optax's tuples and namedtuples) get their parameter's spec, counters and keys are
    replicated; a frozen base nested in a dict and int8 codes keep the stacked-kernel rule; their scales replicate."""
    import jax.numpy as jnp

    from foa_jax import lora as lora_lib, quant, train
    from foa_jax.models import flux2

    mesh = sharding.make_mesh(data=1, fsdp=1)
    config = flux2.preset("tiny")
    base = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0)))
    adapter = jax.eval_shape(lambda: lora_lib.init(base, lora_lib.LoRAConfig(rank=4), jax.random.key(1)))
    optim = train.OptimConfig()
    state = jax.eval_shape(lambda a: {"step": jnp.zeros((), jnp.int32), "params": a,
                                      "opt_state": optim.optimizer().init(a), "key": jax.random.key(0)}, adapter)
    specs = {sharding.path_of(path): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(sharding.shardings(state, mesh))}
    assert specs["opt_state.1.0.mu.transformer_blocks.attn.to_q.lora_A.kernel"] == P(None, "fsdp", None)
    assert specs["opt_state.1.0.nu.single_transformer_blocks.attn.to_out.lora_B.kernel"] == P(None, None, "fsdp")
    assert specs["opt_state.1.0.count"] == P() and specs["step"] == P() and specs["key"] == P()
    frozen = {"transformer": jax.eval_shape(lambda p: quant.quantize(p, "int8"), base)}
    specs = {sharding.path_of(path): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(sharding.shardings(frozen, mesh))}
    assert specs["transformer.transformer_blocks.attn.to_q.kernel"] == P(None, "fsdp", None)
    assert specs["transformer.transformer_blocks.attn.to_q.kernel_scale"] == P()
    assert specs["transformer.x_embedder.kernel"] == P("fsdp", None)


def test_train_batches_never_split_the_accumulation_axis():
    mesh = sharding.make_mesh(data=1, fsdp=1)
    got = sharding.train_batch_shardings({"z": jax.ShapeDtypeStruct((8, 2, 16, 4), np.float32)}, mesh)
    assert got["z"].spec == P(None, ("data", "fsdp"), None, None)
    fake = type("FakeMesh", (), {"size": 4})()  # train_batch_shardings reads the device count first
    with pytest.raises(ValueError, match=r"train batch 'cond': shape \(8, 2, 16\) needs a batch axis"):
        sharding.train_batch_shardings({"cond": jax.ShapeDtypeStruct((8, 2, 16), np.float32)}, fake)
