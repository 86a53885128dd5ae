"""Train the FLUX.2 VAE architecture at reduced width as an autoencoder: the tiny preset's VAE (none is pretrained).

    python -m experiments.vae [--preset tiny] [--out runs/foa/vae] [--steps N] [--resume] [field=value ...]

L1 + λ·LPIPS reconstruction of random crops of the bundled training photos (mirrored at random), AdamW with a cosine
decay, on the shared train step and loop; then the per-channel statistics FLUX.2 normalises latent tokens with (the
real VAE ships them; ours measures them on training latents). Prints and records the held-out reconstruction PSNR and
colour error, the ceiling of every tiny SR result, and writes `weights/` (a VAE-only weights folder). Real presets
use the converted FLUX.2 VAE and never run this.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.configs import schema
from foa_jax import params as P
from foa_jax import train
from foa_jax.data.dataset import Dataset
from foa_jax.models import layers, vae
from foa_jax.models import lpips as lpips_net
from ports import photos, weights
from ports.lpips_weights import load_lpips_params


def identity_init(params: dict) -> dict:
    """Every residual branch's last layer (resnet `conv2`, attention `to_out`) at zero, every other kernel scaled from
    torch's default (uniform ±1/√fan_in, which divides the variance by 3 per layer) to variance 2/fan_in: the untrained
    network is a chain of linear maps that keep their input's scale, so training starts from a usable code."""
    flat = P.flatten(params)
    for path, value in flat.items():
        if not path.endswith(".kernel"):
            continue
        zero = ".conv2." in path or ".to_out.0." in path
        flat[path] = jnp.zeros_like(value) if zero else value * math.sqrt(6.0)
    return P.unflatten(flat)


def crops(dataset: Dataset, start: int, count: int) -> np.ndarray:
    """HR crops `start .. start+count` of the dataset as [0, 1] float32 (no degradation needed here)."""
    return np.stack([dataset.hr(i) for i in range(start, start + count)]).astype(np.float32) / 255.0


def make_loss(vae_config: vae.VAEConfig, config: schema.VAEStageConfig):
    """`loss(params, frozen, batch, key, step)` for the shared train step: L1 + λ·LPIPS on [0, 1] images."""

    def loss(params, frozen, batch, key, step):
        images = batch["x"]
        recon = (vae.decode(params, vae_config, vae.encode(params, vae_config, 2 * images - 1)) + 1) / 2
        terms = {"l1": jnp.mean(jnp.abs(recon - images))}
        total = terms["l1"]
        if config.lambda_lpips > 0:
            terms["lpips"] = jnp.mean(lpips_net.lpips_distance_unit_range(frozen["lpips"], config.lpips_net, recon,
                                                                          images, vae_config.kernels))
            total = total + config.lambda_lpips * terms["lpips"]
        return total, {**terms, "loss": total}

    return loss


def set_bn_statistics(params: dict, vae_config: vae.VAEConfig, images: np.ndarray, batch: int = 16) -> dict:
    """Per-channel mean and variance of the patchified latents of [0, 1] `images`: FLUX.2's latent normalisation."""
    encode = jax.jit(lambda p, x: vae.patchify(vae.encode(p, vae_config, 2 * x - 1)))
    latents = np.concatenate([np.asarray(encode(params, images[i:i + batch])) for i in range(0, len(images), batch)])
    flat = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    return {**params, "bn": {"running_mean": jnp.asarray(flat.mean(0), jnp.float32),
                             "running_var": jnp.asarray(flat.var(0), jnp.float32)}}


