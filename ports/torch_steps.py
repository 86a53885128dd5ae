"""foa-jax's SR forward, SFT LoRA step and Diffusion-DPO step written the way a torch trainer would, with diffusers,
peft and the `lpips` package: the reference the benchmark times JAX against and compares its losses with.

Token layout as in `foa_jax.sr`: `grid` target tokens, then the same grid of reference-image tokens, then the
prompt. Every function takes numpy inputs where JAX would, so both frameworks can be handed the same draws.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from foa_jax import lora as lora_lib
from foa_jax import losses, sampling, train


def forward(model, x, ctx, t, guidance, grid: tuple[int, int]):
    """diffusers' forward on torch tensors with the SR layout's position ids (text length from `ctx`)."""
    return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, guidance=guidance,
                 img_ids=torch.from_numpy(sampling.image_ids(grid, [grid])),
                 txt_ids=torch.from_numpy(sampling.text_ids(ctx.shape[1]))).sample


def decode(vae_model, tokens, grid: tuple[int, int]):
    """Packed tokens -> images in [0, 1] (NCHW): `Flux2Pipeline`'s own unpack / BN de-normalise / unpatchify."""
    from diffusers import Flux2Pipeline

    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, *grid))
    latents = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    mean = vae_model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae_model.bn.running_var.view(1, -1, 1, 1) + vae_model.config.batch_norm_eps)
    images = vae_model.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]
    return torch.clamp((images + 1.0) / 2.0, 0.0, 1.0)


def lpips(net: str = "vgg"):
    """(LPIPS from the `lpips` torch package with the trunk and heads foa-jax uses, those arrays): the package's
    own trunk would come from a model hub, and the same arrays make the two losses comparable."""
    import lpips as torch_lpips

    from foa_jax import params as P
    from ports.lpips_weights import load_lpips_params

    params = load_lpips_params(net)
    model = torch_lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    state = {P.torch_key(path): torch.from_numpy(P.to_torch_layout(path, np.array(leaf)))
             for path, leaf in P.flatten(params).items()}
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"lpips torch package: unexpected keys {unexpected}")
    return model.eval().requires_grad_(False), params


def load_adapters(model, adapters: dict, lora_config: lora_lib.LoRAConfig):
    """Load foa-jax adapters into the diffusers model as PEFT adapters of the same names (through the diffusers LoRA
    file format, `ports.lora_io`), base frozen."""
    from ports import lora_io

    model.requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        for name, adapter in adapters.items():
            path = lora_io.export_lora(Path(folder) / f"{name}.safetensors", adapter, lora_config)
            model.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True, adapter_name=name)
    return model


def _trainable(model, name: str, optim: train.OptimConfig):
    """The LoRA weights of adapter `name`, made trainable, and torch's AdamW over them with `optim`'s settings."""
    params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                     weight_decay=optim.weight_decay)


def sft_lora_step(model, adapter: dict, lora_config: lora_lib.LoRAConfig, vae_model, lpips_model, batch: dict,
                  prompt: np.ndarray, t: np.ndarray, noise: np.ndarray, grid: tuple[int, int],
                  loss_config: losses.SFTLossConfig, optim: train.OptimConfig) -> Callable[[], dict]:
    """One Flux2SR LoRA train step as a callable (flow matching + Charbonnier + LPIPS through the VAE decoder,
    gradient clipping, AdamW) on `batch` {"z", "cond" tokens, "hr" NHWC images in [0, 1]} with the given t and
    noise; each call steps the optimizer and returns {"loss", "grad_norm", "terms"}."""
    model = load_adapters(model, {"default": adapter}, lora_config)
    trainable, optimizer = _trainable(model, "default", optim)
    z, cond = torch.from_numpy(batch["z"]), torch.from_numpy(batch["cond"])
    hr = torch.from_numpy(batch["hr"]).permute(0, 3, 1, 2)
    t, noise = torch.from_numpy(t), torch.from_numpy(noise)
    ctx = torch.from_numpy(prompt).expand(z.shape[0], -1, -1)
    guidance = torch.ones(z.shape[0])
    eps = loss_config.charbonnier_eps

    def run() -> dict:
        optimizer.zero_grad(set_to_none=True)
        tt = t.view(-1, 1, 1)
        z_t, target = (1 - tt) * z + tt * noise, noise - z
        velocity = forward(model, torch.cat([z_t, cond], 1), ctx, t, guidance, grid)[:, :z.shape[1]]
        fm = torch.mean(torch.square(velocity - target))
        images = decode(vae_model, z_t - tt * velocity, grid)
        pix = torch.mean(torch.sqrt(torch.square(images - hr) + eps * eps))
        perceptual = lpips_model(images, hr, normalize=True).mean()
        loss = fm + loss_config.lambda_pix * pix + loss_config.lambda_lpips * perceptual
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, optim.clip_norm)
        optimizer.step()
        return {"loss": loss.item(), "grad_norm": norm.item(),
                "terms": {"fm": fm.item(), "pix": pix.item(), "lpips": perceptual.item()}}

    return run


def dpo_step(model, reference: dict, policy: dict, lora_config: lora_lib.LoRAConfig, batch: dict,
             prompt: np.ndarray, t: np.ndarray, noise: np.ndarray, grid: tuple[int, int], beta: float,
             optim: train.OptimConfig) -> Callable[[], dict]:
    """One Diffusion-DPO step as a callable (`foa_jax.dpo.dpo_loss` with diffusers + peft: the policy adapter on
    winner and loser with shared t and noise, the frozen reference adapter, gradient clipping, AdamW) on `batch`
    {"z_w", "z_l", "cond" tokens}; each call steps the optimizer and returns {"loss", "delta", "grad_norm"}."""
    model = load_adapters(model, {"reference": reference, "policy": policy}, lora_config)
    trainable, optimizer = _trainable(model, "policy", optim)
    b = batch["z_w"].shape[0]
    t, noise = torch.from_numpy(np.concatenate([t, t])), torch.from_numpy(np.concatenate([noise] * 2))
    z = torch.from_numpy(np.concatenate([batch["z_w"], batch["z_l"]]))
    cond = torch.from_numpy(np.concatenate([batch["cond"]] * 2))
    ctx, guidance = torch.from_numpy(prompt).expand(2 * b, -1, -1), torch.ones(2 * b)

    def errors(z_t, target):
        velocity = forward(model, torch.cat([z_t, cond], 1), ctx, t, guidance, grid)[:, :z.shape[1]]
        return torch.mean(torch.square(velocity - target).reshape(2 * b, -1), dim=1)

    def run() -> dict:
        optimizer.zero_grad(set_to_none=True)
        tt = t.view(-1, 1, 1)
        z_t, target = (1 - tt) * z + tt * noise, noise - z
        model.set_adapters("policy")
        policy_err = errors(z_t, target)
        model.set_adapters("reference")
        with torch.no_grad():
            reference_err = errors(z_t, target)
        model.set_adapters("policy")
        delta = (policy_err[:b] - reference_err[:b]) - (policy_err[b:] - reference_err[b:])
        loss = torch.nn.functional.softplus(0.5 * beta * delta).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, optim.clip_norm)
        optimizer.step()
        return {"loss": loss.item(), "delta": delta.mean().item(), "grad_norm": norm.item()}

    return run
