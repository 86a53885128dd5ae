"""The FLUX.2 transformer (diffusers' `Flux2Transformer2DModel`) as a pure function over a parameter pytree.

Parameters are nested dicts named like the diffusers state dict (see `foa_jax.params`), except that the double and
single blocks are stored once with a leading layer axis and run with `lax.scan`: compile time then stays flat in depth
and `jax.checkpoint` (remat) wraps one block instead of 56.

What makes FLUX.2 differ from FLUX.1 shows up here: modulation is computed once per block type and
shared by every block of that type; nothing has a bias; the MLP is SwiGLU; RoPE has four axes (T, H, W, L); there is
no pooled text vector. Reference images are just more image tokens with their own position ids (T = 10, 20, ...),
concatenated after the noisy tokens by the caller.

An optional LoRA (`foa_jax.lora`: an `Adapter`, which carries its alpha/rank, or a bare tree with `lora_scale`)
mirrors the parameter tree at the adapted Linears; it is applied inside the matmuls, `x·W + s·(x·A)·B`, so merged
weights are never materialised and the frozen base can stay in bf16.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import jax
import jax.numpy as jnp
import numpy as np

from foa_jax import lora as lora_lib
from foa_jax.models import kernels, layers

STACKS = ("transformer_blocks", "single_transformer_blocks")
DTYPES = ("float32", "bfloat16", "float16", "float64")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
POLICY_FIELDS = frozenset({"dtype", "remat", "scan_unroll", "attention", "kernels"})  # how to run: no diffusers key


@dataclass(frozen=True)
class Flux2Config:
    """Architecture (diffusers' config keys, same defaults = FLUX.2-dev) plus the execution policy.

    `dtype` is the compute dtype; parameters may be stored in any float dtype and are cast at use. `remat` chooses the
    rematerialisation policy of one scanned block ("none", "full" = save nothing, or a `jax.checkpoint_policies` name).
    `scan_unroll` is the number of blocks per iteration of each block stack's `lax.scan` (its `unroll`); a value at
    least the stack's depth unrolls it completely. Rolled, a scan under autodiff copies every residual of every block
    into a stacked buffer and back out for the backward pass; unrolled, each block keeps its own buffers (faster for
    the tiny preset on the CPU, docs/performance.md, 2026-12-03 late afternoon), at compile time that grows with
    depth. The real-size presets stay rolled.

    `attention` names the attention kernel ("xla", "cudnn", "chunked") and `kernels` the operation set ("reference",
    "cpu"), see `foa_jax.models.kernels`; left None, both are picked from the platform when the config is made
    (`describe` says which).
    """

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    attention: str | None = None
    kernels: str | None = None
    _picked: frozenset = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        positive = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                    "timestep_guidance_channels", "rope_theta")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Flux2Config.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_layers", "num_single_layers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"Flux2Config.{name} must be >= 0, got {getattr(self, name)}")
        if self.patch_size != 1:
            raise ValueError(f"Flux2Config.patch_size: FLUX.2 patchifies in the VAE, expected 1, got {self.patch_size}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"Flux2Config.axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}, got {sum(self.axes_dims_rope)}")
        if len(self.axes_dims_rope) != 4 or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"Flux2Config.axes_dims_rope must be 4 even sizes (T, H, W, L), got {self.axes_dims_rope}")
        if self.timestep_guidance_channels % 2:
            raise ValueError(f"Flux2Config.timestep_guidance_channels must be even, got {self.timestep_guidance_channels}")
        if self.mlp_ratio <= 0 or self.eps <= 0:
            raise ValueError(f"Flux2Config: mlp_ratio and eps must be positive, got {self.mlp_ratio}, {self.eps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Flux2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Flux2Config.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"Flux2Config.scan_unroll must be an integer >= 1, got {self.scan_unroll!r}")
        # The presets below are made while this module is imported: `kernels.Presets` picks their kernels when read.
        kernels.settle(self, self.dtype, self.attention_head_dim, resolve="PRESETS" in globals())

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes) -> "Flux2Config":
        """A copy with `changes`; kernels that were picked from the platform are picked again (for the new dtype)."""
        return dataclasses.replace(self, **kernels.repick(self, changes))

    def describe(self) -> str:
        """One line: the kernels this config runs and whether the platform picked them."""
        return kernels.describe(self)

    def to_diffusers(self) -> dict:
        """Keyword arguments that build the same architecture as `Flux2Transformer2DModel(**kwargs)`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and f.name not in POLICY_FIELDS}

    @classmethod
    def from_diffusers(cls, config: dict, **policy) -> "Flux2Config":
        """From a diffusers `config.json` dict; bookkeeping keys (`_class_name`, ...) are dropped, unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls) if f.init} - POLICY_FIELDS
        arch = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise ValueError(f"Flux2Config.from_diffusers: unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**arch, **policy)


PRESETS = kernels.Presets({
    "flux2-dev": Flux2Config(),
    "klein-4b": Flux2Config(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                            guidance_embeds=False),
    "klein-9b": Flux2Config(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                            guidance_embeds=False),
    # Trains from scratch on 2 CPU cores; 128 input channels = the tiny VAE's 32 latents x 2x2, as FLUX.2's.
    # Both stacks are 2 blocks deep and unrolled (see `scan_unroll`). RoPE gives the image axes 6 frequencies each
    # (FLUX.2 splits evenly): with 4 a token finds its own reference token slowly.
    "tiny": Flux2Config(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32,
                        num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 12, 12, 4), scan_unroll=2),
})


def preset(name: str, **overrides) -> Flux2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# --------------------------------------------------------------------------------------------------- initialisation


def _shapes(config: Flux2Config) -> dict:
    """Every parameter's shape, in the tree layout; the single source for `init` and the parameter count."""
    d, f, hd = config.inner_dim, config.mlp_hidden_dim, config.attention_head_dim
    n2, n1 = config.num_layers, config.num_single_layers

    def lin(i, o, *lead):
        return {"kernel": (*lead, i, o)}

    def mlp():
        return {"linear_1": lin(config.timestep_guidance_channels, d), "linear_2": lin(d, d)}

    def norm(*lead):
        return {"scale": (*lead, hd)}

    tree = {
        "time_guidance_embed": {"timestep_embedder": mlp()},
        "double_stream_modulation_img": {"linear": lin(d, 6 * d)},
        "double_stream_modulation_txt": {"linear": lin(d, 6 * d)},
        "single_stream_modulation": {"linear": lin(d, 3 * d)},
        "x_embedder": lin(config.in_channels, d),
        "context_embedder": lin(config.joint_attention_dim, d),
        "transformer_blocks": {
            "attn": {
                "to_q": lin(d, d, n2), "to_k": lin(d, d, n2), "to_v": lin(d, d, n2),
                "norm_q": norm(n2), "norm_k": norm(n2),
                "to_out": {"0": lin(d, d, n2)},
                "norm_added_q": norm(n2), "norm_added_k": norm(n2),
                "add_q_proj": lin(d, d, n2), "add_k_proj": lin(d, d, n2), "add_v_proj": lin(d, d, n2),
                "to_add_out": lin(d, d, n2),
            },
            "ff": {"linear_in": lin(d, 2 * f, n2), "linear_out": lin(f, d, n2)},
            "ff_context": {"linear_in": lin(d, 2 * f, n2), "linear_out": lin(f, d, n2)},
        },
        "single_transformer_blocks": {
            "attn": {
                "to_qkv_mlp_proj": lin(d, 3 * d + 2 * f, n1),
                "norm_q": norm(n1), "norm_k": norm(n1),
                "to_out": lin(d + f, d, n1),
            },
        },
        "norm_out": {"linear": lin(d, 2 * d)},
        "proj_out": lin(d, config.out_dim),
    }
    if config.guidance_embeds:
        tree["time_guidance_embed"]["guidance_embedder"] = mlp()
    return tree