def reconstruction_metrics(params: dict, vae_config: vae.VAEConfig, images: np.ndarray) -> dict:
    """Per-image RGB PSNR and colour error of encode -> decode through the token path the SR model uses, for [0, 1]
    images: the colour error is the mean over R, G, B of |mean channel value of the output − of the input|, in 1/255.
    Outputs are clipped to [0, 1] and rounded to 8 bits first, as every saved image is."""
    h, w = images.shape[1:3]
    roundtrip = jax.jit(lambda p, x: vae.decode_tokens(p, vae_config, vae.encode_tokens(p, vae_config, 2 * x - 1),
                                                       h, w))
    psnr, colour = [], []
    for image in images:
        out = np.asarray(roundtrip(params, image[None]))[0]
        out = np.round(np.clip((out + 1) / 2, 0, 1) * 255) / 255
        psnr.append(10 * np.log10(1.0 / max(float(np.mean((out - image) ** 2)), 1e-12)))
        colour.append(255 * float(np.mean(np.abs(out.mean((0, 1)) - image.mean((0, 1))))))
    return {"psnr": psnr, "colour_error": colour, "mean_psnr": float(np.mean(psnr)),
            "mean_colour_error": float(np.mean(colour)), "max_colour_error": float(np.max(colour))}


def held_out_images(held_out: schema.HeldOut) -> np.ndarray:
    return np.stack([pair.hr for pair in photos.held_out_pairs(held_out.size, held_out.crops,
                                                               held_out.seed)]).astype(np.float32) / 255.0


def run(config: schema.VAEStageConfig, out: Path, seed: int = 0, resume: bool = False, report=print) -> Path:
    """Train, measure, and write `out/weights` (a weights folder with the VAE alone); returns that folder."""
    out = common.prepare_out(out, resume, config)
    made_by = weights.provenance(stage="vae", preset_model=config.model, seed=seed)  # the code as it starts
    vae_config = vae.VAEConfig.preset(config.model)
    report(f"VAE {config.model}: {vae_config.describe()}")
    dataset = Dataset(config.data, photos.split()[0], report=report)
    lpips_params = layers.with_frozen_conv_kernels(load_lpips_params(config.lpips_net), vae_config.kernels)
    optim = config.optim.for_steps(config.steps)
    params = vae.init(vae_config, jax.random.PRNGKey(seed))
    if config.init == "identity":
        params = identity_init(params)
    state = train.init_state(vae.trainable(params), optim, jax.random.PRNGKey(seed))
    state, checkpoints, metrics = common.resume_or_start(out, state, resume, report)
    step_fn = train.make_step(make_loss(vae_config, config), optim)
    state = common.train_loop(step_fn, state, {"lpips": lpips_params},
                              lambda step: {"x": crops(dataset, step * config.batch, config.batch)[None]},
                              config.steps, checkpoints, metrics, config.checkpoint_every, "vae", ("loss", "l1"))

    trained = {**jax.device_get(state["params"]), "bn": params["bn"]}
    trained = set_bn_statistics(trained, vae_config, crops(dataset, 10**6, config.bn_samples))
    held_out = reconstruction_metrics(trained, vae_config, held_out_images(config.held_out))
    report(f"tiny VAE held-out reconstruction ({len(held_out['psnr'])} crops of {config.held_out.size} px): PSNR "
           f"{held_out['mean_psnr']:.2f} dB, colour error {held_out['mean_colour_error']:.2f}/255 (max "
           f"{held_out['max_colour_error']:.2f}); {config.steps} steps")
    metrics.write(step=config.steps, held_out=held_out)
    folder = weights.save(out / "weights", vae_params=trained, vae_config=vae_config, overwrite=True,
                          provenance={**made_by, "data": dataset_description(dataset), "held_out": held_out})
    report(f"wrote {folder} ({P.count(vae.trainable(trained)):,} parameters)")
    return folder


def dataset_description(dataset: Dataset) -> dict:
    """What a weights folder records of its training data: the config, the photos (names and sizes) and their hash."""
    return {"config": dataset.config.to_json(), "photos_sha256": dataset.fingerprint(),
            "photos": {name: list(size) for name, size in dataset.sizes.items()}}


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/vae")
    args, config = common.parse(p, argv, "vae")
    if config.vae is None:
        p.error(f"preset {args.preset!r} uses the converted FLUX.2 VAE: there is no VAE to train")
    return run(config.vae, Path(args.out), args.seed, args.resume)


if __name__ == "__main__":
    main()
