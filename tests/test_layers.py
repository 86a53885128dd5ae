"""foa_jax.models.layers: hand-written LayerNorm, RMSNorm and GroupNorm backward passes against plain autodiff, the
last-axis product sum they use against NumPy, and each "cpu" formulation (split products, Eigen-routed, Winograd and
precomputed-kernel convolutions) against the reference ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax.models import layers

EPS = 1e-6
KERNELS = pytest.mark.parametrize("kernels", layers.KERNELS)
CPU_HLO = pytest.mark.skipif(jax.default_backend() != "cpu",
                             reason="reads XLA:CPU's compiled program (YNNPACK fusions, Eigen convolutions)")


def plain_layer_norm(x):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) / jnp.sqrt(var + EPS)).astype(x.dtype)


def plain_rms_norm(scale, x):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = xf / jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + EPS)
    return (normed * scale.astype(xf.dtype)).astype(x.dtype)


def assert_vjp_matches(ours, plain, args, cotangent, tol):
    """Same output and same cotangent for every argument leaf (each relative to its largest entry), same dtypes."""
    out, back = jax.vjp(ours, *args)
    want_out, want_back = jax.vjp(plain, *args)
    assert out.dtype == want_out.dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(want_out, np.float64), atol=tol)
    for got, want in zip(jax.tree.leaves(back(cotangent)), jax.tree.leaves(want_back(cotangent)), strict=True):
        assert got.dtype == want.dtype
        norm = np.max(np.abs(np.asarray(want, np.float64)))
        np.testing.assert_allclose(np.asarray(got, np.float64) / norm, np.asarray(want, np.float64) / norm, atol=tol)


# bf16: the LayerNorm backward sees x̂ rounded to bf16 (it keeps the output), so it matches to bf16 precision.
PRECISIONS = [("float64", 1e-12), ("float32", 2e-5), ("bfloat16", 5e-2)]


def layer_norm_case(rng, shape, dtype, kernels):
    x = jnp.asarray(3 * rng.standard_normal(shape) + 1, dtype)
    return (lambda x: layers.layer_norm(x, EPS, kernels)), plain_layer_norm, (x,)


def rms_norm_case(rng, shape, dtype, kernels):
    """Gradients w.r.t. the input and the learned scale (summed over every leading axis)."""
    x = jnp.asarray(2 * rng.standard_normal(shape), dtype)
    scale = jnp.asarray(1 + 0.3 * rng.standard_normal(shape[-1]), dtype)
    ours, plain = (lambda p, x: layers.rms_norm(p, x, EPS, kernels)), (lambda p, x: plain_rms_norm(p["scale"], x))
    return ours, plain, ({"scale": scale}, x)


@KERNELS
@pytest.mark.parametrize("shape", [(1, 5, 8), (3, 4, 2, 16), (7, 1), (6,)])
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_channel_dot_is_the_last_axis_sum_of_products(shape, precision, tol, kernels):
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal(shape) for _ in range(2))
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        got = layers.channel_dot(jnp.asarray(x, dtype), jnp.asarray(y, dtype), kernels)
        assert got.shape == shape[:-1] + (1,) and got.dtype == dtype
        rounded = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, y)]
        want = np.sum(rounded[0] * rounded[1], axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.sqrt(shape[-1]))


@KERNELS
@pytest.mark.parametrize("case", [layer_norm_case, rms_norm_case])
@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 5, 3, 8)])
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_norm_backward_matches_autodiff(case, shape, precision, tol, kernels):
    rng = np.random.default_rng(0)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        ours, plain, args = case(rng, shape, dtype, kernels)
        assert_vjp_matches(ours, plain, args, jnp.asarray(rng.standard_normal(shape), dtype), tol)


def test_norms_keep_one_residual_each():
    """The point of the custom backward passes: a LayerNorm followed by a modulation keeps only its output and 1/σ,
    an RMSNorm its input and 1/rms (autodiff kept three full-size arrays each)."""
    x = jnp.ones((1, 8, 16))

    def block(x, p):
        return layers.rms_norm(p, layers.layer_norm(x, EPS) * 2.0, EPS)

    jaxpr = jax.make_jaxpr(lambda x, p: jax.vjp(block, x, p)[1])(x, {"scale": jnp.ones(16)})
    residuals = [v.aval.shape for v in jaxpr.jaxpr.outvars]
    full = [shape for shape in residuals if shape == (1, 8, 16)]
    assert len(full) == 2, residuals


def plain_group_norm(p, x, groups):
    """Textbook GroupNorm: centred two-pass variance over each group's channels and pixels."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    grouped = xf.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) / jnp.sqrt(var + EPS)).reshape(x.shape)
    return (normed * p["scale"].astype(xf.dtype) + p["bias"].astype(xf.dtype)).astype(x.dtype)


