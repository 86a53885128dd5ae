"""Position ids, schedule and Euler sampler against `Flux2Pipeline` and `FlowMatchEulerDiscreteScheduler`."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from foa_jax import sampling


def test_text_ids_match_pipeline():
    expected = Flux2Pipeline._prepare_text_ids(torch.zeros(1, 7, 3))[0].numpy()
    np.testing.assert_array_equal(sampling.text_ids(7), expected)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 4)])
def test_target_ids_match_pipeline(hw):
    expected = Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 4, *hw))[0].numpy()
    np.testing.assert_array_equal(sampling.grid_ids(*hw), expected)


def test_reference_ids_match_pipeline():
    grids = [(2, 3), (4, 2), (1, 5)]
    expected = Flux2Pipeline._prepare_image_ids([torch.zeros(1, 4, *g) for g in grids])[0].numpy()
    ours = sampling.reference_ids(grids)
    np.testing.assert_array_equal(ours, expected)
    assert sorted(set(ours[:, 0])) == [10, 20, 30]
    full = sampling.image_ids((3, 5), grids)
    np.testing.assert_array_equal(full[:15], sampling.grid_ids(3, 5))
    np.testing.assert_array_equal(full[15:], expected)


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4096, 4301, 8160])
@pytest.mark.parametrize("steps", [3, 16, 28, 50])
def test_mu_and_sigmas_match_scheduler(tokens, steps):
    mu = compute_empirical_mu(tokens, steps)
    assert sampling.empirical_mu(tokens, steps) == pytest.approx(mu, rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    expected = scheduler.sigmas.numpy()
    ours = sampling.sigmas(steps, tokens)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-7)


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        sampling.sigmas(0, 16)
