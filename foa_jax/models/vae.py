"""The FLUX.2 VAE (diffusers' `AutoencoderKLFlux2`) as pure JAX functions over an NHWC parameter pytree.

It is an SD-style KL autoencoder: 8x spatial downsampling for four blocks, a single-head attention in
each mid block, and a diagonal Gaussian posterior of which FLUX.2 only ever uses the mode. What makes it FLUX.2's is
the latent interface: the 2x2 patchify that moved out of the transformer, and a BatchNorm's running statistics that
replace SD's scaling/shift factors. `encode_tokens`/`decode_tokens` are the whole pipeline path
(`Flux2Pipeline._encode_vae_image` + `_pack_latents`, and the inverse before `vae.decode`), so the transformer side
sees `(B, H/16 * W/16, 4 * latent_channels)` tokens, h-major, exactly as in diffusers.

Parameters are nested dicts keyed like diffusers' state dict (see `foa_jax.params`); `bn.running_mean` and
`bn.running_var` live in the same tree but are statistics, not weights: `trainable` drops them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from foa_jax import params as P
from foa_jax.models import kernels
from foa_jax.models.layers import Params, conv2d, group_norm, linear

# Every GroupNorm inside the diffusers Encoder/Decoder is built with eps 1e-6; it is not a config key.
NORM_EPS = 1e-6

# Config keys diffusers stores that change nothing here: bookkeeping, tiling size, the BN momentum (the running
# statistics are frozen) and `force_upcast`, which older diffusers snapshots still had.
_IGNORED_DIFFUSERS_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
     "batch_norm_momentum", "force_upcast"}
)
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
POLICY_FIELDS = frozenset({"attention", "kernels"})  # how to run, not what: no diffusers config key


@dataclass(frozen=True)
class VAEConfig:
    """The `AutoencoderKLFlux2` config keys that shape the computation; defaults are the FLUX.2 VAE.

    Hashable, so it can be a static argument of `jax.jit`. `attention` (the mid blocks' kernel) and `kernels` (the
    operation set) are how it runs, see `foa_jax.models.kernels`; left None, the platform's are picked when the
    config is made. The VAE computes in its inputs' dtype, so on a GPU the default attention is "xla" (its one head
    is as wide as the mid-block channels, beyond cuDNN's flash attention anyway).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    attention: str | None = None
    kernels: str | None = None
    _picked: frozenset = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # JSON configs give lists; tuples keep the config hashable.
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VAEConfig.{name}: expected a positive int, got {value!r}")
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig.act_fn: only 'silu' is supported, got {self.act_fn!r}")
        if self.patch_size != (2, 2):
            raise ValueError(f"VAEConfig.patch_size: expected (2, 2) (Flux2Pipeline hard-codes 2x2 patchify), "
                             f"got {self.patch_size}")
        if not self.batch_norm_eps > 0:
            raise ValueError(f"VAEConfig.batch_norm_eps: expected > 0, got {self.batch_norm_eps}")
        for name in ("block_out_channels", "decoder_block_out_channels"):
            channels = getattr(self, name)
            if channels is None:
                continue
            if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
                raise ValueError(f"VAEConfig.{name}: expected a non-empty tuple of positive ints, got {channels}")
            bad = [c for c in channels if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"VAEConfig.{name}: every channel count must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups}, got {channels}")
        if self.decoder_block_out_channels is not None and (
                len(self.decoder_block_out_channels) != len(self.block_out_channels)):
            raise ValueError(f"VAEConfig.decoder_block_out_channels: expected {len(self.block_out_channels)} entries "
                             f"(one per encoder block, so decoding undoes encoding's downsampling), "
                             f"got {self.decoder_block_out_channels}")
        # The presets below are made while this module is imported: `kernels.Presets` picks their kernels when read.
        width = max(self.block_out_channels[-1], self.decoder_channels[-1])
        kernels.settle(self, None, width, resolve="PRESETS" in globals())

    def replace(self, **changes) -> "VAEConfig":
        """A copy with `changes`; kernels that were picked from the platform are picked again."""
        return dataclasses.replace(self, **kernels.repick(self, changes))

    def describe(self) -> str:
        """One line: the kernels this config runs and whether the platform picked them."""
        return kernels.describe(self)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side (8 for four blocks): one downsample per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_factor(self) -> int:
        """Pixels per token along each side (16 for FLUX.2): the spatial factor times the 2x2 patchify."""
        return self.spatial_factor * self.patch_size[0]

    @property
    def token_channels(self) -> int:
        """Channels of a packed token, which is also the size of the BN statistics (128 for FLUX.2)."""
        return math.prod(self.patch_size) * self.latent_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Build from an `AutoencoderKLFlux2` config dict; refuse keys and block types this port does not implement."""
        if config.get("_class_name", "AutoencoderKLFlux2") != "AutoencoderKLFlux2":
            raise ValueError(f"VAEConfig.from_diffusers: expected _class_name 'AutoencoderKLFlux2', "
                             f"got {config['_class_name']!r}")
        fields = {f.name for f in dataclasses.fields(cls) if f.init} - POLICY_FIELDS
        unknown = sorted(set(config) - fields - _IGNORED_DIFFUSERS_KEYS - set(_BLOCK_TYPES))
        if unknown:
            raise ValueError(f"VAEConfig.from_diffusers: unsupported config keys {unknown}")
        out = cls(**{k: v for k, v in config.items() if k in fields})
        for key, block_type in _BLOCK_TYPES.items():
            expected = (block_type,) * len(out.block_out_channels)
            if key in config and tuple(config[key]) != expected:
                raise ValueError(f"VAEConfig.from_diffusers: {key}: expected {expected}, got {tuple(config[key])}")
        return out

    def to_diffusers(self) -> dict[str, Any]:
        """Keyword arguments for `AutoencoderKLFlux2(**kwargs)` that build the same model."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.init and f.name not in POLICY_FIELDS}
        for key, block_type in _BLOCK_TYPES.items():
            out[key] = (block_type,) * len(self.block_out_channels)
        return out

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        if name not in PRESETS:
            raise ValueError(f"VAEConfig.preset: unknown preset {name!r}, expected one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = kernels.Presets({
    # The real FLUX.2 VAE: diffusers' AutoencoderKLFlux2() defaults, 84,046,115 weights.
    "flux2": VAEConfig(),
    # The same 8x spatial + 2x2 patchify (16x) layout at 1/8 of the width, so token grids match the real model, and
    # FLUX.2's 32 latent channels (128 per token): 8 channels capped the held-out reconstruction far below 28 dB.
    "tiny": VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=32, norm_num_groups=8),
})


