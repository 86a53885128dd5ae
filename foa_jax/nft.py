"""LucidNFT: decoupled multi-reward advantages, the DiffusionNFT objective and its "old" policy, as array functions.

Each LR input gets a group of K rollouts from the old policy; every rollout is scored by M rewards, so one batch of
rewards is an array `(G, K, M)` (groups, rollouts per group, rewards) with one weight w_m per reward.

    decoupled (LucidNFT):    A = Σ_m w_m (r_m − mean_g r_m) / (std_g r_m + ε)
    scalarised (DiffusionNFT, flow_grpo with a global std):
                             s = Σ_m w_m r_m,   A = (s − mean_g s) / (std_batch s + ε)
    reward weight:           r = clip(A, −c, c) / c / 2 + 1/2  ∈ [0, 1]

mean_g / std_g are over the K rollouts of one group, std_batch over all G·K rollouts; every std is the population
one (NumPy's default, which flow_grpo uses) and ε = 1e-4. Scalarising first lets the reward with the largest spread
set the ranking and squeezes the others' contrasts inside a group ("advantage collapse"); z-scoring each reward
within its group first gives every reward the same say before the weights fuse them. GDPO and Flow-Factory then
z-score the fused A once more over the batch; that is `renormalise=True` here, off by default because LucidNFT's
description fuses and stops.

The DiffusionNFT objective, on a clean rollout latent x_0 with fresh noise ε and a training sigma t:

    x_t = (1 − t)·x_0 + t·ε
    v₊ = β·v_θ + (1 − β)·sg(v_old)          v₋ = (1 + β)·sg(v_old) − β·v_θ
    x̂₊ = x_t − t·v₊,  x̂₋ = x_t − t·v₋      w± = sg(mean |x̂± − x_0|) per sample, ≥ 1e-5, in float32 or wider
    L  = c · mean_b[(r·mean((x̂₊ − x_0)²)/w₊ + (1 − r)·mean((x̂₋ − x_0)²)/w₋) / β] + λ · mean((v_θ − v_ref)²)

v₊ is the velocity the policy moves toward on well-rewarded rollouts, v₋ the mirror image of the policy through the
old one, which it moves away from on badly rewarded ones; both are identical when θ = old, and the gradient there is
proportional to 1 − 2r. v_ref is the frozen reference (the LoRA switched off). The old policy is a slow copy of the
policy, `old ← d·old + (1 − d)·θ` once per epoch, with DiffusionNFT's two decay schedules.

Validation (shapes, K ≥ 2, weights, schedules) runs at the Python level on static information, so every function
also runs under `jax.jit` with weights, configs and schedule names static.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from foa_jax import losses

EPS = 1e-4  # added to every std: flow_grpo's and DiffusionNFT's value
WEIGHT_FLOOR = 1e-5  # the adaptive weights' lower clip, DiffusionNFT's value
COLLAPSE_BAND = 0.05  # |r − 1/2| below this: the rollout barely pushes either way
SCHEMES = ("decoupled", "scalarised")
DECAY_TYPES = (1, 2)


# --------------------------------------------------------------------------------------------------------------------
# Advantages


def _stat_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def _check_rewards(rewards: jax.Array, weights: Sequence[float], where: str) -> tuple[jax.Array, tuple[float, ...]]:
    """Static checks of a `(G, K, M)` reward table and its M weights -> (rewards in float32 or wider, weights as a
    tuple of floats)."""
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 3:
        raise ValueError(f"{where}: rewards must be (groups, rollouts per group, rewards), got shape "
                         f"{tuple(rewards.shape)}")
    groups, k, m = rewards.shape
    if groups < 1 or m < 1:
        raise ValueError(f"{where}: rewards of shape {tuple(rewards.shape)} hold no group or no reward")
    if k < 2:
        raise ValueError(f"{where}: K = {k} rollout per group; a group's mean and std need K >= 2")
    weights = tuple(float(w) for w in weights)
    if len(weights) != m:
        raise ValueError(f"{where}: {len(weights)} weights {weights} for {m} rewards (rewards shape "
                         f"{tuple(rewards.shape)})")
    if sum(weights) == 0:
        raise ValueError(f"{where}: the reward weights {weights} sum to zero, so the fused advantage carries no "
                         "preference")
    return rewards.astype(_stat_dtype(rewards)), weights


def _centred(x: jax.Array, axis) -> jax.Array:
    """x − mean(x) along `axis`, exactly 0 where x is constant along it.

    The values are first shifted by one of themselves (the first along the axis): a constant group then becomes
    exact zeros. Subtracting a float mean directly leaves an ulp-sized residue (mean(0.7, 0.7, 0.7) ≠ 0.7 in float32)
    that ε-division would blow up to ~1e-3 instead of the 0 a reward tie should give.
    """
    if axis is None:
        shifted = x - x.ravel()[0]
    else:
        shifted = x - jax.lax.index_in_dim(x, 0, axis=axis, keepdims=True)
    return shifted - jnp.mean(shifted, axis=axis, keepdims=axis is not None)


def _std(centred: jax.Array, axis) -> jax.Array:
    """Population std from already centred values."""
    return jnp.sqrt(jnp.mean(jnp.square(centred), axis=axis, keepdims=axis is not None))


def _batch_normalise(advantages: jax.Array, eps: float) -> jax.Array:
    centred = _centred(advantages, None)
    return centred / (_std(centred, None) + eps)


def decoupled_advantages(rewards: jax.Array, weights: Sequence[float], *, renormalise: bool = False,
                         eps: float = EPS) -> jax.Array:
    """LucidNFT's advantage `(G, K)`: each reward z-scored within its group, then the weighted sum.

    `renormalise=True` z-scores the fused advantage once more over the whole batch (GDPO / Flow-Factory).
    A reward that is constant within a group contributes exactly 0 there.
    """
    r, weights = _check_rewards(rewards, weights, "decoupled_advantages")
    centred = _centred(r, axis=1)
    z = centred / (_std(centred, axis=1) + eps)
    advantages = jnp.sum(z * jnp.asarray(weights, r.dtype), axis=-1)
    return _batch_normalise(advantages, eps) if renormalise else advantages


def scalarised_advantages(rewards: jax.Array, weights: Sequence[float], *, eps: float = EPS) -> jax.Array:
    """DiffusionNFT's baseline `(G, K)`: the weighted reward sum minus its group mean, over the batch std + ε."""
    r, weights = _check_rewards(rewards, weights, "scalarised_advantages")
    s = jnp.sum(r * jnp.asarray(weights, r.dtype), axis=-1)
    return _centred(s, axis=1) / (_std(_centred(s, None), None) + eps)


