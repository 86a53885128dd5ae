"""foa_jax.models.kernels: every attention kernel against a direct float64 softmax, the chunked kernel's plans, the
platform's picks, and the "cpu" operation set against the "reference" one through whole models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from foa_jax.models import flux2, kernels, layers, lpips, vae

ON_GPU = jax.default_backend() == "gpu"
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention runs on a GPU only")

ATTN_SHAPE = (2, 37, 4, 16)  # B, S, H, Dh: 37 tokens is no multiple of any chunk (chunks are multiples of 8)
TINY_BUDGET = 2 * 2 * 37 * 8 * 8  # float64 scores of 2 heads x 8 rows: 5 chunks of 8 rows, heads in 2 groups of 2
# (score budget, saved-scores budget): the three plans of `kernels.attention_plan`.
ATTN_PLANS = {"chunks and head groups, recomputed": (TINY_BUDGET, 0), "one padded chunk, recomputed": (None, 0),
              "one chunk, probabilities saved": (None, None)}


def _attn_inputs(dtype, seed=0, head_dim=ATTN_SHAPE[3]):
    rng = np.random.default_rng(seed)
    shape = (*ATTN_SHAPE[:3], head_dim)
    q, k, v = (2.0 * rng.standard_normal(shape) for _ in range(3))  # x2: peaked softmax rows
    weights = rng.standard_normal((*shape[:2], shape[2] * shape[3]))
    return [a.astype(dtype) for a in (q, k, v)], weights.astype(dtype)


def _torch_attention_and_grads(q, k, v, weights):
    """Direct softmax(q·kᵀ/√d)·v in float64 torch and the gradients of sum(out · weights) (a random linear map)."""
    tq, tk, tv = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", tq, tk) / np.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), tv).reshape(*q.shape[:2], -1)
    (out * torch.from_numpy(np.asarray(weights, np.float64))).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]


def _jax_attention_and_grads(q, k, v, weights, plan):
    """The forward on its own and the gradients of sum(out · weights), compiled as one program (one compile)."""
    def linear_functional(q, k, v):
        return jnp.sum(kernels.chunked_attention(q, k, v, *plan).astype(weights.dtype) * weights)

    def both(q, k, v):
        return kernels.chunked_attention(q, k, v, *plan), jax.grad(linear_functional, argnums=(0, 1, 2))(q, k, v)

    out, grads = jax.jit(both)(q, k, v)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in grads]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, jnp.bfloat16])
def test_fusion_boundary_is_the_identity(dtype):
    with jax.enable_x64(dtype == np.float64):
        x = jnp.asarray(np.random.default_rng(0).standard_normal(64) * 10.0 ** np.arange(-8, 8, 0.25), dtype)
        x = jnp.concatenate([x, jnp.asarray([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40], dtype)])
        y = jax.jit(kernels.fusion_boundary)(x)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8))  # bit for bit


def test_attention_plan_chunks_and_head_groups():
    b, s, h, _ = ATTN_SHAPE
    assert kernels.attention_plan(b, h, s, s, 8, TINY_BUDGET) == (2, 8, False)
    assert kernels.attention_plan(b, h, s, s, 8, 2 * b * h * 8 * s * 8) == (4, 16, False)  # 37 rows: 3 chunks of 16
    assert kernels.attention_plan(b, h, s, s, 8, 10**9) == (4, 40, False)  # one chunk, padded to 40 rows
    # Saved probabilities: one unpadded chunk when all scores fit the saved budget, exactly at the boundary.
    assert kernels.attention_plan(b, h, s, s, 8, TINY_BUDGET, b * h * s * s * 8) == (4, 37, True)
    assert kernels.attention_plan(b, h, s, s, 8, TINY_BUDGET, b * h * s * s * 8 - 1) == (2, 8, False)
    # The tiny preset's training step (batch 8, 256 + 256 + 4 tokens, 4 heads): 34 MB of float32 scores, saved.
    assert kernels.attention_plan(8, 4, 516, 516, 4, kernels.SCORE_BUDGET_BYTES,
                                 kernels.SAVED_SCORES_BUDGET_BYTES) == (4, 516, True)
    # The small benchmark config (4 heads, 1024 + 1024 + 64 tokens): 71 MB saved; recomputed, 4 chunks of 528 rows,
    # 17.0 MiB of scores.
    assert kernels.attention_plan(1, 4, 2112, 2112, 4, kernels.SCORE_BUDGET_BYTES,
                                 kernels.SAVED_SCORES_BUDGET_BYTES) == (4, 2112, True)
    assert kernels.attention_plan(1, 4, 2112, 2112, 4, kernels.SCORE_BUDGET_BYTES) == (4, 528, False)
    # FLUX.2-dev, 4096 target + 4096 reference + 512 text tokens (14.5 GB of scores, never saved): 8 rows of all 48
    # heads fit at batch 1; at batch 4 heads go in groups of 16 (4·16·8·8704·4 B = 17.0 MiB).
    for batch, group in ((1, 48), (4, 16)):
        assert kernels.attention_plan(batch, 48, 8704, 8704, 4, kernels.SCORE_BUDGET_BYTES,
                                     kernels.SAVED_SCORES_BUDGET_BYTES) == (group, 8, False)
    for batch, heads, length in ((1, 4, 2112), (1, 48, 8704), (4, 48, 8704), (3, 5, 1000), (1, 1, 7)):
        group, chunk, save = kernels.attention_plan(batch, heads, length, length, 4, kernels.SCORE_BUDGET_BYTES)
        count = -(-length // chunk)
        assert not save and chunk % 8 == 0 and heads % group == 0 and count * chunk - length < 8 * count
        assert batch * group * chunk * length * 4 <= kernels.SCORE_BUDGET_BYTES


@pytest.mark.parametrize("precision,tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("plan", ATTN_PLANS)
@pytest.mark.parametrize("head_dim", [ATTN_SHAPE[3], kernels.TRANSPOSED_KEY_GRADS_MIN_HEAD_DIM])
def test_chunked_attention_and_gradients_match_direct_softmax(precision, tol, plan, head_dim):
    """Both layouts of the backward's dK and dV (`kernels._key_side_grad`: narrow heads direct, wide transposed)."""
    with jax.enable_x64(precision == "float64"):
        (q, k, v), weights = _attn_inputs(np.dtype(precision), head_dim=head_dim)
        out, grads = _jax_attention_and_grads(q, k, v, weights, ATTN_PLANS[plan])
    expected, expected_grads = _torch_attention_and_grads(q, k, v, weights)
    scale = np.max(np.abs(expected))
    print(f"{precision} {plan} Dh={head_dim}: max abs diff out {np.max(np.abs(out - expected)):.2e}")
    assert np.max(np.abs(out - expected)) <= tol * scale
    for name, got, want in zip("qkv", grads, expected_grads):
        print(f"  d{name} max abs diff {np.max(np.abs(got - want)):.2e} (max |d{name}| {np.max(np.abs(want)):.2e})")
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))


