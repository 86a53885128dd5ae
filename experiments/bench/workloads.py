"""What the bench runs: the transformer configs and token layouts, identical weights and inputs for both frameworks,
and the shared setups of the LoRA and DPO steps."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from foa_jax import lora as lora_lib
from foa_jax import losses, sampling, train
from foa_jax.models import flux2, vae
from ports import torch_models

TINY_VAE = vae.VAEConfig.preset("tiny")  # 32 latent channels x 2x2 patchify = 128 channels per token
# Tokens of the tiny VAE's width; both block stacks unrolled (`scan_unroll` = the deeper stack's 4 blocks), as the
# tiny preset's; the compile-time measurement uses the rolled scan, the one whose compile time stays flat in depth.
SMALL = flux2.Flux2Config(in_channels=TINY_VAE.token_channels, num_layers=2, num_single_layers=4,
                          attention_head_dim=128, num_attention_heads=4, joint_attention_dim=512,
                          axes_dims_rope=(32, 32, 32, 32), scan_unroll=4)
LORA = lora_lib.LoRAConfig(rank=16, targets="attn+add")
SEED = 0


@dataclass(frozen=True)
class Workload:
    """A transformer and the token layout it runs on: `grid` target tokens, the same grid of reference tokens."""

    name: str
    config: flux2.Flux2Config
    batch: int
    grid: tuple[int, int]
    text_len: int

    @property
    def img_ids(self) -> np.ndarray:
        return sampling.image_ids(self.grid, [self.grid])

    @property
    def target_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pixels(self) -> int:
        """The side of the images its target tokens decode to through the tiny VAE."""
        return self.grid[0] * TINY_VAE.token_factor

    def describe(self) -> str:
        c = self.config
        return (f"{self.name}: hidden {c.inner_dim} = {c.num_attention_heads} heads x {c.attention_head_dim}, "
                f"{c.num_layers} double + {c.num_single_layers} single blocks, {flux2.param_count(c) / 1e6:.1f} M "
                f"params; batch {self.batch}, {self.target_tokens} target + {self.target_tokens} reference + "
                f"{self.text_len} text tokens")


TINY = Workload("tiny", flux2.preset("tiny"), batch=8, grid=(16, 16), text_len=4)  # the tiny preset's training step
SMALL_WORK = Workload("small", SMALL, batch=1, grid=(32, 32), text_len=64)
# The training and sampling sections: the small transformer on 256-px SR crops (16 x 16 tokens through the 16x tiny
# VAE, as the tiny preset's crops), so a LoRA step's decoder and LPIPS run at 256 px.
SR_WORK = Workload("small-256px", SMALL, batch=1, grid=(16, 16), text_len=64)


def transformer_pair(config: flux2.Flux2Config, seed: int = SEED):
    """(torch model, JAX params) with identical float32 weights: diffusers' seeded init, converted by ports.convert."""
    model = torch_models.seeded_transformer(config, seed=seed)
    params = torch_models.jax_params(model, lambda: flux2.init(config, jax.random.key(0)), flux2.STACKS)
    return model, jax.device_put(params)


def vae_pair(seed: int = SEED + 1):
    model = torch_models.seeded_vae(TINY_VAE, seed=seed)
    params = torch_models.jax_params(model, lambda: vae.init(TINY_VAE, jax.random.key(0)))
    return model.requires_grad_(False), jax.device_put(params)


def inputs(work: Workload, seed: int = SEED) -> dict:
    """Random float32 inputs of a workload (target + reference tokens, prompt, timesteps, guidance, MSE target)."""
    rng = np.random.default_rng(seed)
    c = work.config
    n = 2 * work.target_tokens
    return {
        "x": rng.standard_normal((work.batch, n, c.in_channels), np.float32),
        "ctx": rng.standard_normal((work.batch, work.text_len, c.joint_attention_dim), np.float32),
        "t": rng.uniform(0.05, 1.0, work.batch).astype(np.float32),
        "g": np.ones(work.batch, np.float32),
        "target": rng.standard_normal((work.batch, n, c.out_dim), np.float32),
    }


def hr_photo(size: int) -> np.ndarray:
    """skimage's astronaut, (size, size, 3) float32 in [0, 1] (512 px natively)."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return np.asarray(image, np.float32) / 255.0


def step_noise(z_shape: tuple, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The t and ε that `train.make_step`'s first step draws (step 0, micro-batch 0, key PRNGKey(SEED)), so the torch
    step can use the same ones and the two first-step losses can be compared."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(SEED), 0), 0)
    key_t, key_noise = jax.random.split(key)
    return (np.array(losses.sample_t(key_t, batch, "uniform"), np.float32),
            np.array(jax.random.normal(key_noise, z_shape, jnp.float32)))


@dataclass(frozen=True)
class SFTSetup:
    """Everything both frameworks' LoRA steps share: weights, adapter, one batch, the loss configuration."""

    model: object
    params: dict
    vae_model: object
    vae_params: dict
    batch: dict
    prompt: np.ndarray
    adapter: dict
    loss: losses.SFTLossConfig
    optim: train.OptimConfig


def sft_setup(work: Workload) -> SFTSetup:
    model, params = transformer_pair(work.config)
    vae_model, vae_params = vae_pair()
    rng = np.random.default_rng(SEED + 2)
    n, c = work.target_tokens, work.config.in_channels
    batch = {"z": rng.standard_normal((work.batch, n, c), np.float32),
             "cond": rng.standard_normal((work.batch, n, c), np.float32),
             "hr": np.repeat(hr_photo(work.pixels)[None], work.batch, axis=0)}
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    adapter = lora_lib.init(params, LORA, jax.random.PRNGKey(SEED + 3))
    # λ_LPIPS at full weight from step 0 (its ramp would make it 0 on a first step).
    loss = losses.SFTLossConfig(lambda_pix=1.0, lambda_lpips=1.0, lpips_start=-1, lpips_end=0, lpips_net="vgg")
    optim = train.OptimConfig(lr=1e-4, warmup=0, weight_decay=1e-4)
    return SFTSetup(model, params, vae_model, vae_params, batch, prompt, adapter, loss, optim)


@dataclass(frozen=True)
class DPOSetup:
    """Frozen base, a frozen reference adapter (a trained Flux2SR LoRA stands in: random A and B), a policy that
    starts near it, and one (winner, loser, condition) batch."""

    model: object
    params: dict
    reference: dict
    policy: dict
    batch: dict
    prompt: np.ndarray
    optim: train.OptimConfig


def dpo_setup(work: Workload) -> DPOSetup:
    model, params = transformer_pair(work.config)
    rng = np.random.default_rng(SEED + 4)
    reference = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02),
                             lora_lib.init(params, LORA, jax.random.PRNGKey(SEED + 5)))
    policy = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.002), reference)
    n, c = work.target_tokens, work.config.in_channels
    batch = {k: rng.standard_normal((work.batch, n, c), np.float32) for k in ("z_w", "z_l", "cond")}
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    return DPOSetup(model, params, reference, policy, batch, prompt, train.OptimConfig(lr=1e-5, warmup=0))
