"""SFT loss terms against direct NumPy computations; the λ_lpips schedule; timestep sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import losses
from ports.lpips_weights import load_lpips_params


def _rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_flow_matching_and_per_sample():
    a, b = _rng_arrays((3, 5, 4), (3, 5, 4))
    assert float(losses.flow_matching(a, b)) == pytest.approx(np.mean((a - b) ** 2), rel=1e-6)
    np.testing.assert_allclose(losses.per_sample_flow_matching(a, b), ((a - b) ** 2).reshape(3, -1).mean(1), rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_charbonnier(eps):
    a, b = _rng_arrays((2, 8, 8, 3), (2, 8, 8, 3), seed=1)
    assert float(losses.charbonnier(a, b, eps)) == pytest.approx(np.mean(np.sqrt((a - b) ** 2 + eps ** 2)), rel=1e-6)
    assert float(losses.charbonnier(a, a, eps)) == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (2000, 0.0), (4000, 0.5), (6000, 1.0), (10000, 1.0)])
def test_lambda_lpips_schedule(step, expected):
    assert float(losses.lpips_weight(step, 1.0)) == pytest.approx(expected)
    assert float(losses.lpips_weight(step, 0.4)) == pytest.approx(0.4 * expected)


@pytest.mark.parametrize("scheme", losses.TIMESTEP_SCHEMES)
def test_training_timesteps_are_on_the_1000_step_grid(scheme):
    t = np.asarray(losses.sample_t(jax.random.key(0), 20000, scheme))
    assert t.min() >= 0.001 and t.max() <= 1.0
    np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-3)
    if scheme == "uniform":
        assert abs(t.mean() - 0.5005) < 0.01 and len(np.unique(t)) > 990
    with pytest.raises(ValueError, match="timestep scheme must be one of"):
        losses.sample_t(jax.random.key(0), 2, "cosine")


def test_interpolation_and_clean_prediction_invert():
    z, noise = _rng_arrays((2, 6, 4), (2, 6, 4), seed=2)
    t = np.array([0.25, 0.9], np.float32)
    z_t, v = losses.interpolate(z, noise, t)
    np.testing.assert_allclose(z_t, (1 - t[:, None, None]) * z + t[:, None, None] * noise, rtol=1e-6)
    np.testing.assert_allclose(v, noise - z)
    np.testing.assert_allclose(losses.predicted_clean(z_t, v, t), z, atol=1e-6)


def test_sft_loss_recomputed_in_numpy():
    """With a linear stand-in model and decoder, every term equals a NumPy recomputation from the same draws."""
    z, cond = _rng_arrays((2, 16, 4), (2, 16, 4), seed=3)
    rng = np.random.default_rng(4)
    hr = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    w = rng.standard_normal((4, 4)).astype(np.float32) * 0.3

    def predict(z_t, c, t):
        return z_t @ w + 0.5 * c + t[:, None, None]

    def decode(tokens):  # 16 tokens x 4 channels -> a 32x32 RGB image in [0, 1]
        grey = jax.nn.sigmoid(tokens.reshape(-1, 4, 4, 4).mean(-1))
        return jnp.repeat(jnp.repeat(grey, 8, axis=1), 8, axis=2)[..., None].repeat(3, -1)

    config = losses.SFTLossConfig(lambda_pix=0.7, lambda_lpips=2.0, lpips_net="alex")
    params = load_lpips_params("alex")
    key, step = jax.random.key(7), 5000
    loss, terms = jax.jit(lambda b, k, s: losses.sft_loss(predict, decode, params, b, k, s, config))(
        {"z": z, "cond": cond, "hr": hr}, key, step)

    key_t, key_noise = jax.random.split(key)
    t = np.asarray(losses.sample_t(key_t, 2, "uniform"))
    noise = np.asarray(jax.random.normal(key_noise, z.shape))
    z_t = (1 - t[:, None, None]) * z + t[:, None, None] * noise
    v_hat = z_t @ w + 0.5 * cond + t[:, None, None]
    fm = np.mean((v_hat - (noise - z)) ** 2)
    images = np.asarray(decode(z_t - t[:, None, None] * v_hat))
    pix = np.mean(np.sqrt((images - hr) ** 2 + 1e-6))
    lp = float(losses.lpips(params, "alex", images, hr))
    lam = 2.0 * 0.75
    assert float(terms["fm"]) == pytest.approx(fm, rel=1e-5)
    assert float(terms["pix"]) == pytest.approx(pix, rel=1e-5)
    assert float(terms["lambda_lpips"]) == pytest.approx(lam)
    assert float(loss) == pytest.approx(fm + 0.7 * pix + lam * lp, rel=1e-5)


def test_fm_only_ablation_never_decodes():
    z, cond = _rng_arrays((1, 4, 2), (1, 4, 2))

    def decode(tokens):
        raise AssertionError("the FM-only ablation must not decode")

    loss, terms = losses.sft_loss(lambda z_t, c, t: z_t, decode, None, {"z": z, "cond": cond, "hr": None},
                                  jax.random.key(0), 0, losses.SFTLossConfig(lambda_pix=0, lambda_lpips=0))
    assert set(terms) == {"fm", "t_mean", "lambda_lpips", "loss"} and float(loss) == float(terms["fm"])


def test_config_validates_itself():
    with pytest.raises(ValueError, match="lpips_end 10 < lpips_start 20"):
        losses.SFTLossConfig(lpips_start=20, lpips_end=10)
    with pytest.raises(ValueError, match="lpips_net must be"):
        losses.SFTLossConfig(lpips_net="squeeze")


def test_per_sample_losses_average_to_the_batch_losses():
    a, b = (np.clip(v, 0, 1) for v in _rng_arrays((3, 32, 32, 3), (3, 32, 32, 3), seed=2))
    per_sample = losses.per_sample_charbonnier(a, b)
    assert per_sample.shape == (3,)
    np.testing.assert_allclose(per_sample, np.sqrt((a - b) ** 2 + 1e-6).reshape(3, -1).mean(1), rtol=1e-6)
    assert float(jnp.mean(per_sample)) == pytest.approx(float(losses.charbonnier(a, b)), rel=1e-6)
    params = load_lpips_params("alex")
    per_image = losses.per_sample_lpips(params, "alex", a, b)
    assert per_image.shape == (3,)
    for i in range(3):
        assert float(per_image[i]) == pytest.approx(float(losses.lpips(params, "alex", a[i:i + 1], b[i:i + 1])),
                                                    rel=1e-5)
    assert float(jnp.mean(per_image)) == pytest.approx(float(losses.lpips(params, "alex", a, b)), rel=1e-6)


def test_the_package_exposes_its_modules():
    import foa_jax

    assert foa_jax.losses is losses
    assert {"dpo", "lora", "losses", "models", "rewards", "sampling", "sr", "train"} <= set(foa_jax.__all__)
    assert foa_jax.models.flux2.preset("tiny").num_layers >= 1
    assert foa_jax.data.degrade is not None
    with pytest.raises(AttributeError, match="its modules"):
        foa_jax.no_such_module
