"""foa_jax.models.vae against diffusers' AutoencoderKLFlux2 and Flux2Pipeline's own latent helpers.

The torch models are small random AutoencoderKLFlux2s built from `VAEConfig.to_diffusers()`, with every GroupNorm
affine and the BN running statistics moved away from their 1/0 and 0/1 initial values, so a swapped or
mis-transposed tensor changes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from foa_jax import params as P
from foa_jax.models import layers, vae
from ports import convert

SMALL = vae.VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4)
CONFIGS = {
    "small": SMALL,
    # Two resnets per block (three per decoder block), a decoder narrower than the encoder, no mid-block attention
    # and neither quant conv: every optional branch of the structure.
    "small-lpb2": dataclasses.replace(SMALL, layers_per_block=2, decoder_block_out_channels=(8, 8, 16, 32),
                                      use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
    "tiny": vae.VAEConfig.preset("tiny"),
}
# (config, height, width): non-square images both ways round; each case costs one XLA compile, so not all pairs.
CASES = [("small", 32, 48), ("small", 48, 32), ("small-lpb2", 48, 32), ("tiny", 32, 48)]
# float32: 1e-5 relative to the output's scale (decoded images reach |x| ~ 4 with the perturbed norms, and each
# value is a long chain of 3x3 conv sums). float64 shows the computation itself is the same.
F32_TOL = 1e-5
F64_TOL = 1e-12


@functools.partial(jax.jit, static_argnums=(1, 5, 6))
def jax_outputs(params, config, images, latents, tokens, height, width):
    """All four entry points in one compiled program (XLA shares the encoder between encode and encode_tokens)."""
    return {"encode": vae.encode(params, config, images), "decode": vae.decode(params, config, latents),
            "encode_tokens": vae.encode_tokens(params, config, images),
            "decode_tokens": vae.decode_tokens(params, config, tokens, height, width)}


def torch_vae(config: vae.VAEConfig, seed: int = 0) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**config.to_diffusers()).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
        model.bn.running_mean.copy_(0.5 * torch.randn_like(model.bn.running_mean))
        model.bn.running_var.copy_(0.5 + torch.rand_like(model.bn.running_var))
    return model


def jax_params(config: vae.VAEConfig, model: AutoencoderKLFlux2, dtype=np.float32) -> dict:
    template = jax.eval_shape(lambda: vae.init(config, jax.random.key(0)))
    return jax.tree.map(jnp.asarray, convert.from_state_dict(template, model.state_dict(), dtype=dtype))


def nchw(x: jax.Array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def reference_tokens(model: AutoencoderKLFlux2, images: torch.Tensor) -> torch.Tensor:
    """The pipeline's own encode path: `_encode_vae_image` (mode, patchify, BN) then `_pack_latents`."""
    pipe = types.SimpleNamespace(vae=model, _patchify_latents=Flux2Pipeline._patchify_latents)
    return Flux2Pipeline._pack_latents(Flux2Pipeline._encode_vae_image(pipe, images, generator=None))


def reference_decode_tokens(model: AutoencoderKLFlux2, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """What `Flux2Pipeline.__call__` does to the final tokens before returning an image."""
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, h, w))
    latents = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    mean = model.bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps).to(latents.dtype)
    latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
    return model.decode(latents, return_dict=False)[0]


