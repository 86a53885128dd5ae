"""Small architectures for exhaustive parity sweeps against diffusers (the models come from `ports.torch_models`)."""

# A transformer small enough for exhaustive parity sweeps: 2 heads x 16, non-default channel counts everywhere.
SMALL_TRANSFORMER = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
# A VAE with two blocks (x2 spatial): the cheapest shape that still has a downsampler, an upsampler and mid attention.
SMALL_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