@pytest.mark.parametrize("saved_budget", [0, None])
def test_chunked_attention_bf16_runs_and_is_close(saved_budget):
    (q, k, v), weights = _attn_inputs(np.float32)
    expected, expected_grads = _torch_attention_and_grads(q, k, v, weights)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    plan = (TINY_BUDGET // 2, saved_budget)  # float32 scores: the same chunks as float64 at TINY_BUDGET, or saved
    out, grads = _jax_attention_and_grads(*bf16, jnp.asarray(weights), plan)
    assert jax.eval_shape(kernels.chunked_attention, *bf16).dtype == jnp.bfloat16
    for got, want in zip([out, *grads], [expected, *expected_grads]):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 0.02, rel




@pytest.mark.parametrize("impl", ["chunked", "xla", pytest.param("cudnn", marks=GPU_ONLY)])
def test_every_attention_kernel_matches_direct_softmax(impl):
    """Through the dispatcher: "chunked" and "xla" in float32 (the "xla" softmax is float32 whatever the inputs),
    "cudnn" in bf16 on a GPU, output and gradients against the float64 torch softmax."""
    (q, k, v), weights = _attn_inputs(np.float32, head_dim=32)
    expected, expected_grads = _torch_attention_and_grads(q, k, v, weights)
    dtype, tol = (jnp.bfloat16, 2e-2) if impl == "cudnn" else (jnp.float32, 2e-5)
    args = [jnp.asarray(a, dtype) for a in (q, k, v)]

    def functional(q, k, v):
        return jnp.sum(kernels.attention(q, k, v, impl).astype(jnp.float32) * weights)

    out = jax.jit(kernels.attention, static_argnums=3)(*args, impl)
    grads = jax.jit(jax.grad(functional, argnums=(0, 1, 2)))(*args)
    assert out.dtype == dtype and out.shape == expected.shape
    for got, want in zip([out, *grads], [expected, *expected_grads]):
        got = np.asarray(got, np.float64)
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))


def test_unknown_attention_kernel_is_an_error():
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match=r"impl must be one of \('xla', 'cudnn', 'chunked'\), got 'flash'"):
        kernels.attention(q, q, q, "flash")