def inputs(config: vae.VAEConfig, height: int, width: int, dtype) -> tuple[torch.Tensor, ...]:
    """Images in [-1, 1], latents and tokens (NCHW / token layout) for one image size."""
    gen = torch.Generator().manual_seed(height * 1000 + width)
    f, t = config.spatial_factor, config.token_factor
    images = 2 * torch.rand(2, config.in_channels, height, width, generator=gen) - 1
    latents = torch.randn(2, config.latent_channels, height // f, width // f, generator=gen)
    tokens = torch.randn(2, (height // t) * (width // t), config.token_channels, generator=gen)
    return images.to(dtype), latents.to(dtype), tokens.to(dtype)


def parity(config: vae.VAEConfig, model: AutoencoderKLFlux2, params: dict, dtype, height: int, width: int) -> dict:
    """`{entry point: (max abs diff, max abs reference value)}` against torch at one image size."""
    images, latents, tokens = inputs(config, height, width, dtype)
    t = config.token_factor
    with torch.no_grad():
        ref = {"encode": nhwc(model.encode(images).latent_dist.mode()),
               "decode": nhwc(model.decode(latents).sample),
               "encode_tokens": reference_tokens(model, images).numpy(),
               "decode_tokens": nhwc(reference_decode_tokens(model, tokens, height // t, width // t))}
    out = jax_outputs(params, config, nhwc(images), nhwc(latents), tokens.numpy(), height, width)
    for name in ref:
        assert out[name].shape == ref[name].shape, (name, out[name].shape, ref[name].shape)
        assert out[name].dtype == ref[name].dtype, (name, out[name].dtype)
    return {name: (max_diff(out[name], ref[name]), float(np.max(np.abs(ref[name])))) for name in ref}


def assert_close(label: str, diffs: dict, tol: float) -> None:
    print(f"{label}: " + ", ".join(f"{k} {d:.2e} (|ref| <= {m:.2f})" for k, (d, m) in diffs.items()))
    assert all(d <= tol * max(1.0, m) for d, m in diffs.values()), diffs


@pytest.mark.parametrize("name, height, width", CASES)
def test_parity_float32(name, height, width):
    config = CONFIGS[name]
    model = torch_vae(config)
    diffs = parity(config, model, jax_params(config, model), torch.float32, height, width)
    assert_close(f"{name} {height}x{width} float32", diffs, F32_TOL)


def test_parity_float64():
    config = CONFIGS["small-lpb2"]
    model = torch_vae(config, seed=1).double()
    with jax.enable_x64(True):
        diffs = parity(config, model, jax_params(config, model, dtype=np.float64), torch.float64, 32, 48)
    assert_close("small-lpb2 32x48 float64", diffs, F64_TOL)


def test_tokens_round_trip_layout():
    """patchify/pack and their inverses are exact inverses, and patchify matches the pipeline's channel order."""
    z = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    ref = Flux2Pipeline._patchify_latents(nchw(z))
    np.testing.assert_array_equal(vae.patchify(z), nhwc(ref))
    np.testing.assert_array_equal(vae.unpatchify(vae.patchify(z)), z)
    np.testing.assert_array_equal(vae.pack(z), Flux2Pipeline._pack_latents(nchw(z)).numpy())
    np.testing.assert_array_equal(vae.unpack(vae.pack(z), 6, 4), z)


def test_flux2_preset_matches_diffusers_without_materialising():
    config = vae.VAEConfig.preset("flux2")
    template = jax.eval_shape(lambda: vae.init(config, jax.random.key(0)))
    assert P.count(vae.trainable(template)) == 84_046_115 == vae.param_count(config)
    assert P.count(template["bn"]) == 256
    with torch.device("meta"):
        model = AutoencoderKLFlux2(**config.to_diffusers())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    convert.check_keys(convert.plan(template), shapes, "AutoencoderKLFlux2() on the meta device")
    assert vae.VAEConfig.from_diffusers(dict(model.config)) == config
    assert config.spatial_factor == 8 and config.token_factor == 16 and config.token_channels == 128


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    config = CONFIGS[name]
    stored = dict(AutoencoderKLFlux2(**config.to_diffusers()).config)
    assert vae.VAEConfig.from_diffusers(stored) == config
    assert vae.VAEConfig.from_diffusers(json.loads(json.dumps(stored))) == config  # lists, as in config.json


@pytest.mark.parametrize("change, message", [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}, "down_block_types"),
    ({"up_block_types": ("UpDecoderBlock2D",)}, "up_block_types"),
    ({"shift_factor": 0.1}, "shift_factor"),
    ({"patch_size": (1, 1)}, "patch_size"),
    ({"norm_num_groups": 3}, "divisible"),
    ({"decoder_block_out_channels": (8, 16, 16)}, "decoder_block_out_channels"),
    ({"_class_name": "AutoencoderKL"}, "AutoencoderKL"),
])
def test_config_rejects_unsupported(change, message):
    base = {**vae.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4).to_diffusers(), "sample_size": 64}
    with pytest.raises(ValueError, match=message):
        vae.VAEConfig.from_diffusers({**base, **change})


TINY = vae.VAEConfig.preset("tiny")


@pytest.mark.parametrize("call, expected, actual", [
    (lambda p: vae.encode(p, TINY, jnp.zeros((1, 36, 32, 3))), "multiples of 8", "36x32"),
    (lambda p: vae.encode_tokens(p, TINY, jnp.zeros((1, 32, 40, 3))), "multiples of 16", "32x40"),
    (lambda p: vae.encode(p, TINY, jnp.zeros((1, 32, 32, 4))), "3 channels", "(1, 32, 32, 4)"),
    (lambda p: vae.encode(p, TINY, jnp.zeros((32, 32, 3))), "(B, H, W, C)", "(32, 32, 3)"),
    (lambda p: vae.decode(p, TINY, jnp.zeros((1, 4, 4, 4))), "32 channels", "(1, 4, 4, 4)"),
    (lambda p: vae.decode_tokens(p, TINY, jnp.zeros((1, 5, 128)), 32, 48), "2*3=6", "got 5"),
    (lambda p: vae.decode_tokens(p, TINY, jnp.zeros((1, 6, 16)), 32, 48), "128 channels", "(1, 6, 16)"),
    (lambda p: vae.decode_tokens(p, TINY, jnp.zeros((1, 6, 128)), 40, 48), "multiples of 16", "40x48"),
])
def test_bad_input_names_expected_and_actual(call, expected, actual):
    # Inputs are checked before any parameter is touched, so shapes-only parameters suffice.
    params = jax.eval_shape(lambda: vae.init(TINY, jax.random.key(0)))
    with pytest.raises(ValueError) as info:
        call(params)
    assert expected in str(info.value) and actual in str(info.value), str(info.value)


def test_bfloat16_runs_close_to_float32():
    """bf16 parameters and activations (a frozen VAE stored in bf16) stay within a few percent of float32."""
    config, (height, width) = CONFIGS["tiny"], (32, 48)
    params = jax_params(config, torch_vae(config, seed=2))
    arrays = [nhwc(a) if a.ndim == 4 else a.numpy() for a in inputs(config, height, width, torch.float32)]
    ref = jax_outputs(params, config, *arrays, height, width)
    bf16 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
    out = jax_outputs(bf16(params), config, *bf16(arrays), height, width)
    for name in ref:
        assert out[name].dtype == jnp.bfloat16, (name, out[name].dtype)
        rel = max_diff(out[name], ref[name]) / float(jnp.max(jnp.abs(ref[name])))
        print(f"bf16 {name}: max abs diff / max |f32| = {rel:.4f}")
        assert rel < 0.05, (name, rel)


@pytest.mark.parametrize("kernels", layers.KERNELS)
@pytest.mark.parametrize("height, width, channels, bias", [(3, 5, 2, True), (4, 4, 3, False)])
def test_upsample_equals_nearest_neighbour_then_conv(height, width, channels, bias, kernels):
    """The sub-pixel form of `Upsample2D` (four 2x2 convs of the input) against the literal x2 repeat + 3x3 conv,
    in float64 on non-square inputs, forward and gradient."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, height, width, channels)))
        conv = {"kernel": jnp.asarray(rng.standard_normal((3, 3, channels, 4)))}
        if bias:
            conv["bias"] = jnp.asarray(rng.standard_normal(4))

        def literal(x):
            upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return layers.conv2d(conv, upsampled)

        def ours(x):
            return vae._upsample({"conv": conv}, x, kernels)

        np.testing.assert_allclose(ours(x), literal(x), rtol=0, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal((2, 2 * height, 2 * width, 4)))
        grads = [jax.vjp(f, x)[1](cotangent)[0] for f in (ours, literal)]
        np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-12)