@pytest.mark.parametrize("shape,groups", [((2, 5, 6, 8), 4), ((1, 3, 4, 6), 2), ((2, 7, 16), 16)])
@pytest.mark.parametrize("offset", [0.0, 3.0])
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_group_norm_matches_two_pass_formula(shape, groups, offset, precision, tol):
    """Output and gradients (input, scale, bias) of the sum-based GroupNorm against autodiff of the centred two-pass
    formula, also for inputs whose mean is 3 standard deviations from zero (where E[x²] − E[x]² loses digits)."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        x = jnp.asarray(rng.standard_normal(shape) + offset, dtype)
        p = {"scale": jnp.asarray(1 + 0.3 * rng.standard_normal(shape[-1]), dtype),
             "bias": jnp.asarray(0.2 * rng.standard_normal(shape[-1]), dtype)}
        cotangent = jnp.asarray(rng.standard_normal(shape), dtype)
        assert_vjp_matches(lambda p, x: layers.group_norm(p, x, groups, EPS),
                           lambda p, x: plain_group_norm(p, x, groups), (p, x), cotangent, tol)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
        layers.group_norm({"scale": jnp.ones(6), "bias": jnp.zeros(6)}, jnp.ones((1, 2, 2, 6)), 4, EPS)


@pytest.mark.parametrize("kernel_hw,padding", [((3, 3), "SAME"), ((3, 3), "VALID"), ((3, 3), ((0, 1), (0, 1))),
                                               ((5, 3), ((4, 0), (2, 1))), ((1, 1), "SAME"),
                                               ((1, 1), ((1, 1), (0, 2)))])  # padding beyond the kernel
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_conv_with_input_grad_kernel_matches_autodiff(kernel_hw, padding, precision, tol):
    """Output and gradients w.r.t. the input and the kernel of a convolution that back-propagates through its
    precomputed input-gradient kernel, against autodiff of the plain convolution. The precomputed kernel is derived
    from the kernel inside the differentiated function, so its zero cotangent is checked too."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), dtype)
        kernel = jnp.asarray(rng.standard_normal((*kernel_hw, 3, 5)), dtype)
        bias = jnp.asarray(rng.standard_normal(5), dtype)
        out_shape = jax.eval_shape(lambda x: layers.conv2d({"kernel": kernel}, x, padding=padding), x).shape
        cotangent = jnp.asarray(rng.standard_normal(out_shape), dtype)

        def ours(x, k):
            module = layers.with_frozen_conv_kernels({"kernel": k, "bias": bias}, "cpu")
            return layers.conv2d(module, x, padding=padding, kernels="cpu")

        assert_vjp_matches(ours, lambda x, k: lax_conv(x, k, padding) + bias, (x, kernel), cotangent, tol)