# ----------------------------------------------------------------------------------------------------------------------
# Structure, shared by init and apply so they cannot disagree.


def _stages(channels: tuple[int, ...], resampler: str) -> list[tuple[int, int, str | None]]:
    """`(in, out, resampler)` per block: the first block keeps its input width, and the last does not resample."""
    return [(channels[max(i - 1, 0)], c, resampler if i < len(channels) - 1 else None) for i, c in enumerate(channels)]


def _encoder_stages(config: VAEConfig) -> list[tuple[int, int, str | None]]:
    return _stages(config.block_out_channels, "downsamplers")


def _decoder_stages(config: VAEConfig) -> list[tuple[int, int, str | None]]:
    return _stages(tuple(reversed(config.decoder_channels)), "upsamplers")


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation: torch's default (uniform ±1/sqrt(fan_in) for weights and biases), GroupNorm 1/0, BN stats 0/1.
# The tree is first described leaf by leaf (shape and bound), then filled from a single uniform draw: one random op
# for the whole model instead of one per tensor, which XLA would compile far more slowly, even for the tiny preset.


@dataclass(frozen=True)
class _Leaf:
    """A parameter to create: uniform in ±`bound` if `bound` is set, else the constant `fill`."""

    shape: tuple[int, ...]
    bound: float | None = None
    fill: float = 0.0


