"""Profile DPO (Eq. 8–9): the loss against NumPy, log 2 at initialisation, one step prefers the winner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import dpo, lora, losses, sampling
from foa_jax.models import flux2

CONFIG = flux2.preset("tiny")
GRID = (2, 3)


def _np_dpo(pw, pl, rw, rl, beta):
    delta = (pw - rw) - (pl - rl)
    return -np.log(1.0 / (1.0 + np.exp(0.5 * beta * delta))), delta


@pytest.mark.parametrize("beta", [1.0, 500.0, 5000.0])
def test_dpo_terms_match_numpy(beta):
    rng = np.random.default_rng(0)
    pw, pl, rw, rl = rng.uniform(0.5, 1.5, (4, 16)) * 1e-2
    loss, delta = dpo.dpo_terms(pw, pl, rw, rl, beta)
    want_loss, want_delta = _np_dpo(pw, pl, rw, rl, beta)
    np.testing.assert_allclose(np.asarray(delta), want_delta, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-5, atol=1e-7)


def test_dpo_terms_stay_finite_for_huge_margins():
    loss, _ = dpo.dpo_terms(jnp.array([10.0, 0.0]), jnp.array([0.0, 10.0]), jnp.zeros(2), jnp.zeros(2), 5000.0)
    np.testing.assert_allclose(np.asarray(loss), [25_000.0, 0.0], rtol=1e-6)


def _linear_predict(adapter, z_t, cond, t):
    """A toy velocity model whose weights are the 'adapter': v = z_t·W + cond·U + t·b."""
    return z_t @ adapter["W"] + cond @ adapter["U"] + t[:, None, None] * adapter["b"]


def test_dpo_loss_matches_a_numpy_recomputation():
    rng = np.random.default_rng(1)
    b, n, c = 3, 5, 4
    batch = {k: rng.standard_normal((b, n, c)).astype(np.float32) for k in ("z_w", "z_l", "cond")}
    policy = {"W": rng.standard_normal((c, c)), "U": rng.standard_normal((c, c)), "b": rng.standard_normal(c)}
    reference = {"W": rng.standard_normal((c, c)), "U": rng.standard_normal((c, c)), "b": rng.standard_normal(c)}
    policy, reference = (jax.tree.map(lambda a: a.astype(np.float32), p) for p in (policy, reference))
    key = jax.random.PRNGKey(7)
    config = dpo.DPOConfig(beta=50.0)
    loss, metrics = dpo.dpo_loss(_linear_predict, policy, reference, batch, key, config)

    # The documented randomness: t from the first split key, ε from the second, shared by winner and loser.
    key_t, key_noise = jax.random.split(key)
    t = np.asarray(losses.sample_t(key_t, b, config.timesteps), np.float64)
    eps = np.asarray(jax.random.normal(key_noise, (b, n, c)), np.float64)

    def err(p, z):
        z = z.astype(np.float64)
        z_t = (1 - t)[:, None, None] * z + t[:, None, None] * eps
        v = z_t @ np.asarray(p["W"], np.float64) + batch["cond"] @ np.asarray(p["U"], np.float64) \
            + t[:, None, None] * np.asarray(p["b"], np.float64)
        return np.mean((v - (eps - z)) ** 2, axis=(1, 2))

    want, delta = _np_dpo(err(policy, batch["z_w"]), err(policy, batch["z_l"]), err(reference, batch["z_w"]),
                          err(reference, batch["z_l"]), config.beta)
    np.testing.assert_allclose(float(loss), want.mean(), rtol=2e-4)
    np.testing.assert_allclose(float(metrics["delta"]), delta.mean(), rtol=2e-4, atol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(delta < 0))
    np.testing.assert_allclose(float(metrics["reward_margin"]), -0.5 * config.beta * delta.mean(), rtol=2e-4,
                               atol=1e-4)


def test_dpo_loss_rejects_mismatched_shapes():
    batch = {"z_w": jnp.zeros((2, 3, 4)), "z_l": jnp.zeros((2, 3, 4)), "cond": jnp.zeros((2, 5, 4))}
    with pytest.raises(ValueError, match="must have one shape"):
        dpo.dpo_loss(_linear_predict, {}, {}, batch, jax.random.PRNGKey(0), dpo.DPOConfig())


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_config_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo.DPOConfig(beta=beta)


def _flux_setup():
    params = flux2.init(CONFIG, jax.random.key(0))
    ids, txt_ids = sampling.image_ids(GRID, [GRID]), sampling.text_ids(4)
    prompt = jax.random.normal(jax.random.key(3), (1, 4, CONFIG.joint_attention_dim))
    n = GRID[0] * GRID[1]

    def predict(adapter, z_t, cond, t):
        ctx = jnp.broadcast_to(prompt, (z_t.shape[0], *prompt.shape[1:]))
        out = flux2.apply(params, CONFIG, jnp.concatenate([z_t, cond], 1), ctx, t, ids, txt_ids,
                          jnp.ones(z_t.shape[0]), lora=adapter)
        return out[:, :n]

    rng = np.random.default_rng(2)
    batch = {k: rng.standard_normal((2, n, CONFIG.in_channels)).astype(np.float32) for k in ("z_w", "z_l", "cond")}
    return params, predict, batch


def test_loss_is_log2_when_policy_equals_reference():
    params, predict, batch = _flux_setup()
    policy = lora.init(params, lora.LoRAConfig(rank=4), jax.random.key(1))  # B = 0: the policy is the reference
    loss, metrics = dpo.dpo_loss(predict, policy, None, batch, jax.random.PRNGKey(0), dpo.DPOConfig())
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-6)
    assert float(metrics["delta"]) == 0.0


def test_one_gradient_step_lowers_the_winners_error_relative_to_the_losers():
    params, predict, batch = _flux_setup()
    policy = lora.init(params, lora.LoRAConfig(rank=4), jax.random.key(1))
    config, key = dpo.DPOConfig(beta=1000.0), jax.random.PRNGKey(0)

    def loss_fn(adapter):
        return dpo.dpo_loss(predict, adapter, None, batch, key, config)

    (loss0, m0), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 1e-3 * g, policy, grads)
    loss1, m1 = loss_fn(stepped)
    gap0 = float(m0["policy_w"] - m0["policy_l"])
    gap1 = float(m1["policy_w"] - m1["policy_l"])
    assert gap1 < gap0, (gap0, gap1)
    assert float(m1["delta"]) < 0 and float(loss1) < float(loss0)
    # the reference never moves
    assert float(m1["reference_w"]) == pytest.approx(float(m0["reference_w"]), rel=1e-6)
