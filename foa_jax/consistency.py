"""LucidConsistency: does an SR output keep the content of its LR input? The cosine of two projected embeddings.

    score(LR, SR) = cos(head(emb(LR)), head(emb(SR))),    head = Linear(d, d) → GELU → Linear(d, d)

`emb` is a frozen backbone's pooled embedding of an image; the head sees that raw vector and its output is
L2-normalised. A generic embedding already places an image near its degraded copy, but also near any image of
similar style; the head is trained to pull the two apart: positives are the same content under two different
degradations (an HR crop, its Real-ESRGAN LR, another LR of it), negatives the other contents of the batch, with the
symmetric InfoNCE loss of CLIP at a fixed temperature. Because the backbone is frozen, training needs only its
embeddings, computed once; the train step takes embedding pairs.

Backbones share one interface (`Backbone`): a frozen callable from NHWC images in [0, 1] to `(B, dim)` pooled
embeddings. `VGGBackbone` is the ImageNet VGG16 trunk that LPIPS uses, in JAX; at full scale the method's own
backbone, Qwen3-VL-Embedding, runs in torch behind the same interface (`ports.qwen_embedding`).

Head parameters are a plain pytree named after the state dict of torch's `nn.Sequential(nn.Linear(d, d), nn.GELU(),
nn.Linear(d, d))`, split at the dots with Flax leaves: `0.weight` (out, in) -> `params["0"]["kernel"]` (in, out),
`0.bias` -> `params["0"]["bias"]`, and the same under `2`. `state_dict` / `from_state_dict` convert to and from the
torch names and layouts, so a head trained here loads into that torch module and back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from foa_jax import params as P
from foa_jax.models import lpips as L

Params = dict
HEAD_LAYERS = ("0", "2")  # the two Linear layers' positions in the torch Sequential (1 is the GELU)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


# --------------------------------------------------------------------------------------------------------------------
# The head and the score


def init_head(key: jax.Array, dim: int) -> Params:
    """A fresh head, drawn as torch's `nn.Linear` draws it: weight and bias ~ U(±1/√d).

    The same distribution as the torch module's default, so a run here starts where a torch run would.
    """
    if dim < 1:
        raise ValueError(f"init_head: dim must be >= 1, got {dim}")
    bound = 1.0 / math.sqrt(dim)
    keys = jax.random.split(key, 2 * len(HEAD_LAYERS))
    return {name: {"kernel": jax.random.uniform(keys[2 * i], (dim, dim), jnp.float32, -bound, bound),
                   "bias": jax.random.uniform(keys[2 * i + 1], (dim,), jnp.float32, -bound, bound)}
            for i, name in enumerate(HEAD_LAYERS)}


def head_dim(params: Params) -> int:
    """The embedding width d the head takes, checked against every leaf's shape."""
    if set(params) != set(HEAD_LAYERS):
        raise ValueError(f"head: expected layers {HEAD_LAYERS}, got {sorted(params)}")
    dim = params["0"]["kernel"].shape[0]
    for name in HEAD_LAYERS:
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        if kernel.shape != (dim, dim) or bias.shape != (dim,):
            raise ValueError(f"head: layer {name} has kernel {kernel.shape} and bias {bias.shape}, "
                             f"expected ({dim}, {dim}) and ({dim},)")
    return dim


def apply_head(params: Params, embeddings: jax.Array) -> jax.Array:
    """Linear → GELU (exact erf, torch's default) → Linear on raw `(B, d)` embeddings; not normalised."""
    if embeddings.ndim != 2 or embeddings.shape[1] != params["0"]["kernel"].shape[0]:
        raise ValueError(f"apply_head: embeddings must be (B, {params['0']['kernel'].shape[0]}), "
                         f"got {tuple(embeddings.shape)}")
    h = embeddings @ params["0"]["kernel"] + params["0"]["bias"]
    return jax.nn.gelu(h, approximate=False) @ params["2"]["kernel"] + params["2"]["bias"]