def advantages(rewards: jax.Array, weights: Sequence[float], scheme: str, *, renormalise: bool = False) -> jax.Array:
    """The advantages of `scheme` ("decoupled" | "scalarised"); `renormalise` applies to the decoupled one only."""
    if scheme == "decoupled":
        return decoupled_advantages(rewards, weights, renormalise=renormalise)
    if scheme == "scalarised":
        if renormalise:
            raise ValueError("advantages: renormalise applies to the decoupled scheme; the scalarised one is already "
                             "divided by the batch std")
        return scalarised_advantages(rewards, weights)
    raise ValueError(f"advantages: scheme must be one of {SCHEMES}, got {scheme!r}")


def _check_clip(adv_clip: float, where: str) -> float:
    adv_clip = float(adv_clip)
    if not adv_clip > 0:
        raise ValueError(f"{where}: adv_clip must be > 0, got {adv_clip}")
    return adv_clip


def reward_weight(advantages: jax.Array, adv_clip: float) -> jax.Array:
    """r = clip(A, −c, c) / c / 2 + 1/2: 1 pulls fully toward v₊, 0 fully toward v₋, 1/2 neither.

    Clipped to [0, 1] once more, as DiffusionNFT does: XLA turns the divisions into multiplications by rounded
    reciprocals, which would put A = −c at −7e-9.
    """
    c = _check_clip(adv_clip, "reward_weight")
    return jnp.clip(jnp.clip(advantages, -c, c) / c / 2 + 0.5, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# The DiffusionNFT objective


@dataclass(frozen=True)
class NFTConfig:
    """β, the advantage clip c (which also scales the policy loss) and the KL weight λ; DiffusionNFT's defaults.

    DiffusionNFT uses β = 1 for one reward and β = 0.1 for its multi-reward runs.
    """

    beta: float = 1.0
    adv_clip: float = 5.0
    kl_weight: float = 1e-4

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"NFTConfig.beta must be > 0, got {self.beta}")
        if not self.adv_clip > 0:
            raise ValueError(f"NFTConfig.adv_clip must be > 0, got {self.adv_clip}")
        if not self.kl_weight >= 0:
            raise ValueError(f"NFTConfig.kl_weight must be >= 0, got {self.kl_weight}")


def _per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def adaptive_weight(x0_hat: jax.Array, x_0: jax.Array) -> jax.Array:
    """w = mean |x̂_0 − x_0| per sample, without gradient, in float32 or wider, clipped below at 1e-5.

    Dividing each squared error by it makes the loss scale-free across samples and timesteps; the floor keeps an
    almost exact prediction from dividing by ~0.
    """
    dtype = _stat_dtype(x0_hat)
    error = jnp.abs(x0_hat.astype(dtype) - x_0.astype(dtype))
    return jax.lax.stop_gradient(jnp.maximum(_per_sample_mean(error), WEIGHT_FLOOR))


