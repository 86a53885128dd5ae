"""FLUX.2 transformer: parity with diffusers' `Flux2Transformer2DModel`, presets, parameter counts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline

from foa_jax.models import flux2, kernels
from ports import torch_models
from tests import torch_reference

CONFIG = flux2.Flux2Config(**torch_reference.SMALL_TRANSFORMER)
LATENT_HW = (3, 5)  # non-square token grid
REF_HW = ((2, 3), (4, 2))  # references may differ in size from the target and from each other
TIMESTEPS = np.array([0.0, 0.5, 1.0])


def _ids(num_refs, text_len):
    """Position ids built by diffusers' own pipeline helpers (the independent reference for our ids)."""
    target = Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 1, *LATENT_HW))[0]
    refs = [torch.zeros(1, 1, *hw) for hw in REF_HW[:num_refs]]
    img = torch.cat([target, Flux2Pipeline._prepare_image_ids(refs)[0]]) if refs else target
    txt = Flux2Pipeline._prepare_text_ids(torch.zeros(1, text_len, 1))[0]
    return img.numpy(), txt.numpy()


def _inputs(num_refs, text_len, seed=0):
    img_ids, txt_ids = _ids(num_refs, text_len)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(TIMESTEPS), len(img_ids), CONFIG.in_channels))
    ctx = rng.standard_normal((len(TIMESTEPS), text_len, CONFIG.joint_attention_dim))
    return x, ctx, img_ids, txt_ids


@pytest.fixture(scope="module")
def torch_model():
    return torch_models.seeded_transformer(CONFIG, seed=0, dtype=torch.float64)


def _torch_forward(model, x, ctx, img_ids, txt_ids, guidance):
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                    timestep=torch.from_numpy(TIMESTEPS), img_ids=torch.from_numpy(img_ids),
                    txt_ids=torch.from_numpy(txt_ids),
                    guidance=None if guidance is None else torch.full((len(TIMESTEPS),), guidance, dtype=torch.float64))
    return out.sample.numpy()


GRID = [(refs, length, g) for refs in (0, 1, 2) for length in (1, 9) for g in (None, 4.0)]


@pytest.mark.parametrize("num_refs,text_len,guidance,precision",
                         [(*case, "float32") for case in GRID] + [(2, 9, None, "float64"), (1, 1, 4.0, "float64")])
def test_parity_with_diffusers(torch_model, num_refs, text_len, guidance, precision):
    x, ctx, img_ids, txt_ids = _inputs(num_refs, text_len)
    expected = _torch_forward(torch_model, x, ctx, img_ids, txt_ids, guidance)
    np_dtype = np.dtype(precision)
    with jax.enable_x64(precision == "float64"):
        params = torch_models.jax_params(torch_model, lambda: flux2.init(CONFIG, jax.random.key(0)),
                                            flux2.STACKS, dtype=np_dtype)
        config = CONFIG.replace(dtype=precision)
        g = None if guidance is None else jnp.full((len(TIMESTEPS),), guidance, np_dtype)
        out = jax.jit(flux2.apply, static_argnums=1)(
            params, config, x.astype(np_dtype), ctx.astype(np_dtype), TIMESTEPS.astype(np_dtype), img_ids, txt_ids, g)
        out = np.asarray(out, np.float64)
    assert out.shape == expected.shape == (len(TIMESTEPS), len(img_ids), CONFIG.in_channels)
    # diffusers keeps RoPE and the sinusoidal embedding in float32 even in a float64 model: those islands bound the
    # float64 agreement at ~1e-8.
    tol = 1e-5 if precision == "float32" else 1e-7
    print(f"max abs diff {precision}: {np.max(np.abs(out - expected)):.3e}")
    assert np.max(np.abs(out - expected)) <= tol


def test_remat_and_bf16_agree_with_float32(torch_model):
    x, ctx, img_ids, txt_ids = _inputs(1, 9)
    params = torch_models.jax_params(torch_model, lambda: flux2.init(CONFIG, jax.random.key(0)), flux2.STACKS)
    run = jax.jit(flux2.apply, static_argnums=1)
    ref = run(params, CONFIG, x, ctx, TIMESTEPS, img_ids, txt_ids)
    remat = run(params, CONFIG.replace(remat="full"), x, ctx, TIMESTEPS, img_ids, txt_ids)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(remat))
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    bf16 = run(bf16_params, CONFIG.replace(dtype="bfloat16"), x, ctx, TIMESTEPS, img_ids, txt_ids)
    assert bf16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(bf16, np.float32) - ref) / np.linalg.norm(ref)
    assert rel < 0.05


