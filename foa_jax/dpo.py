"""FoA-SR profile DPO (paper Eq. 8–9): Diffusion-DPO on flow-matching velocities over mined latent pairs.

For a pair `(c, z_w, z_l)` one `t` and one `ε` are drawn and shared by winner and loser, policy and reference, so the
only thing that differs between the four flow-matching errors is the latent and the weights:

    Δ     = [L_θ(z_w) − L_ref(z_w)] − [L_θ(z_l) − L_ref(z_l)]
    L_DPO = −log σ(−β/2 · Δ)

The policy is a LoRA (initialised from Flux2SR), the reference the frozen Flux2SR; gradients reach only the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from foa_jax import losses


@dataclass(frozen=True)
class DPOConfig:
    """β and the timestep sampler. β = 1000 is ours: the paper prints none (Diffusion-DPO used 5000 on SD1.5,
    flow-matching DPO on FLUX 100–2000); it scales per-sample MSE differences, so it is tied to the latent scale."""

    beta: float = 1000.0
    timesteps: str = "uniform"

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if self.timesteps not in losses.TIMESTEP_SCHEMES:
            raise ValueError(f"DPOConfig.timesteps must be one of {losses.TIMESTEP_SCHEMES}, got {self.timesteps!r}")


def dpo_terms(policy_w, policy_l, reference_w, reference_l, beta: float) -> tuple[jax.Array, jax.Array]:
    """Per-pair (loss, Δ) from the four per-sample flow-matching errors (Eq. 8–9).

    `−log σ(x)` is computed as `softplus(−x)`, which stays finite for large |β·Δ|.
    """
    delta = (policy_w - reference_w) - (policy_l - reference_l)
    return jax.nn.softplus(0.5 * beta * delta), delta


def dpo_loss(
    predict: Callable[[dict | None, jax.Array, jax.Array, jax.Array], jax.Array],
    policy: dict,
    reference: dict | None,
    batch: dict,
    key: jax.Array,
    config: DPOConfig,
) -> tuple[jax.Array, dict]:
    """Mean DPO loss of a batch {"z_w", "z_l", "cond"} (B, N, C) -> (loss, metrics).

    `predict(adapter, z_t, cond, t)` is the velocity of the noisy tokens under an adapter (None = the base model).
    Winner and loser run as one batch of 2B through each model. Metrics: the loss, implicit accuracy (fraction of
    pairs with −Δ > 0, i.e. the policy already prefers the winner more than the reference does), mean Δ, the reward
    margin −β/2·Δ, and the four mean errors.
    """
    z_w, z_l, cond = batch["z_w"], batch["z_l"], batch["cond"]
    if z_w.shape != z_l.shape or z_w.shape != cond.shape:
        raise ValueError(f"dpo_loss: z_w {z_w.shape}, z_l {z_l.shape} and cond {cond.shape} must have one shape")
    b = z_w.shape[0]
    key_t, key_noise = jax.random.split(key)
    t = losses.sample_t(key_t, b, config.timesteps)
    noise = jax.random.normal(key_noise, z_w.shape, z_w.dtype)
    z = jnp.concatenate([z_w, z_l])
    z_t, target = losses.interpolate(z, jnp.concatenate([noise, noise]), jnp.concatenate([t, t]))
    t2, cond2 = jnp.concatenate([t, t]), jnp.concatenate([cond, cond])

    policy_err = losses.per_sample_flow_matching(predict(policy, z_t, cond2, t2), target)
    reference_err = jax.lax.stop_gradient(
        losses.per_sample_flow_matching(predict(reference, z_t, cond2, t2), target))
    loss, delta = dpo_terms(policy_err[:b], policy_err[b:], reference_err[:b], reference_err[b:], config.beta)
    metrics = {
        "loss": jnp.mean(loss),
        "accuracy": jnp.mean((delta < 0).astype(jnp.float32)),
        "delta": jnp.mean(delta),
        "reward_margin": jnp.mean(-0.5 * config.beta * delta),
        "policy_w": jnp.mean(policy_err[:b]),
        "policy_l": jnp.mean(policy_err[b:]),
        "reference_w": jnp.mean(reference_err[:b]),
        "reference_l": jnp.mean(reference_err[b:]),
    }
    return metrics["loss"], metrics