def _conv_spec(size: int, cin: int, cout: int) -> dict:
    bound = 1.0 / math.sqrt(cin * size * size)
    return {"kernel": _Leaf((size, size, cin, cout), bound), "bias": _Leaf((cout,), bound)}


def _linear_spec(cin: int, cout: int) -> dict:
    bound = 1.0 / math.sqrt(cin)
    return {"kernel": _Leaf((cin, cout), bound), "bias": _Leaf((cout,), bound)}


def _norm_spec(channels: int) -> dict:
    return {"scale": _Leaf((channels,), fill=1.0), "bias": _Leaf((channels,))}


def _resnet_spec(cin: int, cout: int) -> dict:
    spec = {"norm1": _norm_spec(cin), "conv1": _conv_spec(3, cin, cout),
            "norm2": _norm_spec(cout), "conv2": _conv_spec(3, cout, cout)}
    if cin != cout:
        spec["conv_shortcut"] = _conv_spec(1, cin, cout)
    return spec


def _mid_block_spec(config: VAEConfig, channels: int) -> dict:
    spec = {"resnets": {str(j): _resnet_spec(channels, channels) for j in range(2)}}
    if config.mid_block_add_attention:
        linears = {name: _linear_spec(channels, channels) for name in ("to_q", "to_k", "to_v")}
        spec["attentions"] = {"0": {"group_norm": _norm_spec(channels), **linears,
                                    "to_out": {"0": _linear_spec(channels, channels)}}}
    return spec


def _block_spec(cin: int, cout: int, layers: int, resampler: str | None) -> dict:
    spec = {"resnets": {str(j): _resnet_spec(cin if j == 0 else cout, cout) for j in range(layers)}}
    if resampler:
        spec[resampler] = {"0": {"conv": _conv_spec(3, cout, cout)}}
    return spec


def _spec(config: VAEConfig) -> dict:
    """Every parameter of the model, named and shaped exactly as in diffusers (HWIO convs, (in, out) linears)."""
    top, bottom, latent = config.block_out_channels[-1], config.decoder_channels[-1], config.latent_channels
    spec = {
        "encoder": {
            "conv_in": _conv_spec(3, config.in_channels, config.block_out_channels[0]),
            "down_blocks": {str(i): _block_spec(cin, cout, config.layers_per_block, resampler)
                            for i, (cin, cout, resampler) in enumerate(_encoder_stages(config))},
            "mid_block": _mid_block_spec(config, top),
            "conv_norm_out": _norm_spec(top),
            "conv_out": _conv_spec(3, top, 2 * latent),
        },
        "decoder": {
            "conv_in": _conv_spec(3, latent, bottom),
            "mid_block": _mid_block_spec(config, bottom),
            "up_blocks": {str(i): _block_spec(cin, cout, config.layers_per_block + 1, resampler)
                          for i, (cin, cout, resampler) in enumerate(_decoder_stages(config))},
            "conv_norm_out": _norm_spec(config.decoder_channels[0]),
            "conv_out": _conv_spec(3, config.decoder_channels[0], config.out_channels),
        },
    }
    if config.use_quant_conv:
        spec["quant_conv"] = _conv_spec(1, 2 * latent, 2 * latent)
    if config.use_post_quant_conv:
        spec["post_quant_conv"] = _conv_spec(1, latent, latent)
    spec["bn"] = {"running_mean": _Leaf((config.token_channels,)),
                  "running_var": _Leaf((config.token_channels,), fill=1.0)}
    return spec


