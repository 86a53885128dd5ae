"""foa-jax: profile-aware preference optimisation for real-world super-resolution on FLUX.2, in JAX.

The core is pure JAX over parameter pytrees named like diffusers' state dicts; nothing under `foa_jax` imports torch.
"""

__version__ = "0.1.0"
