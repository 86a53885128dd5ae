"""Seeded diffusers models with foa-jax architectures, and their weights as foa-jax parameters: the torch side of
every parity test and of the benchmark.

Norm weights and BN statistics are perturbed away from 1 and 0 so that a key-mapping slip (a scale read as a bias, a
swapped half) changes the numbers instead of hiding behind identity values.
"""

from __future__ import annotations

import jax
import numpy as np
import torch

from ports import convert


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every norm weight -> 1 + 0.1·N(0,1), every norm bias -> 0.1·N(0,1), BN running stats moved off (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("running_mean"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
    return model


def seeded_transformer(config, seed: int = 0, dtype=torch.float32):
    """A seeded `Flux2Transformer2DModel` with the architecture of a foa-jax `Flux2Config`."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**config.to_diffusers())
    return perturb_norms(model, seed).to(dtype).eval()


def seeded_vae(config, seed: int = 0, dtype=torch.float32):
    """A seeded `AutoencoderKLFlux2` with the architecture of a foa-jax `VAEConfig`."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**config.to_diffusers())
    return perturb_norms(model, seed).to(dtype).eval()


def jax_params(model: torch.nn.Module, template_fn, stacks=(), dtype=np.float32) -> dict:
    """Strictly convert a torch model's state dict into the tree `template_fn()` describes."""
    template = jax.eval_shape(template_fn)
    state = {k: v.detach().cpu().to(torch.float64).numpy() for k, v in model.state_dict().items()}
    return convert.from_state_dict(template, state, stacks=stacks, dtype=dtype)