def init(config: VAEConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters with diffusers' names and shapes, drawn as torch's default initialisation would."""
    leaves = P.flatten(_spec(config))
    sizes = {path: math.prod(leaf.shape) for path, leaf in leaves.items() if leaf.bound is not None}
    noise = jax.random.uniform(key, (sum(sizes.values()),), dtype, -1.0, 1.0)
    out, offset = {}, 0
    for path, leaf in leaves.items():
        if leaf.bound is None:
            out[path] = jnp.full(leaf.shape, leaf.fill, dtype)
        else:
            out[path] = noise[offset:offset + sizes[path]].reshape(leaf.shape) * jnp.asarray(leaf.bound, dtype)
            offset += sizes[path]
    return P.unflatten(out)


def trainable(params: Params) -> Params:
    """The weights without the BN running statistics, which are data statistics rather than learned parameters."""
    return {k: v for k, v in params.items() if k != "bn"}


def param_count(config: VAEConfig) -> int:
    """Number of weights (BN statistics excluded), counted on shapes only: 84,046,115 for the "flux2" preset."""
    return P.count(trainable(jax.eval_shape(lambda: init(config, jax.random.key(0)))))


# ----------------------------------------------------------------------------------------------------------------------
# Forward pass.


def _resnet(p: Params, x: jax.Array, config: VAEConfig) -> jax.Array:
    """diffusers' `ResnetBlock2D` without a time embedding: pre-norm, SiLU, two 3x3 convs, 1x1 skip on width change."""
    groups, ops = config.norm_num_groups, config.kernels
    h = conv2d(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, groups, NORM_EPS)), kernels=ops)
    h = conv2d(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, groups, NORM_EPS)), kernels=ops)
    skip = conv2d(p["conv_shortcut"], x, kernels=ops) if "conv_shortcut" in p else x
    return skip + h


def _attention(p: Params, x: jax.Array, config: VAEConfig) -> jax.Array:
    """The mid-block self-attention: one head as wide as the channels, over all pixels, with a residual.

    The softmax runs in at least float32, as `upcast_softmax=True` in diffusers. FLUX.2's VAE at 1024 px attends
    over 16,384 pixels, whose full score matrix is 1 GiB per image: the "chunked" kernel never forms it.
    """
    b, h, w, c = x.shape
    tokens = group_norm(p["group_norm"], x, config.norm_num_groups, NORM_EPS).reshape(b, h * w, 1, c)
    q, k, v = (linear(p[name], tokens) for name in ("to_q", "to_k", "to_v"))
    out = kernels.attention(q, k, v, config.attention).reshape(b, h, w, c)
    return x + linear(p["to_out"]["0"], out)


def _mid_block(p: Params, x: jax.Array, config: VAEConfig) -> jax.Array:
    x = _resnet(p["resnets"]["0"], x, config)
    if config.mid_block_add_attention:
        x = _attention(p["attentions"]["0"], x, config)
    return _resnet(p["resnets"]["1"], x, config)


def _downsample(p: Params, x: jax.Array, ops: str) -> jax.Array:
    """Stride-2 3x3 conv after padding only the bottom and right by one (diffusers `Downsample2D`, padding=0)."""
    return conv2d(p["conv"], x, stride=2, padding=((0, 1), (0, 1)), kernels=ops)


# Which rows (and, the same, columns) of a 3x3 kernel applied after nearest-neighbour x2 upsampling fall on the
# low-resolution offsets (-1, 0) for an even output row and on (0, +1) for an odd one.
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def _phase_kernel(kernel: jax.Array, row_phase: int, col_phase: int) -> jax.Array:
    """The 2x2 kernel that output phase (row_phase, col_phase) of upsample-then-conv applies to the low-res input."""
    rows = [sum(kernel[i] for i in taps) for taps in _PHASE_TAPS[row_phase]]
    return jnp.stack([jnp.stack([sum(row[j] for j in taps) for taps in _PHASE_TAPS[col_phase]]) for row in rows])