def lax_conv(x, kernel, padding):
    """The reference: XLA's stride-1 convolution as JAX emits it, differentiated by autodiff."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def compiled_kinds(fn, *args) -> tuple[int, int]:
    """(YNNPACK fusions, plain convolutions (which XLA:CPU runs on Eigen)) in the compiled program of `fn`."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return text.count('"kind":"__ynn_fusion"'), text.count(" convolution(")


EIGEN_CASES = pytest.mark.parametrize("hw,cin,cout,padding,eigen", [
    (32, 16, 32, "SAME", True), (16, 32, 16, ((1, 1), (1, 1)), True), (12, 24, 20, ((2, 0), (1, 1)), True),
    (16, 64, 128, "SAME", False),  # more output channels than EIGEN_MAX_OUT_CHANNELS: YNNPACK threads these
    (16, 8, 32, "SAME", False),  # fewer than EIGEN_MIN_CHANNELS in
    (16, 16, 32, "VALID", False),  # the output cannot be made larger than the input without changing the padding
])


def _eigen_case(hw, cin, cout, padding):
    """(x, kernel, cotangent, forward on the "cpu" kernels, its input gradient) for one convolution shape."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, hw, hw + 2, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    out_shape = jax.eval_shape(lambda x: lax_conv(x, kernel, padding), x).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def forward(x, k):
        return layers.conv2d({"kernel": k}, x, padding=padding, kernels="cpu")

    def input_grad(x, k, dy):  # everything an argument: XLA would fold a convolution of constants
        return jax.vjp(lambda x: forward(x, k), x)[1](dy)[0]

    return x, kernel, cotangent, forward, input_grad


@EIGEN_CASES
def test_small_convolutions_on_eigen_have_the_same_values(hw, cin, cout, padding, eigen):
    """Stride-1 convolutions of the "cpu" kernels (those in the Eigen range computed one pixel wider and cropped):
    output, input gradient and kernel gradient equal autodiff of the plain convolution."""
    x, kernel, cotangent, forward, _ = _eigen_case(hw, cin, cout, padding)
    assert_vjp_matches(forward, lambda x, k: lax_conv(x, k, padding), (x, kernel), cotangent, 2e-5)


@CPU_HLO
@EIGEN_CASES
def test_small_convolutions_compile_to_eigen(hw, cin, cout, padding, eigen):
    """The compiled forward and input gradient of a convolution in the Eigen range hold no YNNPACK fusion (XLA:CPU
    sends a convolution whose output outgrows its input to Eigen)."""
    x, kernel, cotangent, forward, input_grad = _eigen_case(hw, cin, cout, padding)
    if eigen:
        for fn, args in ((forward, (x, kernel)), (input_grad, (x, kernel, cotangent))):
            ynn, plain = compiled_kinds(fn, *args)
            assert ynn == 0 and plain >= 1
    else:  # (its input gradient may be in the Eigen range: 64 -> 128 channels back-propagates as 128 -> 64)
        assert compiled_kinds(forward, x, kernel)[0] >= 1


def test_with_frozen_conv_kernels_adds_the_kernels_each_convolution_uses():
    """Input-gradient kernels (flipped in space, in and out swapped) for every convolution, Winograd kernels (G g Gᵀ,
    checked in float64 NumPy) also for 3 x 3 convolutions with at least WINOGRAD_MIN_CHANNELS inputs."""
    rng = np.random.default_rng(4)
    kernel = jnp.asarray(rng.standard_normal((3, 2, 4, 5)), jnp.float32)
    wide = jnp.asarray(rng.standard_normal((3, 3, layers.WINOGRAD_MIN_CHANNELS, 2)), jnp.float32)
    narrow = jnp.asarray(rng.standard_normal((3, 3, layers.WINOGRAD_MIN_CHANNELS - 1, 2)), jnp.float32)
    tree = {"conv": {"kernel": kernel, "bias": jnp.zeros(5)}, "linear": {"kernel": jnp.ones((4, 5))},
            "deeper": {"head": {"kernel": jnp.ones((1, 1, 6, 1))}, "wide": {"kernel": wide},
                       "narrow": {"kernel": narrow}}}
    got = layers.with_frozen_conv_kernels(tree, "cpu")
    assert set(got["conv"]) == {"kernel", "bias", "input_grad_kernel"} and set(got["linear"]) == {"kernel"}
    assert got["deeper"]["head"]["input_grad_kernel"].shape == (1, 1, 1, 6)
    want = np.asarray(kernel)[::-1, ::-1].transpose(0, 1, 3, 2)  # flipped in space, in and out swapped
    np.testing.assert_array_equal(np.asarray(got["conv"]["input_grad_kernel"]), want)
    assert set(got["deeper"]["wide"]) == {"kernel", "input_grad_kernel", "winograd_kernel"}
    assert set(got["deeper"]["narrow"]) == {"kernel", "input_grad_kernel"}
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    want = np.einsum("ak,klio,bl->abio", g, np.asarray(wide, np.float64), g)
    np.testing.assert_allclose(np.asarray(got["deeper"]["wide"]["winograd_kernel"]), want, rtol=1e-6, atol=1e-6)
    assert "input_grad_kernel" not in tree["conv"] and "winograd_kernel" not in tree["deeper"]["wide"]


WINOGRAD_SHAPES = pytest.mark.parametrize("shape", [(1, 6, 10, 5), (2, 8, 4, 3), (1, 2, 2, 4)])


def _winograd_case(shape, dtype):
    """(x, kernel, bias, cotangent, the "cpu" convolution through a Winograd kernel derived from its argument)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 6)) / np.sqrt(9 * shape[-1]), dtype)
    bias = jnp.asarray(rng.standard_normal(6), dtype)
    cotangent = jnp.asarray(rng.standard_normal((*shape[:3], 6)), dtype)

    def ours(x, k, padding):
        module = {"kernel": k, "bias": bias, "winograd_kernel": layers.winograd_kernel(k)}
        return layers.conv2d(module, x, padding=padding, kernels="cpu")

    return x, kernel, bias, cotangent, ours