def normalise(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, 1e-12) along the last axis, as `torch.nn.functional.normalize`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise cosine of two `(B, d)` arrays."""
    if a.shape != b.shape:
        raise ValueError(f"cosine: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return jnp.sum(normalise(a) * normalise(b), axis=-1)


def score(params: Params, lr_embeddings: jax.Array, sr_embeddings: jax.Array) -> jax.Array:
    """LucidConsistency `(B,)` of LR inputs and their SR outputs, from the backbone's raw embeddings."""
    return cosine(apply_head(params, lr_embeddings), apply_head(params, sr_embeddings))


# --------------------------------------------------------------------------------------------------------------------
# Contrastive training


def info_nce(z_a: jax.Array, z_b: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE (CLIP's loss) of two `(B, d)` views where row i of each shows the same content.

    logits_ij = cos(z_a_i, z_b_j) / τ; the loss is the mean of the cross-entropies of picking b_i among the b's for
    a_i and a_i among the a's for b_i. Returns (loss, accuracy of both directions' argmax).
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2 or z_a.shape[0] < 2:
        raise ValueError(f"info_nce: two (B >= 2, d) views of one shape, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    logits = normalise(z_a) @ normalise(z_b).T / temperature
    labels = jnp.arange(z_a.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    accuracy = 0.5 * (jnp.mean(jnp.argmax(logits, 1) == labels) + jnp.mean(jnp.argmax(logits, 0) == labels))
    return loss, accuracy


@dataclass(frozen=True)
class HeadTrainConfig:
    """AdamW on the head with a cosine-decaying learning rate; InfoNCE at a fixed temperature."""

    temperature: float = 0.07  # CLIP's initial value
    lr: float = 1e-3
    weight_decay: float = 1e-4
    steps: int = 300

    def __post_init__(self):
        for name in ("temperature", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HeadTrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"HeadTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"HeadTrainConfig.steps must be an int >= 1, got {self.steps!r}")

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(optax.cosine_decay_schedule(self.lr, self.steps), weight_decay=self.weight_decay)


def init_train_state(params: Params, config: HeadTrainConfig) -> dict:
    """{"step", "params", "opt_state"}: what the train step carries and donates."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": config.optimizer().init(params)}


def make_train_step(config: HeadTrainConfig) -> Callable[[dict, jax.Array, jax.Array], tuple[dict, dict]]:
    """`step(state, emb_a, emb_b) -> (state, metrics)`, jitted with the state donated.

    emb_a, emb_b: `(B, d)` raw backbone embeddings of two views, row i the same content. The backbone is frozen, so
    only its outputs enter; gradients reach the head alone. Metrics: loss, in-batch retrieval accuracy, the mean
    positive and negative cosines after the head, the gradient norm and the learning rate.
    """
    tx = config.optimizer()
    schedule = optax.cosine_decay_schedule(config.lr, config.steps)

    def loss_fn(params, emb_a, emb_b):
        z_a, z_b = apply_head(params, emb_a), apply_head(params, emb_b)
        loss, accuracy = info_nce(z_a, z_b, config.temperature)
        similarity = normalise(z_a) @ normalise(z_b).T
        off_diagonal = 1 - jnp.eye(similarity.shape[0])
        return loss, {"accuracy": accuracy, "positive": jnp.mean(jnp.diag(similarity)),
                      "negative": jnp.sum(similarity * off_diagonal) / jnp.sum(off_diagonal)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, emb_a, emb_b):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], emb_a, emb_b)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        return new_state, {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads),
                           "lr": schedule(state["step"])}

    return step


# --------------------------------------------------------------------------------------------------------------------
# torch state-dict names


def state_dict(params: Params) -> dict[str, np.ndarray]:
    """The head as the torch Sequential's state dict: `{"0.weight": (out, in), "0.bias", "2.weight", "2.bias"}`."""
    head_dim(params)
    return {P.torch_key(path): P.to_torch_layout(path, np.asarray(leaf, np.float32))
            for path, leaf in P.flatten(params).items()}


def from_state_dict(tensors: Mapping[str, np.ndarray]) -> Params:
    """The inverse of `state_dict`; a missing, extra or mis-shaped tensor is an error naming it."""
    expected = {f"{name}.{leaf}" for name in HEAD_LAYERS for leaf in ("weight", "bias")}
    if set(tensors) != expected:
        raise ValueError(f"head state dict: expected keys {sorted(expected)}, got {sorted(tensors)}")
    flat = {}
    for name in HEAD_LAYERS:
        flat[f"{name}.kernel"] = jnp.asarray(P.from_torch_layout(f"{name}.kernel", np.asarray(tensors[f"{name}.weight"])))
        flat[f"{name}.bias"] = jnp.asarray(tensors[f"{name}.bias"])
    params = P.unflatten(flat)
    head_dim(params)
    return params


# --------------------------------------------------------------------------------------------------------------------
# Backbones


class Backbone(Protocol):
    """A frozen embedder: `(B, H, W, 3)` float images in [0, 1] -> `(B, dim)` float32 pooled embeddings."""

    dim: int

    def __call__(self, images) -> jax.Array | np.ndarray: ...


POOLINGS = ("last", "stages")


def vgg_embedding(params: Params, images: jax.Array, pooling: str) -> jax.Array:
    """Pooled VGG16 features of NHWC images in [0, 1], with LPIPS's input scaling.

    "last": the global average of relu5_3 (512); "stages": the global averages of the five tapped ReLUs (relu1_2 ..
    relu5_3), each divided by its L2 norm, concatenated (1472). Without that per-stage normalisation the stage with
    the largest activations (relu3_3, ~3x the others) would dominate every cosine.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"vgg_embedding: pooling must be one of {POOLINGS}, got {pooling!r}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"vgg_embedding: expected NHWC RGB images (B, H, W, 3), got {tuple(images.shape)}")
    taps = L.trunk_features(params, "vgg", L.scaling_layer(2 * images.astype(jnp.float32) - 1))
    pooled = [jnp.mean(tap, axis=(1, 2)) for tap in taps]
    if pooling == "last":
        return pooled[-1]
    return jnp.concatenate([normalise(p) for p in pooled], axis=-1)


_vgg_embedding = jax.jit(vgg_embedding, static_argnames="pooling")


@dataclass(frozen=True, eq=False)
class VGGBackbone:
    """The ImageNet VGG16 trunk of LPIPS, pooled, as a `Backbone`; `params` as `ports.lpips_weights` loads them.

    "stages" is the default because it trained the better head in a quick measurement on the training photos alone
    (split by photo, 41 to train on and 21 to score, 256-px crops, HR and two Real-ESRGAN LRs each, 300 steps): the
    probability that a matched LR–HR pair scores above a mismatched one was 0.86 with "stages" and 0.80 with "last"
    after the head, although the raw "last" vector ranked better (0.75 against 0.67). On all training photos the
    raw relu1_2 average alone ranked best of the five stages (0.93, relu5_3 0.80): the early stages' colour and
    texture statistics carry what the degradation leaves of the content.

    Images run through in chunks of `batch`, the last one padded to full size, so a long list never holds all
    feature maps at once and only one shape is ever compiled.
    """

    params: Params = field(repr=False)
    pooling: str = "stages"
    batch: int = 8

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"VGGBackbone.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.batch < 1:
            raise ValueError(f"VGGBackbone.batch must be >= 1, got {self.batch}")
        want = P.flatten(L.param_shapes("vgg"))
        have = P.flatten(self.params)
        for path, spec in want.items():
            if path.startswith("net.") and (path not in have or tuple(have[path].shape) != spec.shape):
                got = tuple(have[path].shape) if path in have else "missing"
                raise ValueError(f"VGGBackbone.params: {path} expected {spec.shape}, got {got}")
        object.__setattr__(self, "params", {"net": self.params["net"]})

    @property
    def dim(self) -> int:
        return 512 if self.pooling == "last" else sum(L.tap_channels("vgg"))

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        chunks = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), np.float32)])
            chunks.append(np.asarray(_vgg_embedding(self.params, padded, pooling=self.pooling))[:len(chunk)])
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