def _upsample(p: Params, x: jax.Array, ops: str) -> jax.Array:
    """Nearest-neighbour x2 then a 3x3 conv (diffusers `Upsample2D`), computed as four 2x2 convs of the input.

    Through the 3x3 kernel each output pixel of the x2 grid sees only 2x2 distinct input pixels, so the four output
    phases are 2x2 convolutions of the low-resolution input with summed kernel taps: 16 instead of 36 multiply-adds
    per input pixel and channel pair, no upsampled copy, and no reduce-window in the backward pass. Equal up to
    rounding (float64: 1e-14).
    """
    b, h, w, _ = x.shape
    kernel = p["conv"]["kernel"].astype(x.dtype)
    phases = [conv2d({"kernel": _phase_kernel(kernel, r, c)}, x, padding=((1 - r, r), (1 - c, c)), kernels=ops)
              for r in (0, 1) for c in (0, 1)]
    y = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, -1)
    return y + p["conv"]["bias"].astype(x.dtype) if "bias" in p["conv"] else y


_RESAMPLERS = {"downsamplers": _downsample, "upsamplers": _upsample}


def _block(p: Params, x: jax.Array, layers: int, resampler: str | None, config: VAEConfig) -> jax.Array:
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: `layers` resnets, then the optional resampler."""
    for j in range(layers):
        x = _resnet(p["resnets"][str(j)], x, config)
    return _RESAMPLERS[resampler](p[resampler]["0"], x, config.kernels) if resampler else x


def _head(p_norm: Params, p_conv: Params, x: jax.Array, config: VAEConfig) -> jax.Array:
    h = jax.nn.silu(group_norm(p_norm, x, config.norm_num_groups, NORM_EPS))
    return conv2d(p_conv, h, kernels=config.kernels)


def _check(what: str, x: jax.Array, rank: int, channels: int, layout: str) -> None:
    if x.ndim != rank or x.shape[-1] != channels:
        raise ValueError(f"{what}: expected shape {layout} with {channels} channels, got {tuple(x.shape)}")


def _check_sides(what: str, height: int, width: int, multiple: int) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"{what}: expected height and width positive multiples of {multiple}, got {height}x{width}")


def encode(params: Params, config: VAEConfig, images: jax.Array) -> jax.Array:
    """NHWC images in [-1, 1] -> posterior mode `(B, H/8, W/8, latent_channels)`, as `latent_dist.mode()`.

    The mode is the first half of the moments (`DiagonalGaussianDistribution` chunks mean before log-variance).
    """
    _check("vae.encode images", images, 4, config.in_channels, "(B, H, W, C)")
    _check_sides("vae.encode images", images.shape[1], images.shape[2], config.spatial_factor)
    enc = params["encoder"]
    x = conv2d(enc["conv_in"], images, kernels=config.kernels)
    for i, (_, _, resampler) in enumerate(_encoder_stages(config)):
        x = _block(enc["down_blocks"][str(i)], x, config.layers_per_block, resampler, config)
    x = _head(enc["conv_norm_out"], enc["conv_out"], _mid_block(enc["mid_block"], x, config), config)
    if config.use_quant_conv:
        x = conv2d(params["quant_conv"], x, kernels=config.kernels)
    return x[..., :config.latent_channels]


def decode(params: Params, config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Latents `(B, h, w, latent_channels)` -> NHWC images `(B, 8h, 8w, out_channels)`, roughly in [-1, 1]."""
    _check("vae.decode latents", latents, 4, config.latent_channels, "(B, h, w, C)")
    dec = params["decoder"]
    x = conv2d(params["post_quant_conv"], latents, kernels=config.kernels) if config.use_post_quant_conv else latents
    x = _mid_block(dec["mid_block"], conv2d(dec["conv_in"], x, kernels=config.kernels), config)
    for i, (_, _, resampler) in enumerate(_decoder_stages(config)):
        x = _block(dec["up_blocks"][str(i)], x, config.layers_per_block + 1, resampler, config)
    return _head(dec["conv_norm_out"], dec["conv_out"], x, config)


