"""LucidNFT's advantages and the DiffusionNFT objective against NumPy written from the equations (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import nft

EPS = 1e-4


# --------------------------------------------------------------------------------------------------------------------
# NumPy references


def np_decoupled(rewards, weights, renormalise=False):
    rewards = np.asarray(rewards, np.float64)
    z = (rewards - rewards.mean(axis=1, keepdims=True)) / (rewards.std(axis=1, keepdims=True) + EPS)
    a = (z * np.asarray(weights)).sum(-1)
    return (a - a.mean()) / (a.std() + EPS) if renormalise else a


def np_scalarised(rewards, weights):
    s = (np.asarray(rewards, np.float64) * np.asarray(weights)).sum(-1)
    return (s - s.mean(axis=1, keepdims=True)) / (s.std() + EPS)


def np_reward_weight(a, c):
    return np.clip(a, -c, c) / c / 2 + 0.5


def np_nft(v, v_old, v_ref, x0, xt, t, r, beta, c, lam):
    """Loss and its gradient in v, one sample at a time; w± are constants of the gradient (stop-gradient)."""
    v, v_old, v_ref, x0, xt = (np.asarray(a, np.float64) for a in (v, v_old, v_ref, x0, xt))
    b, n = v.shape[0], v[0].size
    policy, kl, grad = 0.0, 0.0, np.zeros_like(v)
    for i in range(b):
        x_pos = xt[i] - t[i] * (beta * v[i] + (1 - beta) * v_old[i])
        x_neg = xt[i] - t[i] * ((1 + beta) * v_old[i] - beta * v[i])
        w_pos = max(np.abs(x_pos - x0[i]).mean(), 1e-5)
        w_neg = max(np.abs(x_neg - x0[i]).mean(), 1e-5)
        pos = ((x_pos - x0[i]) ** 2).mean() / w_pos
        neg = ((x_neg - x0[i]) ** 2).mean() / w_neg
        policy += c * (r[i] * pos + (1 - r[i]) * neg) / beta / b
        kl += ((v[i] - v_ref[i]) ** 2).mean() / b
        grad[i] = (c / beta / b) * (r[i] * 2 * (x_pos - x0[i]) * (-t[i] * beta) / w_pos
                                    + (1 - r[i]) * 2 * (x_neg - x0[i]) * (t[i] * beta) / w_neg) / n
        grad[i] += lam * 2 * (v[i] - v_ref[i]) / (b * n)
    return policy + lam * kl, policy, kl, grad


def _rewards(seed, shape=(5, 4, 3)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * np.array([1.0, 30.0, 0.01])[: shape[-1]] + 2.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("renormalise", [False, True])
@pytest.mark.parametrize("shape,weights", [((5, 4, 3), (1.0, 0.5, 2.0)), ((2, 2, 1), (1.0,)), ((3, 8, 2), (0.3, -0.1))])
def test_decoupled_advantages_match_numpy(shape, weights, renormalise):
    rewards = _rewards(0, shape)
    got = nft.decoupled_advantages(rewards, weights, renormalise=renormalise)
    jitted = jax.jit(nft.decoupled_advantages, static_argnames=("weights", "renormalise"))(
        rewards, weights=weights, renormalise=renormalise)
    want = np_decoupled(rewards, weights, renormalise)
    assert got.shape == shape[:2] and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,weights", [((5, 4, 3), (1.0, 0.5, 2.0)), ((2, 2, 1), (1.0,)), ((3, 8, 2), (0.3, -0.1))])
def test_scalarised_advantages_match_numpy(shape, weights):
    rewards = _rewards(1, shape)
    got = jax.jit(nft.scalarised_advantages, static_argnames="weights")(rewards, weights=weights)
    np.testing.assert_allclose(np.asarray(got), np_scalarised(rewards, weights), rtol=2e-5, atol=2e-5)


def test_advantages_dispatches_by_scheme():
    rewards = _rewards(2)
    weights = (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(nft.advantages(rewards, weights, "decoupled", renormalise=True)),
                                  np.asarray(nft.decoupled_advantages(rewards, weights, renormalise=True)))
    np.testing.assert_array_equal(np.asarray(nft.advantages(rewards, weights, "scalarised")),
                                  np.asarray(nft.scalarised_advantages(rewards, weights)))


def test_constant_rewards_give_exact_zeros_not_nan():
    """A reward tie inside a group (0.7 is not exact in binary) contributes exactly 0; an all-tied batch is all 0."""
    rewards = _rewards(3, (3, 5, 2))
    rewards[0, :, 0] = 0.7
    rewards[1] = 0.3
    weights = (1.0, 2.0)
    dec = np.asarray(nft.decoupled_advantages(rewards, weights))
    sca = np.asarray(nft.scalarised_advantages(rewards, weights))
    only_second = np.asarray(nft.decoupled_advantages(rewards[:1, :, 1:], (2.0,)))
    assert np.isfinite(dec).all() and np.isfinite(sca).all()
    np.testing.assert_array_equal(dec[1], 0.0)
    np.testing.assert_array_equal(sca[1], 0.0)
    np.testing.assert_array_equal(dec[0], only_second[0])  # the tied reward adds nothing, not an ulp / ε
    flat = np.full((2, 4, 3), 0.7, np.float32)
    for a in (nft.decoupled_advantages(flat, (1, 1, 1), renormalise=True), nft.scalarised_advantages(flat, (1, 1, 1))):
        np.testing.assert_array_equal(np.asarray(a), 0.0)


def test_decoupling_keeps_a_small_spread_reward_that_scalarising_drowns():
    """The motivating case: reward 0 varies by ~100 in a group, reward 1 by ~0.01 and disagrees with it."""
    rewards = np.zeros((1, 4, 2), np.float32)
    rewards[0, :, 0] = [100.0, 101.0, 99.0, 100.5]
    rewards[0, :, 1] = [0.03, 0.00, 0.04, 0.01]
    dec = np.asarray(nft.decoupled_advantages(rewards, (1.0, 1.0)))[0]
    sca = np.asarray(nft.scalarised_advantages(rewards, (1.0, 1.0)))[0]
    np.testing.assert_allclose(sca, np_scalarised(rewards, (1, 1))[0], rtol=1e-4)
    np.testing.assert_allclose(dec, np_decoupled(rewards, (1, 1))[0], rtol=1e-4)
    assert np.argsort(sca).tolist() == np.argsort(rewards[0, :, 0]).tolist()  # reward 1 has no say
    assert np.argsort(dec).tolist() != np.argsort(sca).tolist()
    # decoupled keeps its ranking when a reward is rescaled (up to ε's share), scalarised does not
    scaled = rewards * np.array([1.0, 1e3], np.float32)
    rescaled = np.asarray(nft.decoupled_advantages(scaled, (1.0, 1.0)))[0]
    np.testing.assert_allclose(rescaled, np_decoupled(scaled, (1, 1))[0], rtol=1e-4)
    assert np.argsort(rescaled).tolist() == np.argsort(dec).tolist()
    assert np.argsort(np.asarray(nft.scalarised_advantages(scaled, (1.0, 1.0)))[0]).tolist() != np.argsort(sca).tolist()


def test_reward_weight_matches_numpy():
    a = np.linspace(-8, 8, 33).astype(np.float32)
    for c in (1.0, 5.0):
        got = np.asarray(jax.jit(nft.reward_weight, static_argnums=1)(a, c))
        np.testing.assert_allclose(got, np_reward_weight(a, c), rtol=1e-6, atol=1e-7)
        assert got.min() == 0.0 and got.max() == 1.0 and got[16] == 0.5


@pytest.mark.parametrize("call,match", [
    (lambda: nft.decoupled_advantages(np.zeros((2, 1, 2)), (1, 1)), r"K = 1 .*K >= 2"),
    (lambda: nft.scalarised_advantages(np.zeros((2, 1, 2)), (1, 1)), r"K = 1 .*K >= 2"),
    (lambda: nft.decoupled_advantages(np.zeros((2, 3, 2)), (1.0, -1.0)), r"sum to zero"),
    (lambda: nft.scalarised_advantages(np.zeros((2, 3, 2)), (0, 0)), r"sum to zero"),
    (lambda: nft.decoupled_advantages(np.zeros((2, 3, 2)), (1.0,)), r"1 weights \(1.0,\) for 2 rewards"),
    (lambda: nft.decoupled_advantages(np.zeros((2, 3)), (1.0,)), r"must be \(groups, rollouts per group, rewards\)"),
    (lambda: nft.advantages(np.zeros((2, 3, 1)), (1.0,), "sum"), r"scheme must be one of"),
    (lambda: nft.advantages(np.zeros((2, 3, 1)), (1.0,), "scalarised", renormalise=True), r"renormalise applies"),
    (lambda: nft.reward_weight(np.zeros(3), 0.0), r"adv_clip must be > 0"),
    (lambda: nft.NFTConfig(beta=0.0), r"NFTConfig.beta"),
    (lambda: nft.NFTConfig(kl_weight=-1.0), r"NFTConfig.kl_weight"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------------------------
# The DiffusionNFT loss


def _batch(seed, shape=(3, 4, 5), dtype=np.float32):
    rng = np.random.default_rng(seed)
    x0, noise, v, v_old, v_ref = (rng.normal(size=shape).astype(dtype) for _ in range(5))
    t = rng.uniform(0.1, 0.9, shape[0]).astype(np.float32)
    xt = ((1 - t[:, None, None]) * x0 + t[:, None, None] * noise).astype(dtype)
    r = np.array([0.0, 0.3, 1.0], np.float32)[: shape[0]]
    return v, v_old, v_ref, x0, xt, t, r


@pytest.mark.parametrize("beta,c,lam", [(1.0, 5.0, 1e-4), (0.1, 5.0, 1e-4), (0.5, 2.0, 0.3)])
def test_nft_loss_and_gradient_match_numpy(beta, c, lam):
    v, v_old, v_ref, x0, xt, t, r = _batch(0)
    config = nft.NFTConfig(beta=beta, adv_clip=c, kl_weight=lam)

    def loss(v_theta):
        return nft.nft_loss(v_theta, v_old, v_ref, x0, xt, t, r, config)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(v))
    want, policy, kl, want_grad = np_nft(v, v_old, v_ref, x0, xt, t, r, beta, c, lam)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["policy_loss"]), policy, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_at_theta_equal_old_both_branches_coincide(beta):
    """v_θ = v_old: x̂₊ = x̂₋, so the loss is c·mean(mse/w)/β + λ·kl whatever r is, and the gradient ∝ 1 − 2r."""
    v, _, v_ref, x0, xt, t, _ = _batch(1)
    x_pos, x_neg = nft.nft_branches(v, v, xt, t[:, None, None], beta)
    np.testing.assert_allclose(np.asarray(x_pos), np.asarray(x_neg), rtol=1e-6, atol=1e-6)
    x_hat = xt - t[:, None, None] * v.astype(np.float64)
    mse = ((x_hat - x0) ** 2).mean(axis=(1, 2)) / np.maximum(np.abs(x_hat - x0).mean(axis=(1, 2)), 1e-5)
    config = nft.NFTConfig(beta=beta, adv_clip=5.0, kl_weight=1e-4)
    kl = ((v.astype(np.float64) - v_ref) ** 2).mean()
    grads = {}
    for r in (0.0, 0.5, 1.0):
        rr = np.full(3, r, np.float32)
        loss = lambda vv: nft.nft_loss(vv, v, v_ref, x0, xt, t, rr, nft.NFTConfig(beta=beta, kl_weight=0.0))[0]
        value, _ = nft.nft_loss(v, v, v_ref, x0, xt, t, rr, config)
        np.testing.assert_allclose(float(value), 5.0 * mse.mean() / beta + 1e-4 * kl, rtol=1e-5)
        grads[r] = np.asarray(jax.grad(loss)(jnp.asarray(v)))
    assert np.abs(grads[1.0]).max() > 1e-3
    np.testing.assert_allclose(grads[0.5], 0.0, atol=1e-7)
    np.testing.assert_allclose(grads[1.0], -grads[0.0], rtol=1e-5, atol=1e-8)


def test_adaptive_weight_is_float32_floored_and_without_gradient():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = nft.adaptive_weight(x, x)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w), np.float32(1e-5))
    y = jnp.linspace(0, 1, 24).reshape(2, 3, 4)
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda a: nft.adaptive_weight(a, y * 0).sum())(y)), 0.0)
    v, v_old, v_ref, x0, xt, t, r = _batch(2, dtype=jnp.bfloat16)
    loss, metrics = nft.nft_loss(v, v_old, v_ref, x0, xt, t, r, nft.NFTConfig())
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_nft_loss_rejects_mismatched_shapes():
    v, v_old, v_ref, x0, xt, t, r = _batch(3)
    with pytest.raises(ValueError, match=r"v_old has shape \(3, 4\), x_0 has \(3, 4, 5\)"):
        nft.nft_loss(v, v_old[..., 0], v_ref, x0, xt, t, r, nft.NFTConfig())
    with pytest.raises(ValueError, match=r"r must be \(3,\), one per sample"):
        nft.nft_loss(v, v_old, v_ref, x0, xt, t, r[:2], nft.NFTConfig())


def _linear_predict(adapter, x_t, cond, t):
    """A toy velocity model: v = x_t·W + cond + t·b, where the reference (adapter None) has W = 0, b = 0."""
    if adapter is None:
        return cond + 0 * x_t
    return x_t @ adapter["W"] + cond + t[:, None, None] * adapter["b"]


def test_nft_objective_computes_the_three_velocities():
    rng = np.random.default_rng(4)
    x0, noise, cond = (rng.normal(size=(3, 4, 5)).astype(np.float32) for _ in range(3))
    t = np.array([0.2, 0.5, 0.9], np.float32)
    r = np.array([0.1, 0.5, 0.9], np.float32)
    policy = {"W": rng.normal(size=(5, 5)).astype(np.float32) * 0.1, "b": rng.normal(size=5).astype(np.float32)}
    old = {"W": policy["W"] * 0.5, "b": policy["b"] * 0.5}
    config = nft.NFTConfig(beta=0.1)

    def loss(p):
        return nft.nft_objective(_linear_predict, p, old, x0, cond, t, noise, r, config)

    (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(policy)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    want = np_nft(_linear_predict(policy, xt, cond, t), _linear_predict(old, xt, cond, t), cond, x0, xt, t, r,
                  0.1, 5.0, 1e-4)[0]
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------------------------------
# Timesteps and the old policy


def test_training_timesteps_shuffle_the_grid_per_sample():
    grid = np.linspace(1.0, 0.1, 10).astype(np.float32)
    draw = jax.jit(nft.training_timesteps, static_argnums=(2, 3))
    steps = np.asarray(draw(jax.random.key(0), grid, 2000, 0.99))
    assert steps.shape == (2000, 9)
    assert np.isin(steps, grid).all()
    assert all(len(set(row.tolist())) == 9 for row in steps)  # without replacement
    assert len({tuple(row) for row in steps[:50].tolist()}) == 50  # a fresh order per sample
    counts = np.array([(steps[:, 0] == g).sum() for g in grid])
    assert counts.min() > 150 and counts.max() < 250, counts  # first position uniform over the grid (200 each)
    np.testing.assert_array_equal(steps, np.asarray(draw(jax.random.key(0), grid, 2000, 0.99)))
    assert not np.array_equal(steps, np.asarray(draw(jax.random.key(1), grid, 2000, 0.99)))
    assert jax.eval_shape(lambda k: nft.training_timesteps(k, grid, 3, 1.0), jax.random.key(1)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"fraction 0.05 of a 10-step grid keeps 0"):
        nft.training_timesteps(jax.random.key(0), grid, 3, 0.05)


def np_decay(step, decay_type):
    flat, rate, cap = {1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


@pytest.mark.parametrize("decay_type", [1, 2])
def test_old_policy_decay_schedules_match_numpy(decay_type):
    steps = np.arange(0, 1200)
    got = np.asarray(jax.jit(jax.vmap(lambda s: nft.old_policy_decay(s, decay_type)))(steps))
    np.testing.assert_allclose(got, [np_decay(s, decay_type) for s in steps], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"decay_type must be one of \(1, 2\), got 3"):
        nft.old_policy_decay(0, 3)


def test_ema_update_mixes_pytrees_and_keeps_dtypes():
    rng = np.random.default_rng(5)
    old = {"a": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)}, "b": jnp.ones(4, jnp.bfloat16)}
    new = {"a": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)}, "b": jnp.zeros(4, jnp.bfloat16)}
    got = jax.jit(nft.ema_update)(old, new, 0.25)
    np.testing.assert_allclose(np.asarray(got["a"]["kernel"]),
                               0.25 * old["a"]["kernel"] + 0.75 * new["a"]["kernel"], rtol=1e-6)
    assert got["b"].dtype == jnp.bfloat16 and np.asarray(got["b"], np.float32).tolist() == [0.25] * 4
    np.testing.assert_array_equal(np.asarray(nft.ema_update(old, new, 0.0)["a"]["kernel"]), new["a"]["kernel"])
    with pytest.raises(ValueError, match=r"differ in structure"):
        nft.ema_update(old, {"a": new["a"]}, 0.5)


# --------------------------------------------------------------------------------------------------------------------
# Separability


def test_separability_of_a_hand_built_table():
    table = np.array([[-1.0, 0.0, 0.0, 1.0],      # range 2, 3 values, r: 0.4, 0.5, 0.5, 0.6 (two collapsed)
                      [0.1, 0.1 + 1e-8, -0.3, 3.0],  # range 3.3, 3 values within 1e-6, r ≈ .51 .51 .47 .8
                      [2.0, 2.0, 2.0, 2.0]])      # range 0, 1 value, r = 0.7
    stats = {k: float(v) for k, v in jax.jit(nft.separability, static_argnums=(1, 2))(table, 5.0, 1e-6).items()}
    assert stats["range"] == pytest.approx((2 + 3.3 + 0) / 3, rel=1e-6)
    assert stats["distinct"] == pytest.approx((3 + 3 + 1) / 3)
    assert stats["collapsed"] == pytest.approx(5 / 12)  # |r − 1/2| < 0.05: 0, 0 | 0.1, 0.1+1e-8, -0.3
    assert float(nft.separability(table, 5.0, 1e-9)["distinct"]) == pytest.approx((3 + 4 + 1) / 3)
    other = -table
    other[2] = 1.0
    assert float(nft.sign_disagreement(table, other)) == pytest.approx(6 / 12)  # zeros agree, and all of group 2


def test_compare_schemes_reports_both_on_the_same_rollouts():
    rewards = _rewards(6, (6, 4, 3))
    weights = (1.0, 0.5, 2.0)
    got = nft.compare_schemes(rewards, weights, 5.0)
    for scheme, ref in (("decoupled", np_decoupled(rewards, weights)), ("scalarised", np_scalarised(rewards, weights))):
        assert float(got[scheme]["range"]) == pytest.approx(np.mean(ref.max(1) - ref.min(1)), rel=1e-4)
        assert float(got[scheme]["distinct"]) == 4.0
        want = np.mean(np.abs(np_reward_weight(ref, 5.0) - 0.5) < 0.05)
        assert float(got[scheme]["collapsed"]) == pytest.approx(want)
    dec, sca = np_decoupled(rewards, weights), np_scalarised(rewards, weights)
    assert float(got["sign_disagreement"]) == pytest.approx(np.mean(np.sign(dec) != np.sign(sca)))
