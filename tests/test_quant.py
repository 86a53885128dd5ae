"""foa_jax.quant: 8-bit weight storage of the frozen base with per-output-channel scales, its products inside
`layers.linear` against the dequantised kernel in float64, and the transformer's error against bf16 at two widths
(run with `pytest -s` to see the figures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import lora as lora_lib
from foa_jax import quant, sampling
from foa_jax.models import flux2, layers

CODES = ["int8", "float8_e4m3fn"]


@pytest.mark.parametrize("dtype", CODES)
def test_quantize_kernel_uses_each_columns_range(dtype):
    """Codes times scales give the kernel back to the code format's resolution, each column's largest weight on the
    largest code; an all-zero column gets scale 1."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 16, 5)) * np.array([1e-3, 1.0, 30.0, 0.2, 0.0])  # (layers, in, out) columns apart
    q = quant.quantize_kernel(jnp.asarray(w, jnp.float32), dtype)
    assert q["kernel"].dtype == jnp.dtype(dtype) and q["kernel"].shape == w.shape and q["kernel_scale"].shape == (3, 5)
    codes = np.asarray(q["kernel"], np.float64)
    np.testing.assert_allclose(np.max(np.abs(codes[..., :4]), axis=-2), quant.CODE_MAX[dtype])
    assert np.all(codes[..., 4] == 0) and np.all(np.asarray(q["kernel_scale"])[:, 4] == 1)
    back = codes * np.asarray(q["kernel_scale"], np.float64)[:, None, :]
    step = 0.5 / 127 if dtype == "int8" else 2.0 ** -4  # half a code step, relative to the column peak (e4m3: 3 bits)
    peak = np.max(np.abs(w), axis=-2, keepdims=True)
    assert np.all(np.abs(back - w) <= step * np.where(peak > 0, peak, 1) * (1 + 1e-6))


@pytest.mark.parametrize("dtype", CODES)
@pytest.mark.parametrize("pieces", [False, True])
def test_linear_products_equal_the_dequantised_kernel(dtype, pieces):
    """`layers.linear` (and the "cpu" `linear_pieces`) on codes + scales equals float64 NumPy on codes · scales,
    with a LoRA branch; the kernel gradient is not asked for (the base is frozen) but the input's is."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)
    p = quant.quantize_kernel(w, dtype)
    lora = {"lora_A": {"kernel": jnp.asarray(rng.standard_normal((12, 2)), jnp.float32)},
            "lora_B": {"kernel": jnp.asarray(rng.standard_normal((2, 10)), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((3, 4, 12)), jnp.float32)
    dense = np.asarray(p["kernel"], np.float64) * np.asarray(p["kernel_scale"], np.float64)
    a, b = (np.asarray(lora[k]["kernel"], np.float64) for k in ("lora_A", "lora_B"))
    want = np.asarray(x, np.float64) @ dense + 0.5 * (np.asarray(x, np.float64) @ a) @ b

    def run(x):
        if pieces:
            return jnp.concatenate(layers.linear_pieces(p, [x[..., :5], x[..., 5:]], [3, 7], lora, 0.5, "cpu"), -1)
        return layers.linear(p, x, lora, 0.5)

    got, back = jax.vjp(run, x)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    cotangent = rng.standard_normal(want.shape)
    want_dx = cotangent @ (dense + 0.5 * a @ b).T
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(cotangent, jnp.float32))[0]), want_dx, rtol=1e-5,
                               atol=1e-5)


def test_quantize_keeps_the_tree_and_halves_the_kernels():
    config = flux2.preset("tiny")
    params = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0), jnp.bfloat16))
    q = jax.eval_shape(lambda p: quant.quantize(p, "int8"), params)
    assert q["transformer_blocks"]["attn"]["to_q"]["kernel"].dtype == jnp.int8
    assert q["transformer_blocks"]["attn"]["to_q"]["kernel_scale"].shape == (config.num_layers, config.inner_dim)
    assert q["transformer_blocks"]["attn"]["norm_q"]["scale"].dtype == jnp.bfloat16
    assert lora_lib.target_modules(q, lora_lib.LoRAConfig()) == lora_lib.target_modules(params, lora_lib.LoRAConfig())
    assert quant.nbytes(q) < 0.55 * quant.nbytes(params)
    with pytest.raises(ValueError, match="base dtype must be one of"):
        quant.quantize(params, "int4")


# The tiny preset and a small FLUX.2-shaped width (128-wide heads), forward with a LoRA as a training step runs it.
WIDTHS = {"tiny": {}, "small": dict(num_attention_heads=4, attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32),
                                    num_layers=1, num_single_layers=2, joint_attention_dim=256)}
BOUNDS = {"int8": 0.02, "float8_e4m3fn": 0.06}  # relative L2 error of the output against the bf16 base


def numpy_init(config, rng):
    """`flux2.init`'s distribution (LeCun-normal kernels, unit norm scales) drawn by NumPy: the same weights in
    kind without compiling one random draw per leaf."""
    def make(path, shape):
        if path[-1].key == "scale":
            return jnp.ones(shape.shape, jnp.float32)
        return jnp.asarray(rng.standard_normal(shape.shape, np.float32) / np.sqrt(shape.shape[-2]))

    return jax.tree_util.tree_map_with_path(make, jax.eval_shape(lambda: flux2.init(config, jax.random.key(0))))


def numpy_adapter(params, config, rng):
    """`lora_lib.init`'s adapter (A ~ U(±1/sqrt(in)), B = 0) moved by 0.01 everywhere, so the LoRA branch counts."""
    def make(path, shape):
        if path[-2].key == "lora_B":
            return jnp.full(shape.shape, 0.01, jnp.float32)
        bound = 1.0 / np.sqrt(shape.shape[-2])
        return jnp.asarray(rng.uniform(-bound, bound, shape.shape).astype(np.float32) + 0.01)

    return jax.tree_util.tree_map_with_path(make, jax.eval_shape(lambda: lora_lib.init(params, config,
                                                                                       jax.random.key(1))))