# ----------------------------------------------------------------------------------------------------------------------
# The FLUX.2 latent interface: patchify, BN normalisation, packing.


def patchify(latents: jax.Array) -> jax.Array:
    """`(B, h, w, C) -> (B, h/2, w/2, 4C)` with channel `c*4 + pi*2 + pj`, the order of `_patchify_latents`."""
    if latents.ndim != 4 or latents.shape[1] % 2 or latents.shape[2] % 2:
        raise ValueError(f"vae.patchify: expected (B, h, w, C) with even h and w, got {tuple(latents.shape)}")
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def unpatchify(latents: jax.Array) -> jax.Array:
    """The inverse of `patchify`: `(B, h, w, 4C) -> (B, 2h, 2w, C)`."""
    if latents.ndim != 4 or latents.shape[-1] % 4:
        raise ValueError(f"vae.unpatchify: expected (B, h, w, 4C), got {tuple(latents.shape)}")
    b, h, w, c4 = latents.shape
    x = latents.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def _bn_stats(params: Params, config: VAEConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BN mean and std in the activation dtype. The std is formed in at least float32 and cast afterwards, as the
    pipeline forms it in the buffers' float32 even for bf16 latents."""
    _check("vae BN (patchified latents)", x, x.ndim, config.token_channels, "(..., C)")
    bn = params["bn"]
    var = bn["running_var"].astype(jnp.promote_types(bn["running_var"].dtype, jnp.float32))
    std = jnp.sqrt(var + config.batch_norm_eps)
    return bn["running_mean"].astype(x.dtype), std.astype(x.dtype)


def normalize(params: Params, config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Patchified latents -> the transformer's latent space: `(z - running_mean) / sqrt(running_var + eps)`."""
    mean, std = _bn_stats(params, config, latents)
    return (latents - mean) / std


def denormalize(params: Params, config: VAEConfig, latents: jax.Array) -> jax.Array:
    """The inverse of `normalize`: `z * sqrt(running_var + eps) + running_mean`."""
    mean, std = _bn_stats(params, config, latents)
    return latents * std + mean


def pack(latents: jax.Array) -> jax.Array:
    """`(B, h, w, C) -> (B, h*w, C)`, h-major, the token order of `_pack_latents` and `_prepare_latent_ids`."""
    if latents.ndim != 4:
        raise ValueError(f"vae.pack: expected (B, h, w, C), got {tuple(latents.shape)}")
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """`(B, h*w, C) -> (B, h, w, C)`; the inverse of `pack` (`_unpack_latents_with_ids` on a full id grid)."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"vae.unpack: expected (B, {h}*{w}={h * w}, C) tokens, got {tuple(tokens.shape)}")
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])


def encode_tokens(params: Params, config: VAEConfig, images: jax.Array) -> jax.Array:
    """NHWC images in [-1, 1] -> normalised tokens `(B, H/16 * W/16, 4 * latent_channels)`, as the pipeline."""
    _check("vae.encode_tokens images", images, 4, config.in_channels, "(B, H, W, C)")
    _check_sides("vae.encode_tokens images", images.shape[1], images.shape[2], config.token_factor)
    return pack(normalize(params, config, patchify(encode(params, config, images))))


def decode_tokens(params: Params, config: VAEConfig, tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Tokens from `encode_tokens` (or the transformer) -> NHWC images of `height` x `width` pixels."""
    _check("vae.decode_tokens tokens", tokens, 3, config.token_channels, "(B, N, C)")
    _check_sides("vae.decode_tokens height/width", height, width, config.token_factor)
    h, w = height // config.token_factor, width // config.token_factor
    if tokens.shape[1] != h * w:
        raise ValueError(f"vae.decode_tokens: {height}x{width} px needs {h}*{w}={h * w} tokens, "
                         f"got {tokens.shape[1]}")
    return decode(params, config, unpatchify(denormalize(params, config, unpack(tokens, h, w))))
