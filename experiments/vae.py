"""Train the FLUX.2 VAE architecture at tiny width as an autoencoder, for the tiny preset (there is no pretrained one).

    python -m experiments.vae [--steps 400] [--out runs/foa/vae]

L1 + LPIPS(alex) reconstruction on random crops of the bundled training photos, AdamW with a cosine-decaying
learning rate (a constant one stalls, TINY.md), then the BN statistics that FLUX.2 uses to normalise latents are
measured on the training latents (the real VAE ships them; ours must compute them). Prints the held-out
reconstruction PSNR; the result is the quality ceiling of every tiny-preset SR model. Real presets never run this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments import common
from foa_jax import params as P
from foa_jax.data.dataset import DataConfig, Dataset
from foa_jax.models import lpips as lpips_net
from foa_jax.models import layers, vae
from ports import convert, photos
from ports.lpips_weights import load_lpips_params


@dataclass(frozen=True)
class VAETrainConfig:
    crop: int = 64
    batch: int = 4  # more steps of fewer crops: 17.4 dB after 500 steps of 4 vs 17.0 after 300 of 8 (same time)
    lr: float = 5e-4  # 400 steps: 17.25 dB held out (1e-3: 16.78, 3e-4 -> 3e-5: 17.17)
    final_lr: float = 1e-5
    lambda_lpips: float = 0.1
    bn_samples: int = 256  # crops whose latents set the BN statistics
    eval_crop: int = 256
    checkpoint_every: int = 200
    vae: str = "tiny"
    data: DataConfig = field(default_factory=lambda: DataConfig(gt_size=64, crops_per_image=8))


def crops(dataset: Dataset, start: int, count: int) -> np.ndarray:
    """HR crops `start .. start+count` of the dataset, as [-1, 1] float32 (no degradation needed here)."""
    return np.stack([dataset.hr(i) for i in range(start, start + count)]).astype(np.float32) / 127.5 - 1.0


def make_step(config: VAETrainConfig, vae_config: vae.VAEConfig, steps: int):
    schedule = optax.cosine_decay_schedule(config.lr, max(steps, 1), config.final_lr / config.lr)
    tx = optax.adamw(schedule, weight_decay=1e-5)

    def loss_fn(params, lpips_params, images):
        recon = vae.decode(params, vae_config, vae.encode(params, vae_config, images))
        l1 = jnp.mean(jnp.abs(recon - images))
        lp = jnp.mean(lpips_net.lpips_distance(lpips_params, "alex", recon, images))
        return l1 + config.lambda_lpips * lp, {"l1": l1, "lpips": lp}

    @jax.jit
    def step(state, lpips_params, images):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], lpips_params, images)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state}
        return state, {"loss": loss, **terms, "lr": schedule(state["step"] - 1)}

    return tx, step


def set_bn_statistics(params: dict, vae_config: vae.VAEConfig, images: np.ndarray, batch: int = 16) -> dict:
    """Per-channel mean and variance of the patchified latents over `images`: FLUX.2's latent normalisation."""
    encode = jax.jit(lambda p, x: vae.patchify(vae.encode(p, vae_config, x)))
    latents = np.concatenate([np.asarray(encode(params, images[i:i + batch])) for i in range(0, len(images), batch)])
    flat = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    return {**params, "bn": {"running_mean": jnp.asarray(flat.mean(0), jnp.float32),
                             "running_var": jnp.asarray(flat.var(0), jnp.float32)}}


def reconstruction_psnr(params, vae_config: vae.VAEConfig, images: np.ndarray) -> float:
    """Mean PSNR (RGB, [0, 1]) of encode->decode on [-1, 1] images, through the token path the SR model uses."""
    h, w = images.shape[1:3]
    roundtrip = jax.jit(lambda p, x: vae.decode_tokens(p, vae_config, vae.encode_tokens(p, vae_config, x), h, w))
    out = []
    for image in images:
        recon = np.clip((np.asarray(roundtrip(params, image[None]))[0] + 1) / 2, 0, 1)
        mse = np.mean((recon - (image + 1) / 2) ** 2)
        out.append(10 * np.log10(1.0 / max(mse, 1e-12)))
    return float(np.mean(out))


def held_out_images(size: int) -> np.ndarray:
    _, held_out = photos.split(min_side=size)
    return np.stack([img[:size, :size] for img in held_out.values()]).astype(np.float32) / 127.5 - 1.0


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/vae", default_steps=400)
    args = p.parse_args(argv)
    config = common.apply_overrides(VAETrainConfig(), args.overrides)
    out = common.prepare_out(args.out, args.resume, config)
    vae_config = vae.VAEConfig.preset(config.vae)
    train_photos, _ = photos.split()
    dataset = Dataset(config.data, train_photos, report=print)
    lpips_params = layers.with_frozen_conv_kernels(load_lpips_params("alex"))
    tx, step_fn = make_step(config, vae_config, args.steps)
    params = vae.init(vae_config, jax.random.PRNGKey(args.seed))
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)},
                           jax.devices()[0])  # committed, as the step returns it: one compilation
    checkpoints = common.Checkpoints(out / "checkpoints")
    state, start = checkpoints.restore_latest(state) if args.resume else (state, 0)
    metrics = common.Metrics(out / "metrics.jsonl")
    metrics.truncate_after(start - 1)

    if start < args.steps:  # compiles the step (jit keeps it for the calls below)
        common.reserve_step_heap(step_fn.lower(state, lpips_params, crops(dataset, start * config.batch,
                                                                          config.batch)).compile())
    bar = tqdm(range(start, args.steps), desc="vae", initial=start, total=args.steps)
    for step in bar:
        t0 = time.perf_counter()
        state, m = step_fn(state, lpips_params, crops(dataset, step * config.batch, config.batch))
        m = jax.device_get(m)
        metrics.write(step=step, step_time=time.perf_counter() - t0, **m)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == args.steps:
            checkpoints.save(step + 1, state)

    params = set_bn_statistics(state["params"], vae_config, crops(dataset, 10**6, config.bn_samples))
    held_out = held_out_images(config.eval_crop)
    psnr = reconstruction_psnr(params, vae_config, held_out)
    print(f"tiny VAE held-out reconstruction PSNR: {psnr:.2f} dB ({len(held_out)} photos, {config.eval_crop} px, "
          f"{args.steps} steps)")
    metrics.write(step=args.steps, held_out_psnr=psnr)
    convert.save(out / "weights" / "vae", params, vae_config, convert.KINDS["vae"], "experiments.vae")
    print(f"wrote {out / 'weights' / 'vae'} ({P.count(vae.trainable(params)):,} parameters)")
    return out


if __name__ == "__main__":
    main()