@WINOGRAD_SHAPES
@pytest.mark.parametrize("padding", ["SAME", ((1, 1), (1, 1))])
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_winograd_convolution_matches_autodiff(shape, padding, precision, tol):
    """Output and gradients w.r.t. the input and the kernel of a convolution on Winograd F(2x2, 3x3) against
    autodiff of the plain convolution; the Winograd kernel is derived inside the differentiated function, so its zero
    cotangent is checked too."""
    with jax.enable_x64(precision == "float64"):
        x, kernel, bias, cotangent, ours = _winograd_case(shape, jnp.dtype(precision))
        assert_vjp_matches(lambda x, k: ours(x, k, padding), lambda x, k: lax_conv(x, k, ((1, 1), (1, 1))) + bias,
                           (x, kernel), cotangent, tol)


@CPU_HLO
@WINOGRAD_SHAPES
def test_winograd_convolution_compiles_to_products(shape):
    """The compiled Winograd forward and input gradient hold no convolution (their products are batched matmuls):
    the path is taken."""
    x, kernel, _, cotangent, ours = _winograd_case(shape, jnp.float32)

    def input_grad(x, k, dy):
        return jax.vjp(lambda x: ours(x, k, "SAME"), x)[1](dy)[0]

    for fn, args in ((lambda x, k: ours(x, k, "SAME"), (x, kernel)), (input_grad, (x, kernel, cotangent))):
        assert compiled_kinds(fn, *args)[1] == 0


@pytest.mark.parametrize("shape,padding", [((1, 7, 6, 4), "SAME"), ((1, 6, 6, 4), ((1, 1), (0, 2))),
                                           ((1, 6, 6, 4), "VALID")])
def test_winograd_kernel_is_ignored_where_it_does_not_apply(shape, padding):
    """An odd side or padding other than one pixel all round takes the direct convolution, with its values."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    module = {"kernel": kernel, "winograd_kernel": layers.winograd_kernel(kernel)}
    out, back = jax.vjp(lambda x: layers.conv2d(module, x, padding=padding, kernels="cpu"), x)
    want, want_back = jax.vjp(lambda x: layers.conv2d({"kernel": kernel}, x, padding=padding, kernels="cpu"), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(back(out)[0]), np.asarray(want_back(out)[0]))


def test_strided_convolution_ignores_the_input_grad_kernel():
    """Stride 2 (the encoder's downsampling) keeps autodiff's gradient; the precomputed kernel is for stride 1."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
    module = layers.with_frozen_conv_kernels({"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)},
                                             "cpu")
    plain = {"kernel": module["kernel"]}
    grad = jax.grad(lambda x, m: jnp.sum(layers.conv2d(m, x, stride=2, padding=((0, 1), (0, 1)), kernels="cpu") ** 2))
    np.testing.assert_array_equal(np.asarray(grad(x, module)), np.asarray(grad(x, plain)))


@pytest.mark.parametrize("padding", [((0, 1), (0, 1)), "SAME", ((1, 1), (2, 0))])
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_strided_convolution_gradients_match_autodiff(padding, precision, tol):
    """The "cpu" strided convolution's kernel gradient (one product per tap) and input gradient against autodiff of
    the plain convolution, odd sides included."""
    rng = np.random.default_rng(6)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), dtype)
        kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), dtype)
        out_shape = jax.eval_shape(lambda x: layers.conv2d({"kernel": kernel}, x, 2, padding), x).shape
        cotangent = jnp.asarray(rng.standard_normal(out_shape), dtype)
        assert_vjp_matches(lambda x, k: layers.conv2d({"kernel": k}, x, 2, padding, kernels="cpu"),
                           lambda x, k: layers.conv2d({"kernel": k}, x, 2, padding), (x, kernel), cotangent, tol)