def nft_branches(v_theta: jax.Array, v_old: jax.Array, x_t: jax.Array, t: jax.Array,
                 beta: float) -> tuple[jax.Array, jax.Array]:
    """(x̂₊, x̂₋): the clean latents predicted by the positive velocity β·v_θ + (1 − β)·v_old and by the implicit
    negative one (1 + β)·v_old − β·v_θ; both equal x_t − t·v_old when v_θ = v_old."""
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    return losses.predicted_clean(x_t, v_pos, t), losses.predicted_clean(x_t, v_neg, t)


def nft_loss(v_theta: jax.Array, v_old: jax.Array, v_ref: jax.Array, x_0: jax.Array, x_t: jax.Array,
             t: jax.Array, r: jax.Array, config: NFTConfig) -> tuple[jax.Array, dict]:
    """DiffusionNFT's loss of one batch -> (loss, metrics); gradients reach only `v_theta`.

    v_theta, v_old, v_ref: the policy's, old policy's and reference's velocities at (x_t, t), all of x_0's shape
    (B, ...); t: (B,) sigmas; r: (B,) reward weights (`reward_weight`). Every term is computed in float32 or wider.
    Metrics: the loss, its policy part and the KL mean((v_θ − v_ref)²), the mean positive and negative errors (each
    divided by its w), old_deviation = mean((v_θ − v_old)²) and old_kl = mean((v_old − v_ref)²), the last two as
    DiffusionNFT logs them.
    """
    shapes = {"v_theta": v_theta.shape, "v_old": v_old.shape, "v_ref": v_ref.shape, "x_t": x_t.shape}
    for name, shape in shapes.items():
        if shape != x_0.shape:
            raise ValueError(f"nft_loss: {name} has shape {tuple(shape)}, x_0 has {tuple(x_0.shape)}")
    if x_0.ndim < 2:
        raise ValueError(f"nft_loss: x_0 must be batched (B, ...), got shape {tuple(x_0.shape)}")
    for name, value in (("t", t), ("r", r)):
        if value.shape != x_0.shape[:1]:
            raise ValueError(f"nft_loss: {name} must be ({x_0.shape[0]},), one per sample, got {tuple(value.shape)}")
    dtype = _stat_dtype(v_theta)
    v, x0, xt = v_theta.astype(dtype), x_0.astype(dtype), x_t.astype(dtype)
    v_old = jax.lax.stop_gradient(v_old.astype(dtype))
    v_ref = jax.lax.stop_gradient(v_ref.astype(dtype))
    x_pos, x_neg = nft_branches(v, v_old, xt, t.astype(dtype), config.beta)
    positive = _per_sample_mean(jnp.square(x_pos - x0)) / adaptive_weight(x_pos, x0)
    negative = _per_sample_mean(jnp.square(x_neg - x0)) / adaptive_weight(x_neg, x0)
    r = r.astype(dtype)
    policy = config.adv_clip * jnp.mean((r * positive + (1 - r) * negative) / config.beta)
    kl = jnp.mean(jnp.square(v - v_ref))
    loss = policy + config.kl_weight * kl
    metrics = {
        "loss": loss,
        "policy_loss": policy,
        "kl": kl,
        "positive": jnp.mean(positive),
        "negative": jnp.mean(negative),
        "old_deviation": jnp.mean(jnp.square(v - v_old)),
        "old_kl": jnp.mean(jnp.square(v_old - v_ref)),
    }
    return loss, metrics


def nft_objective(predict: Callable[[dict | None, jax.Array, jax.Array, jax.Array], jax.Array], policy: dict,
                  old: dict, x_0: jax.Array, cond: jax.Array, t: jax.Array, noise: jax.Array, r: jax.Array,
                  config: NFTConfig) -> tuple[jax.Array, dict]:
    """`nft_loss` with the three velocities computed here: `predict(adapter, x_t, cond, t)` under the policy, the
    old policy and the reference (adapter None), at x_t = (1 − t)·x_0 + t·noise."""
    x_t, _ = losses.interpolate(x_0, noise, t)
    v_theta = predict(policy, x_t, cond, t)
    v_old = predict(old, x_t, cond, t)
    v_ref = predict(None, x_t, cond, t)
    return nft_loss(v_theta, v_old, v_ref, x_0, x_t, t, r, config)