@pytest.mark.parametrize("policy", [dict(remat="full"), dict(scan_unroll=2), dict(scan_unroll=64, remat="full")])
def test_gradients_through_remat_and_unrolled_scans_match(policy):
    """Rematerialised, partly unrolled (2 of 3 single blocks per scan step: a remainder) and fully unrolled block
    stacks give the loss and gradients of the plain rolled scan."""
    config = CONFIG.replace(num_single_layers=3)
    params = flux2.init(config, jax.random.key(1))
    x, ctx, img_ids, txt_ids = _inputs(1, 3)

    def loss(p, cfg):
        return jnp.mean(flux2.apply(p, cfg, x, ctx, TIMESTEPS, img_ids, txt_ids) ** 2)

    l_plain, g_plain = jax.value_and_grad(loss)(params, config)
    l_other, g_other = jax.value_and_grad(loss)(params, config.replace(**policy))
    np.testing.assert_allclose(float(l_other), float(l_plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_other)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_flux2_dev_parameter_count_on_paper():
    config = flux2.preset("flux2-dev")
    shapes = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0), jnp.bfloat16))
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert total == flux2.param_count(config) == 32_223_281_152
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["transformer_blocks"])) == 7_851_741_184
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["single_transformer_blocks"])) == 23_555_223_552


@pytest.mark.parametrize("name", ["klein-4b", "klein-9b", "tiny"])
def test_presets_match_diffusers_parameter_count(name):
    """Each preset builds in diffusers (on the meta device: no memory) with exactly our parameter count."""
    from diffusers import Flux2Transformer2DModel

    config = flux2.preset(name)
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config.to_diffusers())
    assert sum(p.numel() for p in model.parameters()) == flux2.param_count(config)


def test_config_round_trips_through_diffusers():
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**CONFIG.to_diffusers())
    assert flux2.Flux2Config.from_diffusers(dict(model.config)) == CONFIG
    with pytest.raises(ValueError, match="unknown config keys"):
        flux2.Flux2Config.from_diffusers({**CONFIG.to_diffusers(), "made_up": 1})


@pytest.mark.parametrize("field,value,match", [
    ("axes_dims_rope", (4, 4, 4, 2), "must sum to attention_head_dim"),
    ("num_attention_heads", 0, "must be positive"),
    ("dtype", "int8", "dtype must be one of"),
    ("remat", "sometimes", "remat must be one of"),
    ("scan_unroll", 0, "scan_unroll must be an integer >= 1"),
    ("scan_unroll", True, "scan_unroll must be an integer >= 1"),
    ("scan_unroll", 1.5, "scan_unroll must be an integer >= 1"),
    ("patch_size", 2, "expected 1, got 2"),
])
def test_config_validates_itself(field, value, match):
    with pytest.raises(ValueError, match=match):
        CONFIG.replace(**{field: value})


def test_bad_inputs_name_expected_and_actual():
    params = flux2.init(CONFIG, jax.random.key(0))
    x, ctx, img_ids, txt_ids = _inputs(0, 3)
    cases = [
        (dict(hidden_states=x[..., :5]), r"hidden_states: expected \(B, N, 8\), got \(3, 15, 5\)"),
        (dict(encoder_hidden_states=ctx[:2]), "batch mismatch: hidden_states has batch 3, encoder_hidden_states has 2"),
        (dict(encoder_hidden_states=ctx[..., :7]), r"expected \(B, L, 24\), got \(3, 3, 7\)"),
        (dict(img_ids=img_ids[:-1]), r"img_ids: expected shape \(15, 4\) or \(B, 15, 4\), got \(14, 4\)"),
        (dict(txt_ids=txt_ids[:, :3]), r"txt_ids: expected shape \(3, 4\) or \(B, 3, 4\), got \(3, 3\)"),
        (dict(timestep=TIMESTEPS[:2]), r"timestep: expected shape \(3,\) or a scalar, got \(2,\)"),
    ]
    base = dict(hidden_states=x, encoder_hidden_states=ctx, timestep=TIMESTEPS, img_ids=img_ids, txt_ids=txt_ids)
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            flux2.apply(params, CONFIG, **{**base, **change})
    with pytest.raises(ValueError, match="no guidance embedder"):
        flux2.apply(params, CONFIG.replace(guidance_embeds=False), **base, guidance=TIMESTEPS)


