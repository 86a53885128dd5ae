"""One jitted, donated train step per objective, with gradient accumulation; optimizer and state as plain pytrees.

The state is `{"step", "params", "opt_state", "key"}` where `params` is only what trains (a LoRA tree, or the whole
tiny transformer); frozen weights are a separate argument that is never differentiated, so gradients and optimizer
moments exist only for the trainable tree. The step folds the step number into the key and batches are chosen by a
pure function of (seed, step), so a run resumed from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warm-up, then a constant rate (the paper's schedule for its adapters) or a
    cosine decay to `final_lr` at step `decay_steps` (what the tiny models trained from scratch need: a constant
    rate stalls them)."""

    lr: float = 1e-4
    warmup: int = 200
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    schedule_kind: str = "constant"
    decay_steps: int = 0  # cosine: the step at which the rate reaches final_lr (0: the run's last, set by its stage)
    final_lr: float = 0.0

    def __post_init__(self):
        if self.lr <= 0 or self.warmup < 0 or self.grad_accum < 1 or self.clip_norm <= 0:
            raise ValueError(f"OptimConfig: need lr > 0, warmup >= 0, grad_accum >= 1, clip_norm > 0; got {self}")
        if self.schedule_kind not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule_kind must be one of {SCHEDULES}, got {self.schedule_kind!r}")
        if self.decay_steps < 0 or not 0 <= self.final_lr <= self.lr:
            raise ValueError(f"OptimConfig: need decay_steps >= 0 and 0 <= final_lr <= lr, got {self.decay_steps}, "
                             f"{self.final_lr}")

    def for_steps(self, steps: int) -> "OptimConfig":
        """This config with an unset cosine length (`decay_steps=0`) set to a run of `steps` steps (at least one step
        past the warm-up, so a short test run still has a schedule)."""
        return dataclasses.replace(self, decay_steps=self.decay_steps or max(steps, self.warmup + 1))

    def schedule(self) -> optax.Schedule:
        if self.schedule_kind == "cosine":
            if self.decay_steps <= self.warmup:
                raise ValueError(f"OptimConfig: a cosine schedule needs decay_steps > warmup ({self.warmup}), got "
                                 f"{self.decay_steps}: set it, or build the step from for_steps(run steps)")
            return optax.warmup_cosine_decay_schedule(0.0, self.lr, max(self.warmup, 1), self.decay_steps,
                                                      self.final_lr)
        return optax.warmup_constant_schedule(0.0, self.lr, max(self.warmup, 1))

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay),
        )


def init_state(params, optim: OptimConfig, key: jax.Array, sharding=None) -> dict:
    """The train state, placed on `sharding` (default: the first device).

    Placing it explicitly matters: the step returns committed arrays, and a first call with uncommitted ones would
    compile the whole step a second time on step two. `params` are copied: the step donates the state, which must not
    delete the caller's arrays (e.g. the untrained model kept for comparison).
    """
    params = jax.tree.map(jnp.array, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optim.optimizer().init(params),
             "key": key}
    return jax.device_put(state, sharding or jax.devices()[0])


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(loss_fn: Callable, optim: OptimConfig) -> Callable:
    """The pure step `(state, frozen, batch) -> (state, metrics)` that `make_step` jits.

    `loss_fn(params, frozen, micro_batch, key, step) -> (loss, terms)`. `batch` leaves have a leading
    gradient-accumulation axis of size `optim.grad_accum`; micro-batch gradients are averaged in a `lax.scan`, so memory
    holds one micro-batch's activations. Metrics: every loss term (averaged), grad norm (before clipping), the learning
    rate, parameter and update norms.
    """
    tx = optim.optimizer()
    schedule = optim.schedule()

    def step(state, frozen, batch):
        key = jax.random.fold_in(state["key"], state["step"])

        def micro(carry, inputs):
            index, micro_batch = inputs
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], frozen, micro_batch, jax.random.fold_in(key, index), state["step"])
            acc_grads, acc_terms = carry
            return (jax.tree.map(jnp.add, acc_grads, grads), jax.tree.map(jnp.add, acc_terms, terms)), None

        n = optim.grad_accum
        if n == 1:  # no loop: XLA:CPU runs convolutions inside a while loop body several times slower
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], frozen, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(key, 0),
                state["step"])
        else:
            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            first = jax.tree.map(lambda x: x[0], batch)
            term_shapes = jax.eval_shape(lambda: loss_fn(state["params"], frozen, first, key, state["step"])[1])
            zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), term_shapes)
            (grads, terms), _ = jax.lax.scan(micro, (zeros, zero_terms), (jnp.arange(n), batch))
            grads = jax.tree.map(lambda g: g / n, grads)
            terms = jax.tree.map(lambda t: t / n, terms)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**terms, "grad_norm": _global_norm(grads), "update_norm": _global_norm(updates),
                   "param_norm": _global_norm(params), "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "key": state["key"]}, metrics

    return step


def make_step(loss_fn: Callable, optim: OptimConfig, shardings: tuple | None = None):
    """`train_step` jitted with the state donated: `(state, frozen, batch) -> (state, metrics)`.

    `shardings` is `(in_shardings, out_shardings)` for `jax.jit` (see `sharding.jit_train_step`, which builds them
    from the rule table); without it the step runs where its arguments are.
    """
    placement = {} if shardings is None else {"in_shardings": shardings[0], "out_shardings": shardings[1]}
    return jax.jit(train_step(loss_fn, optim), donate_argnums=(0,), **placement)


def batch_indices(seed: int, step: int, size: int, count: int) -> np.ndarray:
    """Which samples step `step` trains on: a pure function of (seed, step), so resuming reproduces the data order."""
    return np.random.default_rng([seed, step]).choice(size, count, replace=size < count)