@pytest.mark.parametrize("width", WIDTHS)
def test_transformer_error_against_bf16(width):
    """Relative L2 distance of the velocity from an 8-bit base to that from the bf16 base, both computing in bf16;
    the bf16 base's own distance to float32 is printed beside it for scale. (Plain kernels and rolled scans: the
    error is the weights', and these compile fastest.)"""
    config = flux2.preset("tiny", attention="xla", kernels="reference", scan_unroll=1, **WIDTHS[width])
    rng = np.random.default_rng(2)
    params = numpy_init(config, rng)
    adapter = numpy_adapter(params, lora_lib.LoRAConfig(rank=8), rng)
    quantize = jax.jit(quant.quantize, static_argnums=1)
    img_ids, txt_ids = sampling.image_ids((4, 4), [(4, 4)]), sampling.text_ids(8)
    x = jnp.asarray(rng.standard_normal((2, len(img_ids), config.in_channels)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 8, config.joint_attention_dim)), jnp.float32)

    def run(base, cfg):
        return np.asarray(jax.jit(lambda p: flux2.apply(p, cfg, x, ctx, jnp.asarray([0.2, 0.8]), img_ids, txt_ids,
                                                        jnp.ones(2), lora=adapter, lora_scale=1.0))(base),
                          np.float64)

    bf16_config = config.replace(dtype="bfloat16")
    exact = run(params, config)
    bf16 = run(quantize(params, "bfloat16"), bf16_config)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"\n{width} (inner dim {config.inner_dim}): bf16 base vs float32 {rel(bf16, exact):.2e}")
    for dtype in CODES:
        base = quantize(params, dtype)
        out = run(base, bf16_config)
        print(f"  {dtype} base vs bf16 base {rel(out, bf16):.2e} (vs float32 {rel(out, exact):.2e}), "
              f"base {quant.nbytes(base) / quant.nbytes(quantize(params, 'bfloat16')):.2f} of bf16's bytes")
        assert rel(out, bf16) < BOUNDS[dtype]
