"""Flux2SR: supervised SR training of FLUX.2: flow matching + Charbonnier + LPIPS, the LR image as reference tokens.

    python -m experiments.sft [--preset tiny] [--vae VAE] [--out runs/foa/sft] [--steps N] [--resume] [field=value ...]
    python -m experiments.sft --preset flux2-dev --transformer T --vae V --prompt-embedding P --hr DIR [DIR ...]
    python -m experiments.sft target=reference --steps 300 --out runs/diagnostic   # the reference-path diagnostic

At full scale it trains a LoRA (rank 64, `attn+add`) on the frozen bf16 base. The tiny preset has nothing pretrained
to adapt: it trains every weight of the tiny transformer (its VAE comes from `experiments.vae`: `--vae`, else
`runs/foa/vae/weights`, else the shipped one, each announced). Training samples come from a latent cache built once
(HR tokens and LR-condition tokens per sample); checkpoints every N steps and at the end, `--resume` continues
exactly; metrics go to `metrics.jsonl`. At the end the held-out crops are super-resolved and scored beside bicubic
upsampling and the untrained model (PSNR, SSIM, LPIPS, and PSNR at 1/8 size for layout and colour), a grid is saved,
and `weights/` is written (a weights folder: the transformer or the LoRA, the VAE, the prompt embedding).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import common
from experiments.configs import schema
from foa_jax import lora as lora_lib
from foa_jax import sr, train
from foa_jax.data import cache as cache_lib
from foa_jax.data.dataset import Dataset
from foa_jax.models import layers, vae
from ports import photos, weights
from ports.lpips_weights import load_lpips_params


def training_batch(cache: cache_lib.LatentCache, seed: int, step: int, config: schema.SFTConfig) -> dict:
    """The step's samples, shaped (grad_accum, batch, ...): target tokens, LR tokens and target images in [0, 1].

    With `target="reference"` the target is the reference itself (the LR's tokens and its bicubic upsampling)."""
    n = config.optim.grad_accum
    raw = cache.batch(train.batch_indices(seed, step, len(cache), n * config.batch))
    if config.target == "reference":
        size = raw["hr"].shape[1:3]
        batch = {"z": raw["c"], "cond": raw["c"], "hr": sr.upsample_lr(raw["lr"], size)}
    else:
        batch = {"z": raw["z_hr"], "cond": raw["c"], "hr": raw["hr"].astype(np.float32) / 255.0}
    return {k: np.asarray(v).reshape(n, config.batch, *np.shape(v)[1:]) for k, v in batch.items()}


def build_cache(out: Path, config: schema.SFTConfig, models: sr.Models, source, report=print) -> cache_lib.LatentCache:
    """The training latent cache of `source` photos (bundled training photos or `--hr` folders), built once."""
    dataset = Dataset(config.data, source, report=report)
    encode = jax.jit(lambda x: vae.encode_tokens(models.vae, models.vae_config, sr.to_model_range(x)))
    with tqdm(total=config.samples, desc="latent cache") as bar:
        return cache_lib.build(out / "cache", dataset, config.samples, encode, cache_lib.fingerprint(models.vae),
                               store_images=True, progress=lambda done, total: bar.update(done - bar.n), report=report)


def validate(out: Path, models: sr.Models, untrained: sr.Models, adapter, config: schema.SFTConfig, seed: int,
             metrics: common.Metrics, report=print) -> dict:
    """Held-out PSNR/SSIM/LPIPS and 1/8-size PSNR of bicubic, the untrained model and the trained one; a grid."""
    from ports import iqa

    held_out = config.held_out
    pairs = photos.held_out_pairs(held_out.size, held_out.crops, held_out.seed)
    lrs = np.stack([pair.lr for pair in pairs])
    hrs = np.stack([pair.hr for pair in pairs]).astype(np.float32) / 255.0
    size = hrs.shape[1:3]
    scale = config.lora.scale if adapter is not None else 1.0
    outputs = {
        "bicubic": sr.upsample_lr(lrs, size),
        "untrained": sr.super_resolve(untrained, lrs, size, seed, config.sample_steps, config.guidance),
        "flux2sr": sr.super_resolve(models, lrs, size, seed, config.sample_steps, config.guidance, adapter, scale),
    }
    scorer = iqa.Scorer(("psnr", "ssim", "lpips"))
    table = {}
    for name, images in outputs.items():
        images = np.round(np.clip(images, 0, 1) * 255) / 255  # scored as saved
        row = {m: float(np.mean(v)) for m, v in scorer.score(images, hrs).items()}
        row["psnr_1/8"] = float(np.mean(iqa.coarse_psnr(images, hrs)))
        table[name] = row
    grid = common.save_grid(out / "validation.png", [[hr, *[o[i] for o in outputs.values()]]
                                                      for i, hr in enumerate(hrs[:8])], ["HR", *outputs])
    metrics.write(step=config.steps, validation=table)
    report(f"held-out ({len(pairs)} crops of {', '.join(photos.HELD_OUT)}; {size[0]} px; step {config.steps}):")
    for name, row in table.items():
        report(f"  {name:10s} " + "  ".join(f"{m} {v:.4f}" for m, v in row.items()))
    report(f"  grid: {grid}")
    return table


def run(config: schema.SFTConfig, models: sr.Models, prompt_meta: dict, out: Path, seed: int = 0, resume: bool = False,
        source=None, vae_provenance: dict | None = None, report=print) -> Path:
    """Train Flux2SR and write `out/weights` (returned). `prompt_meta` describes `models.prompt` (see
    `common.prompt_meta`); `source`: the HR photos (default: the bundled training set); `vae_provenance`: how the VAE
    was made, recorded beside Flux2SR's own."""
    out = common.prepare_out(out, resume, config)
    made_by = weights.provenance(stage="sft", seed=seed, target=config.target, steps=config.steps,
                                 vae=vae_provenance)  # the code as it starts
    t_config = models.transformer_config.replace(dtype="bfloat16" if config.bf16 else "float32", remat=config.remat)
    base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), models.transformer) if config.bf16 else models.transformer
    models = models.replace(transformer=base, transformer_config=t_config)
    report(f"transformer: {t_config.describe()}; VAE: {models.vae_config.describe()}")
    untrained = models
    source = source if source is not None else photos.split(min_side=config.data.gt_size)[0]
    cache = build_cache(out, config, models, source, report)
    size = config.data.gt_size
    grid = sr.token_grid(models, size, size)
    # LPIPS stays frozen: its convolutions' input-gradient and Winograd kernels are formed once here, not every step.
    lpips_params = layers.with_frozen_conv_kernels(load_lpips_params(config.loss.lpips_net), models.vae_config.kernels)
    frozen = {"models": models, "lpips": lpips_params}
    if config.mode == "lora":
        trainable = lora_lib.init(models.transformer, config.lora, jax.random.PRNGKey(seed))
    else:
        trainable = models.transformer
        frozen["models"] = models.replace(transformer={})  # the trained copy is the only one the step reads
    optim = config.optim.for_steps(config.steps)
    state = train.init_state(trainable, optim, jax.random.PRNGKey(seed))
    state, checkpoints, metrics = common.resume_or_start(out, state, resume, report)
    loss = sr.sft_loss(config.mode, config.loss, grid, config.guidance, config.lora.scale)
    step_fn = train.make_step(loss, optim)
    state = common.train_loop(step_fn, state, frozen, lambda step: training_batch(cache, seed, step, config),
                              config.steps, checkpoints, metrics, config.checkpoint_every, "sft", ("loss", "fm"))

    trained = jax.device_get(state["params"])
    adapter = trained if config.mode == "lora" else None
    if config.mode == "full":
        models = models.replace(transformer=trained)
    table = validate(out, models, untrained, adapter, config, seed, metrics, report) if config.validate else None
    t_params_config = models.transformer_config.replace(dtype="float32", remat="none")
    folder = weights.save(
        out / "weights", vae_params=models.vae, vae_config=models.vae_config, prompt=np.asarray(models.prompt),
        prompt_meta=prompt_meta, overwrite=True,
        transformer=(models.transformer, t_params_config) if config.mode == "full" else None,
        lora=(adapter, config.lora) if config.mode == "lora" else None,
        provenance={**made_by, "held_out": table,
                    "data": {"config": config.data.to_json(), "samples": config.samples,
                             "photos_sha256": Dataset(config.data, source, report=lambda _: None).fingerprint()}})
    report(f"wrote {folder}")
    return folder


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/sft")
    p.add_argument("--hr", type=Path, nargs="+", help="folders of HR training images (default: bundled photos)")
    args, config = common.parse(p, argv, "sft")
    models = common.load_models(args, config, for_training=True)
    source = common.photo_folders(args.hr) if args.hr else None
    return run(config.sft, models, common.prompt_meta(args, models.prompt), Path(args.out), args.seed, args.resume,
               source, common.vae_provenance(args, config))


if __name__ == "__main__":
    main()
