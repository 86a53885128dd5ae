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


def test_three_step_sampling_with_a_reference_matches_the_pipeline():
    """Same noise, prompt embedding and reference photo through `Flux2Pipeline` and through our VAE + sampler."""
    import jax
    from PIL import Image
    from skimage import data

    from foa_jax.models import flux2, vae
    from ports import torch_models
    from tests import torch_reference

    # The VAE's 2x2-patchified latents must be the transformer's input: latent_channels = in_channels / 4.
    t_config = flux2.Flux2Config(**torch_reference.SMALL_TRANSFORMER)
    v_config = vae.VAEConfig(**{**torch_reference.SMALL_VAE, "latent_channels": t_config.in_channels // 4})
    transformer = torch_models.seeded_transformer(t_config, seed=5)
    autoencoder = torch_models.seeded_vae(v_config, seed=6)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                         vae=autoencoder, text_encoder=None, tokenizer=None, transformer=transformer)
    photo = data.astronaut()[100:164, 180:276]  # 64 x 96: the pipeline refuses images under 64 px
    height, width = photo.shape[:2]
    grid = (height // v_config.token_factor, width // v_config.token_factor)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, t_config.in_channels, *grid, generator=gen)
    prompt = torch.randn(1, 6, t_config.joint_attention_dim, generator=gen)
    with torch.no_grad():
        expected = pipe(image=[Image.fromarray(photo)], prompt_embeds=prompt, latents=noise, height=height,
                        width=width, num_inference_steps=3, guidance_scale=4.0, output_type="latent").images.numpy()

    t_params = torch_models.jax_params(transformer, lambda: flux2.init(t_config, jax.random.key(0)), flux2.STACKS)
    v_params = torch_models.jax_params(autoencoder, lambda: vae.init(v_config, jax.random.key(0)))
    reference = vae.encode_tokens(v_params, v_config, (photo[None].astype(np.float32) / 255.0) * 2 - 1)
    latents = Flux2Pipeline._pack_latents(noise).numpy()
    ours = sampling.sample(
        t_params, t_config, latents, prompt.numpy(), sampling.image_ids(grid, [grid]), sampling.text_ids(6),
        sampling.sigmas(3, latents.shape[1]), references=reference, guidance=4.0)
    diff = float(np.max(np.abs(np.asarray(ours) - expected)))
    print(f"3-step sampling max abs diff: {diff:.2e}")
    assert diff <= 1e-5