def test_platform_defaults():
    assert kernels.default_attention("cpu", "bfloat16", 128) == "chunked"
    assert kernels.default_attention("gpu", "bfloat16", 128) == "cudnn"
    assert kernels.default_attention("gpu", "float32", 128) == "xla"
    assert kernels.default_attention("gpu", "bfloat16", 512) == "xla"  # the VAE's one wide head
    assert kernels.default_attention("gpu", None, 64) == "xla"  # dtype not fixed by the config (the VAE)
    assert kernels.default_attention("tpu", "bfloat16", 128) == "xla"
    assert [kernels.default_ops(p) for p in ("cpu", "gpu", "tpu")] == ["cpu", "reference", "reference"]


def test_configs_pick_kernels_when_made_and_say_so(monkeypatch):
    here = kernels.platform()
    config = flux2.Flux2Config()
    assert (config.attention, config.kernels) == (kernels.default_attention(here, "float32", 128),
                                                  kernels.default_ops(here))
    assert config.describe() == (f"Flux2Config: attention {config.attention} (platform default), "
                                 f"kernels {config.kernels} (platform default)")
    monkeypatch.setattr(kernels, "platform", lambda: "gpu")
    gpu = flux2.preset("flux2-dev", dtype="bfloat16")
    assert (gpu.attention, gpu.kernels) == ("cudnn", "reference")
    assert gpu.replace(dtype="float32").attention == "xla", "a picked kernel is picked again for the new dtype"
    explicit = gpu.replace(attention="xla", kernels="cpu")
    assert explicit.replace(dtype="bfloat16").attention == "xla"
    assert explicit.describe() == "Flux2Config: attention xla, kernels cpu"
    assert (vae.VAEConfig.preset("tiny").attention, vae.VAEConfig.preset("tiny").kernels) == ("xla", "reference")
    assert flux2.PRESETS["tiny"].attention == "xla", "presets are made when read"
    assert "attention" not in vae.VAEConfig().to_diffusers() and "kernels" not in gpu.to_diffusers()


@pytest.mark.parametrize("make,match", [
    (lambda: flux2.Flux2Config(attention="cudnn"), r"attention 'cudnn' needs dtype in \('bfloat16', 'float16'\)"),
    (lambda: flux2.Flux2Config(attention="flash"), "Flux2Config.attention must be one of"),
    (lambda: vae.VAEConfig(kernels="gpu"), "VAEConfig.kernels must be one of"),
    (lambda: layers.channel_dot(jnp.ones(2), jnp.ones(2), "fast"), "kernels must be one of"),
])
def test_kernel_names_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tracing_reads_no_platform(monkeypatch):
    """Made configs carry their choice: tracing the transformer, the VAE and LPIPS never asks for the platform."""
    t_config, v_config = flux2.preset("tiny"), vae.VAEConfig.preset("tiny")

    def asked():
        raise AssertionError("the platform was read while tracing")

    monkeypatch.setattr(kernels, "platform", asked)
    x = jax.ShapeDtypeStruct((1, 2 * 4, t_config.in_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 3, t_config.joint_attention_dim), jnp.float32)
    params = jax.eval_shape(lambda: flux2.init(t_config, jax.random.key(0)))
    ids = np.zeros((8, 4), np.int32)
    jax.eval_shape(lambda p, x, c: flux2.apply(p, t_config, x, c, jnp.ones(1), ids, np.zeros((3, 4), np.int32)),
                   params, x, ctx)
    images = jax.ShapeDtypeStruct((1, 32, 32, v_config.in_channels), jnp.float32)
    v_params = jax.eval_shape(lambda: vae.init(v_config, jax.random.key(0)))
    jax.eval_shape(lambda p, x: vae.decode(p, v_config, vae.encode(p, v_config, x)), v_params, images)
    rgb = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    jax.eval_shape(lambda p, x: lpips.lpips_distance(p, "vgg", x, x), lpips.param_shapes("vgg"), rgb)


# ---------------------------------------------------------------------- the "cpu" operations against the reference


def _assert_close(got, want, tol, what):
    """Each leaf within `tol` of its largest entry, or of a thousandth of the tree's largest for leaves whose exact
    value is (near) zero, such as the gradient of an attention key bias (softmax ignores it)."""
    leaves = [np.asarray(b, np.float64) for b in jax.tree.leaves(want)]
    floor = 1e-3 * max(np.max(np.abs(b)) for b in leaves)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), leaves, strict=True):
        scale = max(np.max(np.abs(b)), floor)
        assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= tol * scale, f"{what} {jax.tree_util.keystr(path)}"