def training_timesteps(key: jax.Array, grid: jax.Array, batch: int, fraction: float = 0.99) -> jax.Array:
    """`(batch, int(N·fraction))` training sigmas: each row a fresh random order of the sampler's N-sigma grid, cut.

    `grid` holds the sigmas at which the sampler evaluates the model (`sampling.sigmas(...)[:-1]`, without the final
    0). Training on the rollouts' own grid keeps the loss where the sampler actually works; shuffling per sample
    spreads every timestep over the inner loop; DiffusionNFT keeps 99% of the grid (9 of 10 steps).
    """
    grid = jnp.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < 1:
        raise ValueError(f"training_timesteps: grid must be a non-empty (N,) array of sigmas, got {grid.shape}")
    if batch < 1:
        raise ValueError(f"training_timesteps: batch must be >= 1, got {batch}")
    count = int(grid.shape[0] * fraction)
    if not 0 < fraction <= 1 or count < 1:
        raise ValueError(f"training_timesteps: fraction {fraction} of a {grid.shape[0]}-step grid keeps "
                         f"{count} timesteps; it must be in (0, 1] and keep at least one")
    # argsort of i.i.d. uniforms is a uniform random permutation per row (a tie, ~N²·2⁻²⁵, still gives one, argsort
    # being stable); it compiles in milliseconds where a vmapped `jax.random.permutation` takes seconds.
    order = jnp.argsort(jax.random.uniform(key, (batch, grid.shape[0])), axis=1)
    return grid[order[:, :count]]


# --------------------------------------------------------------------------------------------------------------------
# The old policy


def old_policy_decay(step, decay_type: int):
    """DiffusionNFT's decay d of the old policy after `step` epochs.

    type 1: min(0.001·step, 0.5), an old policy that lags more and more, up to halfway;
    type 2: 0 for the first 75 steps (old = θ, on-policy), then min(0.0075·(step − 75), 0.999).
    `step` may be traced.
    """
    if decay_type == 1:
        return jnp.minimum(0.001 * jnp.asarray(step, jnp.float32), 0.5)
    if decay_type == 2:
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999))
    raise ValueError(f"old_policy_decay: decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")


def ema_update(old, new, decay):
    """old ← d·old + (1 − d)·new, leaf by leaf, each leaf keeping the old one's dtype."""
    old_tree, new_tree = jax.tree.structure(old), jax.tree.structure(new)
    if old_tree != new_tree:
        raise ValueError(f"ema_update: old and new parameters differ in structure: {old_tree} vs {new_tree}")

    def mix(o, n):
        if o.shape != n.shape:
            raise ValueError(f"ema_update: a leaf of shape {o.shape} would mix with one of shape {n.shape}")
        d = jnp.asarray(decay, _stat_dtype(o))
        return (d * o + (1 - d) * n.astype(d.dtype)).astype(o.dtype)

    return jax.tree.map(mix, old, new)


# --------------------------------------------------------------------------------------------------------------------
# Separability


def separability(advantages: jax.Array, adv_clip: float, tol: float = 1e-6) -> dict:
    """How well one scheme's advantages `(G, K)` tell the rollouts of a group apart.

    range: mean over groups of max A − min A; distinct: mean number of different advantage values in a group,
    values closer than `tol` counted as one; collapsed: the fraction of rollouts whose reward weight is within
    0.05 of 1/2, i.e. which barely pull the policy either way.
    """
    if advantages.ndim != 2 or advantages.shape[1] < 2:
        raise ValueError(f"separability: advantages must be (groups, K >= 2), got shape {tuple(advantages.shape)}")
    ordered = jnp.sort(advantages, axis=1)
    gaps = jnp.diff(ordered, axis=1) > tol
    return {
        "range": jnp.mean(ordered[:, -1] - ordered[:, 0]),
        "distinct": jnp.mean(1 + jnp.sum(gaps, axis=1)),
        "collapsed": jnp.mean(jnp.abs(reward_weight(advantages, adv_clip) - 0.5) < COLLAPSE_BAND),
    }


def sign_disagreement(a: jax.Array, b: jax.Array) -> jax.Array:
    """The fraction of rollouts whose advantage has a different sign (−, 0, +) under two schemes."""
    if a.shape != b.shape:
        raise ValueError(f"sign_disagreement: advantages of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return jnp.mean(jnp.sign(a) != jnp.sign(b))


def compare_schemes(rewards: jax.Array, weights: Sequence[float], adv_clip: float, *, renormalise: bool = False,
                    tol: float = 1e-6) -> dict:
    """Both schemes on the same rollouts: `{"decoupled": separability, "scalarised": separability,
    "sign_disagreement": fraction}`."""
    decoupled = decoupled_advantages(rewards, weights, renormalise=renormalise)
    scalarised = scalarised_advantages(rewards, weights)
    return {
        "decoupled": separability(decoupled, adv_clip, tol),
        "scalarised": separability(scalarised, adv_clip, tol),
        "sign_disagreement": sign_disagreement(decoupled, scalarised),
    }