@pytest.mark.parametrize("axes_dims,theta", [((8, 8, 8, 8), 2000), ((32, 32, 32, 32), 2000), ((2, 4, 6, 4), 10000)])
def test_rope_table_matches_diffusers_pos_embed(axes_dims, theta):
    """The gathered cos/sin tables against diffusers' `Flux2PosEmbed` (float64 angles) on the pipeline's own ids."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    img_ids, txt_ids = _ids(2, 8)
    ids = np.concatenate([txt_ids, img_ids]) + np.array([0, 3, 0, 0])  # a nonzero height axis too
    want_cos, want_sin = Flux2PosEmbed(theta, list(axes_dims))(torch.from_numpy(ids))
    with jax.enable_x64(True):
        got_cos, got_sin = jax.jit(flux2.rope_table, static_argnums=(1, 2))(jnp.asarray(ids), axes_dims, theta)
    assert got_cos.shape == got_sin.shape == (len(ids), sum(axes_dims))
    np.testing.assert_allclose(np.asarray(got_cos), want_cos.numpy(), atol=1e-7, rtol=0)
    np.testing.assert_allclose(np.asarray(got_sin), want_sin.numpy(), atol=1e-7, rtol=0)


def test_forward_and_gradients_match_diffusers_with_many_attention_chunks(torch_model, monkeypatch):
    """The whole float64 model with attention chunks of 8 rows and heads one at a time, through scanned,
    rematerialised blocks: output and the gradients of every weight (of a random linear functional of the output)
    match diffusers' autograd."""
    from ports import convert

    x, ctx, img_ids, txt_ids = _inputs(2, 9)
    cotangent = np.random.default_rng(1).standard_normal((len(TIMESTEPS), len(img_ids), CONFIG.in_channels))
    with torch.enable_grad():
        out = torch_model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                          timestep=torch.from_numpy(TIMESTEPS), img_ids=torch.from_numpy(img_ids),
                          txt_ids=torch.from_numpy(txt_ids)).sample
        (out * torch.from_numpy(cotangent)).sum().backward()
    expected = out.detach().numpy()
    # No guidance was given: the guidance embedder gets no gradient in torch (None) and zeros in JAX.
    torch_grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                   for name, p in torch_model.named_parameters()}
    torch_model.zero_grad(set_to_none=True)

    seq = len(img_ids) + 9
    monkeypatch.setattr(kernels, "SCORE_BUDGET_BYTES", len(TIMESTEPS) * 8 * seq * 8)
    monkeypatch.setattr(kernels, "SAVED_SCORES_BUDGET_BYTES", 0)
    assert kernels.attention_plan(len(TIMESTEPS), 2, seq, seq, 8, kernels.SCORE_BUDGET_BYTES) == (1, 8, False)
    with jax.enable_x64(True):
        template = lambda: flux2.init(CONFIG, jax.random.key(0))  # noqa: E731
        params = torch_models.jax_params(torch_model, template, flux2.STACKS, dtype=np.float64)
        expected_grads = convert.from_state_dict(jax.eval_shape(template), torch_grads, flux2.STACKS, np.float64)
        config = CONFIG.replace(dtype="float64", remat="full", attention="chunked")

        def functional(p):
            prediction = flux2.apply(p, config, x, ctx, TIMESTEPS, img_ids, txt_ids)
            return jnp.sum(prediction * cotangent), prediction

        (_, prediction), grads = jax.jit(jax.value_and_grad(functional, has_aux=True))(params)
    assert np.max(np.abs(np.asarray(prediction) - expected)) <= 1e-7
    # diffusers keeps RoPE and the time embedding in float32 inside a float64 model (see above): ~1e-7 relative.
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
        got, want = np.asarray(got), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("shift_per_token", [False, True])
@pytest.mark.parametrize("precision,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_token_affine_gradients_match_autodiff(shift_per_token, precision, tol):
    """The modulation/gate op's hand-written backward (token sums as einsums) against autodiff of `x·scale + shift`."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        x = jnp.asarray(rng.standard_normal((2, 7, 6)), dtype)
        scale = jnp.asarray(rng.standard_normal((2, 1, 6)), dtype)
        shift = jnp.asarray(rng.standard_normal((2, 7 if shift_per_token else 1, 6)), dtype)
        cotangent = jnp.asarray(rng.standard_normal((2, 7, 6)), dtype)
        ours = jax.vjp(flux2._token_affine, x, scale, shift)
        plain = jax.vjp(lambda x, s, b: x * s + b, x, scale, shift)
        np.testing.assert_allclose(ours[0], plain[0], rtol=0, atol=tol)
        for got, want in zip(ours[1](cotangent), plain[1](cotangent)):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("precision,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_swiglu_gradient_matches_autodiff(precision, tol):
    """The SwiGLU's hand-written backward (the two halves as residuals, the sigmoid recomputed) against autodiff of
    silu(g)·u."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        gate, up = (jnp.asarray(3 * rng.standard_normal((2, 5, 6)), dtype) for _ in range(2))
        cotangent = jnp.asarray(rng.standard_normal((2, 5, 6)), dtype)
        ours = jax.vjp(flux2._swiglu, gate, up)
        plain = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
        np.testing.assert_allclose(ours[0], plain[0], rtol=0, atol=tol)
        for got, want in zip(ours[1](cotangent), plain[1](cotangent), strict=True):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=0, atol=tol)