def _numpy_tree(shapes, draw):
    """float32 arrays `draw(path, shape)` in the structure of a tree of ShapeDtypeStructs."""
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(draw(path, s.shape), jnp.float32), shapes)


def test_transformer_cpu_kernels_equal_reference():
    """The tiny transformer (one block of each kind) with a LoRA, "chunked" + "cpu" against "xla" + "reference":
    output and the adapter's gradient, float32."""
    from foa_jax import lora as lora_lib
    from foa_jax import sampling

    cpu = flux2.preset("tiny", num_layers=1, num_single_layers=1, attention="chunked", kernels="cpu")
    reference = cpu.replace(attention="xla", kernels="reference")
    rng = np.random.default_rng(0)
    # flux2.init's and lora_lib.init's distributions drawn by NumPy (no compile of one random draw per leaf);
    # B = 0.01, not 0, so the adapter's products count.
    params = _numpy_tree(jax.eval_shape(lambda: flux2.init(cpu, jax.random.key(0))), lambda path, shape: (
        np.ones(shape) if path[-1].key == "scale" else rng.standard_normal(shape) / np.sqrt(shape[-2])))
    adapter = _numpy_tree(jax.eval_shape(lambda: lora_lib.init(params, lora_lib.LoRAConfig(rank=4),
                                                               jax.random.key(1))), lambda path, shape: (
        np.full(shape, 0.01) if path[-2].key == "lora_B"
        else rng.uniform(-1, 1, shape) / np.sqrt(shape[-2]) + 0.01))
    img_ids, txt_ids = sampling.image_ids((2, 3), [(2, 3)]), sampling.text_ids(5)
    x = jnp.asarray(rng.standard_normal((2, len(img_ids), cpu.in_channels)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, cpu.joint_attention_dim)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, len(img_ids), cpu.out_dim)), jnp.float32)

    def run(config):
        def functional(a):
            out = flux2.apply(params, config, x, ctx, jnp.asarray([0.3, 0.9]), img_ids, txt_ids, jnp.ones(2),
                              lora=a, lora_scale=0.5)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(functional, has_aux=True))(adapter)

    (_, out), grads = run(cpu)
    (_, want_out), want_grads = run(reference)
    _assert_close(out, want_out, 1e-5, "output")
    _assert_close(grads, want_grads, 1e-4, "gradient")


def test_vae_cpu_kernels_equal_reference():
    """A two-block VAE's decoder, "chunked" + "cpu" (Eigen-routed convolutions) against "xla" + "reference": output
    and the gradients of the latents and of every weight."""
    cpu = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        attention="chunked", kernels="cpu")
    reference = cpu.replace(attention="xla", kernels="reference")
    params = vae.init(cpu, jax.random.key(0))
    rng = np.random.default_rng(1)
    latents = jnp.asarray(rng.standard_normal((1, 8, 12, cpu.latent_channels)), jnp.float32)

    def run(config):
        def functional(p, z):
            out = vae.decode(p, config, z)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.value_and_grad(functional, argnums=(0, 1), has_aux=True))(params, latents)

    (_, out), grads = run(cpu)
    (_, want_out), want_grads = run(reference)
    _assert_close(out, want_out, 1e-5, "output")
    _assert_close(grads, want_grads, 1e-4, "gradient")


def test_lpips_cpu_kernels_equal_reference():
    """LPIPS-Alex on weights prepared for the "cpu" kernels (precomputed input-gradient and Winograd kernels, Eigen
    routing, contractions) against the reference on the raw weights: distance and image gradient. Prepared weights
    select the "cpu" kernels by themselves. (LPIPS-VGG's prepared path is checked against torch in test_lpips.)"""
    net = "alex"
    rng = np.random.default_rng(2)
    raw = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])),
                                             jnp.float32), lpips.param_shapes(net))
    prepared = layers.with_frozen_conv_kernels(raw, "cpu")
    assert layers.holds_frozen_conv_kernels(prepared) and not layers.holds_frozen_conv_kernels(raw)
    assert layers.with_frozen_conv_kernels(raw, "reference") is raw
    x, y = (jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 3)), jnp.float32) for _ in range(2))

    def functional(params, kernels_name):
        return lambda x: jnp.sum(lpips.lpips_distance(params, net, x, y, kernels_name))

    assert str(jax.make_jaxpr(functional(prepared, None))(x)) == str(jax.make_jaxpr(functional(prepared, "cpu"))(x))
    got, want = (jax.jit(jax.value_and_grad(functional(p, None)))(x) for p in (prepared, raw))
    _assert_close(got, want, 1e-5, net)