@pytest.mark.parametrize("in_sizes, out_sizes", [([12], [12]), ([12], [4, 4, 4, 6, 6]), ([5, 7], [9]),
                                                 ([3, 4, 5], [2, 10])])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("with_lora", [False, True])
@KERNELS
def test_linear_pieces_is_concat_linear_split(in_sizes, out_sizes, dtype, tol, with_lora, kernels):
    """Each output piece equals NumPy's (concatenated inputs) @ kernel (+ bias + s·(x@A)@B), split; the gradients
    w.r.t. inputs, kernel and LoRA equal those of the concatenate-matmul-split form."""
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(len(in_sizes) * 10 + len(out_sizes))
        n_in, n_out, rank, scale = sum(in_sizes), sum(out_sizes), 3, 0.7
        p = {"kernel": jnp.asarray(rng.standard_normal((n_in, n_out)), dtype),
             "bias": jnp.asarray(rng.standard_normal(n_out), dtype)}
        lora = ({"lora_A": {"kernel": jnp.asarray(rng.standard_normal((n_in, rank)), dtype)},
                 "lora_B": {"kernel": jnp.asarray(rng.standard_normal((rank, n_out)), dtype)}} if with_lora else None)
        xs = [jnp.asarray(rng.standard_normal((2, 5, size)), dtype) for size in in_sizes]

        x64 = np.concatenate([np.asarray(x, np.float64) for x in xs], axis=-1)
        want = x64 @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        if with_lora:
            want += scale * (x64 @ np.asarray(lora["lora_A"]["kernel"], np.float64)) @ np.asarray(
                lora["lora_B"]["kernel"], np.float64)
        got = layers.linear_pieces(p, xs, out_sizes, lora, scale, kernels)
        assert [g.shape for g in got] == [(2, 5, size) for size in out_sizes] and all(g.dtype == dtype for g in got)
        norm = np.max(np.abs(want))
        np.testing.assert_allclose(np.concatenate([np.asarray(g, np.float64) for g in got], -1) / norm, want / norm,
                                   atol=tol)

        def pieces(p, lora, *xs):
            return layers.linear_pieces(p, list(xs), out_sizes, lora, scale, kernels)

        def concatenated(p, lora, *xs):
            y = layers.linear(p, jnp.concatenate(xs, axis=-1), lora, scale)
            return jnp.split(y, np.cumsum(out_sizes)[:-1], axis=-1)

        assert_vjp_matches(lambda *a: jnp.concatenate(pieces(*a), -1), lambda *a: jnp.concatenate(concatenated(*a), -1),
                           (p, lora, *xs), jnp.asarray(rng.standard_normal((2, 5, n_out)), dtype), tol)


def test_linear_pieces_must_tile_the_kernel():
    p = {"kernel": jnp.zeros((6, 8))}
    with pytest.raises(ValueError, match=r"inputs of \[2, 3\] features and outputs of \[8\] do not tile the kernel "
                                         r"\(6, 8\)"):
        layers.linear_pieces(p, [jnp.zeros((1, 2)), jnp.zeros((1, 3))], [8])
    with pytest.raises(ValueError, match=r"outputs of \[4, 3\]"):
        layers.linear_pieces(p, [jnp.zeros((1, 6))], [4, 3])