def init(config: Flux2Config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters: LeCun-normal kernels (fan-in scaled), unit norm scales.

    The real model is always loaded from a checkpoint (`ports.convert`); this init exists for the tiny preset, which
    trains from scratch, and for `jax.eval_shape` on the real sizes.
    """
    shapes = jax.tree.leaves(_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    keys = iter(jax.random.split(key, len(shapes)))

    def make(path, shape):
        if path[-1].key == "scale":
            return jnp.ones(shape, dtype)
        fan_in = shape[-2]
        return (jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, _shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def param_count(config: Flux2Config) -> int:
    """Exact parameter count without allocating anything."""
    return int(sum(np.prod(s) for s in jax.tree.leaves(_shapes(config), is_leaf=lambda x: isinstance(x, tuple))))


# ------------------------------------------------------------------------------------------------------- embeddings


def timestep_embedding(t: jax.Array, channels: int) -> jax.Array:
    """Sinusoidal embedding `[cos(t·f), sin(t·f)]`, f_k = 10000^(-k/(channels/2)), computed in float32.

    diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`; `t` is already multiplied by 1000.
    """
    half = channels // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def rope_table(ids: jax.Array, axes_dims: tuple[int, ...], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (S, head_dim) for 4-axis position ids (S, 4), repeat-interleaved per rotation pair.

    Angles are computed in float32 as BFL's reference does (diffusers uses float64; under `jax.enable_x64` this
    follows it), so channels 2k and 2k+1 of axis a share `pos_a · theta^(-2k/dim_a)`.

    The pair tables are widened to head_dim by a gather, not a repeat: XLA:CPU counts cos and sin as cheap and
    recomputes them inside every fusion that broadcasts the table over batch and heads (each rope of each block,
    forward and backward), while a gather is a fusion boundary it does not duplicate, so the tables are computed
    once (docs/performance.md, 2026-12-03 night).
    """
    ftype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    pos = ids.astype(ftype)
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=ftype) / dim))
        angles.append(pos[:, axis, None] * omega[None, :])
    angles = jnp.concatenate(angles, axis=-1)
    channel_pair = jnp.arange(2 * angles.shape[-1]) // 2
    return tuple(jnp.take(table(angles).astype(jnp.float32), channel_pair, axis=-1) for table in (jnp.cos, jnp.sin))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, S, H, Dh) pairs (2k, 2k+1) by the table, in float32 like diffusers' `apply_rotary_emb`."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


# -------------------------------------------------------------------------------------------------------- the blocks


def _sub(tree: dict | None, *keys: str) -> dict | None:
    """Walk into a (LoRA) tree that may not have this branch; None when it does not."""
    for key in keys:
        if tree is None:
            return None
        tree = tree.get(key)
    return tree


def _proj(p: dict, lora: dict | None, scale: float, x: jax.Array, *path: str) -> jax.Array:
    """The Linear at `path`, with its LoRA branch if the adapter has one there."""
    return layers.linear(_sub(p, *path), x, lora=_sub(lora, *path), lora_scale=scale)


def _heads(x: jax.Array, head_dim: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, head_dim)


@jax.custom_vjp
def _token_affine(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """`x · scale + shift` for x (B, S, D), scale (B, 1, D) shared by all tokens, shift (B, 1, D) or (B, S, D).

    Every modulation and gate of the DiT has this form. Its gradient w.r.t. `scale` is a sum over tokens of
    `dy · x`; autodiff writes that as a multiply fused with a reduction over the middle axis, which XLA:CPU's
    YNNPACK fusion runs far slower than the same sum written as a contraction (docs/performance.md, 2026-12-02
    evening), so the backward pass is given here with the sum as an einsum.
    """
    return x * scale + shift


def _token_affine_fwd(x, scale, shift):
    return _token_affine(x, scale, shift), (x, scale, shift.shape)


def _token_affine_bwd(residuals, dy):
    x, scale, shift_shape = residuals
    acc = jnp.promote_types(dy.dtype, jnp.float32)
    d_scale = jnp.einsum("bsd,bsd->bd", dy, x, preferred_element_type=acc)[:, None].astype(scale.dtype)
    d_shift = dy if shift_shape == dy.shape else jnp.sum(dy, axis=1, keepdims=True, dtype=acc).astype(dy.dtype)
    return dy * scale, d_scale, d_shift


_token_affine.defvjp(_token_affine_fwd, _token_affine_bwd)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, config: Flux2Config) -> jax.Array:
    return _token_affine(layers.layer_norm(x, config.eps, config.kernels), 1 + scale, shift)


def _gated(x: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
    """The gated residual `x + gate · y`."""
    return _token_affine(y, gate, x)


@jax.custom_vjp
def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU, silu(gate) · up, of the two halves of the MLP-in projection (separate products, see
    `layers.linear_pieces`).

    The backward pass recomputes the sigmoid from the two inputs, the only residuals: autodiff kept five (tokens,
    mlp_hidden) arrays (both halves, sigmoid, silu and a product), the largest activations of the block.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
    """d gate = dy · up · σ(g)(1 + g(1 − σ(g))), d up = dy · silu(g)."""
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return dy * up * (sig + silu * (1 - sig)), dy * silu


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _feed_forward(p, lora, s, x, name, kernels):
    f = p[name]["linear_out"]["kernel"].shape[0]
    gate, up = layers.linear_pieces(p[name]["linear_in"], [x], [f, f], _sub(lora, name, "linear_in"), s, kernels)
    return _proj(p, lora, s, _swiglu(gate, up), name, "linear_out")


def _qk(p, lora, s, x, names, norms, config: Flux2Config):
    q, k, v = (_heads(_proj(p, lora, s, x, "attn", n), config.attention_head_dim) for n in names)
    q = layers.rms_norm(p["attn"][norms[0]], q, config.eps, config.kernels)
    k = layers.rms_norm(p["attn"][norms[1]], k, config.eps, config.kernels)
    return q, k, v


def double_block(p, lora, lora_scale, x, c, mod_img, mod_txt, rope, config: Flux2Config):
    """One `Flux2TransformerBlock`: joint attention over [text, image], separate weights per stream."""
    s, ops = lora_scale, config.kernels
    (shift1, scale1, gate1), (shift2, scale2, gate2) = mod_img
    (c_shift1, c_scale1, c_gate1), (c_shift2, c_scale2, c_gate2) = mod_txt

    x_n = _modulate(x, shift1, scale1, config)
    c_n = _modulate(c, c_shift1, c_scale1, config)
    q, k, v = _qk(p, lora, s, x_n, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), config)
    cq, ck, cv = _qk(p, lora, s, c_n, ("add_q_proj", "add_k_proj", "add_v_proj"),
                     ("norm_added_q", "norm_added_k"), config)
    q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = kernels.attention(q, k, v, config.attention)
    c_attn, x_attn = out[:, : c.shape[1]], out[:, c.shape[1]:]

    x = _gated(x, gate1, _proj(p, lora, s, x_attn, "attn", "to_out", "0"))
    x = _gated(x, gate2, _feed_forward(p, lora, s, _modulate(x, shift2, scale2, config), "ff", ops))
    c = _gated(c, c_gate1, _proj(p, lora, s, c_attn, "attn", "to_add_out"))
    c = _gated(c, c_gate2, _feed_forward(p, lora, s, _modulate(c, c_shift2, c_scale2, config), "ff_context", ops))
    return x, c


def single_block(p, lora, lora_scale, h, mod, rope, config: Flux2Config):
    """One `Flux2SingleTransformerBlock`: the parallel (ViT-22B) block with fused QKV+MLP-in and attn+MLP-out."""
    d, hd, eps, s, ops = config.inner_dim, config.attention_head_dim, config.eps, lora_scale, config.kernels
    shift, scale, gate = mod
    f = config.mlp_hidden_dim
    q, k, v, mlp_gate, mlp_up = layers.linear_pieces(
        p["attn"]["to_qkv_mlp_proj"], [_modulate(h, shift, scale, config)], [d, d, d, f, f],
        _sub(lora, "attn", "to_qkv_mlp_proj"), s, ops)
    q = apply_rope(layers.rms_norm(p["attn"]["norm_q"], _heads(q, hd), eps, ops), *rope)
    k = apply_rope(layers.rms_norm(p["attn"]["norm_k"], _heads(k, hd), eps, ops), *rope)
    attn = kernels.attention(q, k, _heads(v, hd), config.attention)
    out, = layers.linear_pieces(p["attn"]["to_out"], [attn, _swiglu(mlp_gate, mlp_up)], [d],
                                _sub(lora, "attn", "to_out"), s, ops)
    return _gated(h, gate, out)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    return jax.checkpoint(fn, prevent_cse=False, policy=getattr(jax.checkpoint_policies, policy))


def _scan_blocks(block_fn, carry, stacked_params, stacked_lora, config: Flux2Config):
    """Run a stack of identical blocks with `lax.scan` (rematerialised and unrolled as `config` says), LoRA slices
    riding along."""

    def step(carry, layer):
        p, lora = layer
        return block_fn(p, lora, carry), None

    carry, _ = jax.lax.scan(_remat(step, config.remat), carry, (stacked_params, stacked_lora),
                            unroll=config.scan_unroll)
    return carry


# ---------------------------------------------------------------------------------------------------------- forward


def _split_mod(mod: jax.Array, sets: int):
    """(B, 3·sets·D) -> `sets` tuples of (shift, scale, gate), each (B, 1, D) for broadcasting over tokens."""
    chunks = jnp.split(mod[:, None, :], 3 * sets, axis=-1)
    return tuple(tuple(chunks[3 * i: 3 * i + 3]) for i in range(sets))


def _ids_2d(ids: jax.Array, name: str, length: int) -> jax.Array:
    """diffusers uses only batch element 0 of 3-D ids: all batch elements must share positions."""
    ids = jnp.asarray(ids)
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape != (length, 4):
        raise ValueError(f"{name}: expected shape ({length}, 4) or (B, {length}, 4), got {tuple(ids.shape)}")
    return ids


def _check_inputs(config, hidden_states, encoder_hidden_states, timestep, guidance):
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != config.in_channels:
        raise ValueError(f"hidden_states: expected (B, N, {config.in_channels}), got {tuple(hidden_states.shape)}")
    b = hidden_states.shape[0]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != config.joint_attention_dim:
        raise ValueError(f"encoder_hidden_states: expected (B, L, {config.joint_attention_dim}), "
                         f"got {tuple(encoder_hidden_states.shape)}")
    if encoder_hidden_states.shape[0] != b:
        raise ValueError(f"batch mismatch: hidden_states has batch {b}, "
                         f"encoder_hidden_states has {encoder_hidden_states.shape[0]}")
    for name, value in (("timestep", timestep), ("guidance", guidance)):
        if value is not None and jnp.shape(value) not in ((b,), ()):
            raise ValueError(f"{name}: expected shape ({b},) or a scalar, got {tuple(jnp.shape(value))}")
    if guidance is not None and not config.guidance_embeds:
        raise ValueError("guidance was given but this model has no guidance embedder (guidance_embeds=False)")


def apply(
    params: dict,
    config: Flux2Config,
    hidden_states: jax.Array,
    encoder_hidden_states: jax.Array,
    timestep: jax.Array,
    img_ids: jax.Array,
    txt_ids: jax.Array,
    guidance: jax.Array | None = None,
    lora=None,
    lora_scale: float | None = None,
) -> jax.Array:
    """Velocity prediction for every image token; mirrors `Flux2Transformer2DModel.forward`.

    hidden_states (B, N_img + N_ref, in_channels); encoder_hidden_states (B, L, joint_attention_dim); timestep (B,) as
    sigma in [0, 1]; img_ids (N, 4) / txt_ids (L, 4) int position ids (3-D ids: element 0 is used, as diffusers does);
    guidance (B,) or None. Returns (B, N_img + N_ref, out_channels) in the compute dtype; callers drop the reference
    tokens. `lora` is a `foa_jax.lora.Adapter`, applied at its own alpha/rank (times `lora_scale`, a strength like
    diffusers' `scale`), or a bare adapter tree applied at `lora_scale`, its alpha/rank (see `lora.resolve`).
    """
    _check_inputs(config, hidden_states, encoder_hidden_states, timestep, guidance)
    lora, lora_scale = lora_lib.resolve(lora, lora_scale)
    dtype = jnp.dtype(config.dtype)
    b, n = hidden_states.shape[:2]
    length = encoder_hidden_states.shape[1]
    img_ids = _ids_2d(img_ids, "img_ids", n)
    txt_ids = _ids_2d(txt_ids, "txt_ids", length)
    x = hidden_states.astype(dtype)

    def embed_time(value, name):
        t = jnp.broadcast_to(jnp.asarray(value).astype(dtype) * 1000, (b,))
        emb = timestep_embedding(t, config.timestep_guidance_channels).astype(dtype)
        mlp = params["time_guidance_embed"][name]
        return layers.linear(mlp["linear_2"], jax.nn.silu(layers.linear(mlp["linear_1"], emb)))

    temb = embed_time(timestep, "timestep_embedder")
    if guidance is not None:
        temb = temb + embed_time(guidance, "guidance_embedder")
    silu_temb = jax.nn.silu(temb)
    mod_img = _split_mod(layers.linear(params["double_stream_modulation_img"]["linear"], silu_temb), 2)
    mod_txt = _split_mod(layers.linear(params["double_stream_modulation_txt"]["linear"], silu_temb), 2)
    mod_single = _split_mod(layers.linear(params["single_stream_modulation"]["linear"], silu_temb), 1)[0]

    x = layers.linear(params["x_embedder"], x)
    c = layers.linear(params["context_embedder"], encoder_hidden_states.astype(dtype))
    rope = rope_table(jnp.concatenate([txt_ids, img_ids], axis=0), config.axes_dims_rope, config.rope_theta)

    x, c = _scan_blocks(
        lambda p, lo, xc: double_block(p, lo, lora_scale, *xc, mod_img, mod_txt, rope, config),
        (x, c), params["transformer_blocks"], _sub(lora, "transformer_blocks"), config)
    h = jnp.concatenate([c, x], axis=1)
    h = _scan_blocks(
        lambda p, lo, hh: single_block(p, lo, lora_scale, hh, mod_single, rope, config),
        h, params["single_transformer_blocks"], _sub(lora, "single_transformer_blocks"), config)
    h = h[:, length:]

    scale, shift = jnp.split(layers.linear(params["norm_out"]["linear"], silu_temb)[:, None, :], 2, axis=-1)
    return layers.linear(params["proj_out"], _modulate(h, shift, scale, config))
