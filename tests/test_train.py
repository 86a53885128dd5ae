"""The jitted train step: accumulation equals one big batch, AdamW against a NumPy recomputation, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import train


def _loss(params, frozen, batch, key, step):
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss = jnp.mean(err ** 2) * frozen["scale"]
    return loss, {"loss": loss}


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3)).astype(np.float32), "y": rng.standard_normal((n, 2)).astype(np.float32)}


def _params():
    return {"w": jnp.full((3, 2), 0.1, jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def _numpy_adamw(params, grads, optim: train.OptimConfig, step: int, m, v):
    """One AdamW step as optax defines it, with global-norm clipping and the warm-up schedule."""
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    clip = min(1.0, optim.clip_norm / norm)
    lr = optim.lr * min(step / max(optim.warmup, 1), 1.0)
    out = {}
    for k in params:
        g = grads[k] * clip
        m[k] = optim.b1 * m[k] + (1 - optim.b1) * g
        v[k] = optim.b2 * v[k] + (1 - optim.b2) * g ** 2
        m_hat, v_hat = m[k] / (1 - optim.b1 ** (step + 1)), v[k] / (1 - optim.b2 ** (step + 1))
        out[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + optim.eps) + optim.weight_decay * params[k])
    return out, norm


@pytest.mark.parametrize("accum", [1, 4])
def test_step_matches_numpy_adamw_and_accumulation_equals_one_batch(accum):
    optim = train.OptimConfig(lr=0.05, warmup=2, weight_decay=0.01, clip_norm=0.5, grad_accum=accum)
    data = _data()
    step = train.make_step(_loss, optim)
    state = train.init_state(_params(), optim, jax.random.PRNGKey(0))
    batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in data.items()}
    frozen = {"scale": jnp.float32(2.0)}

    params = {k: np.asarray(v, np.float64) for k, v in _params().items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for i in range(3):
        err = data["x"] @ params["w"] + params["b"] - data["y"]
        grads = {"w": 2 * 2 * data["x"].T @ err / err.size, "b": 2 * 2 * err.sum(0) / err.size}
        params, norm = _numpy_adamw(params, grads, optim, i, m, v)
        state, metrics = step(state, frozen, batch)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
        for k in params:
            np.testing.assert_allclose(np.asarray(state["params"][k]), params[k], rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3
    assert float(metrics["lr"]) == pytest.approx(0.05)
    assert step._cache_size() == 1, "the step must compile once, not again on step two"


def test_state_is_donated():
    optim = train.OptimConfig(lr=0.1, warmup=0)
    step = train.make_step(_loss, optim)
    params = _params()
    state = train.init_state(params, optim, jax.random.PRNGKey(0))
    old_w = state["params"]["w"]
    step(state, {"scale": jnp.float32(1.0)}, {k: v[None] for k, v in _data().items()})
    assert old_w.is_deleted()
    assert not params["w"].is_deleted()  # the caller's arrays survive: the state holds a copy


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    a = train.batch_indices(3, 17, 100, 8)
    np.testing.assert_array_equal(a, train.batch_indices(3, 17, 100, 8))
    assert not np.array_equal(a, train.batch_indices(3, 18, 100, 8))
    assert len(set(a.tolist())) == 8 and a.max() < 100
    assert len(train.batch_indices(0, 0, 3, 8)) == 8  # fewer samples than the batch: drawn with replacement


def test_config_validates():
    with pytest.raises(ValueError, match="grad_accum >= 1"):
        train.OptimConfig(grad_accum=0)
