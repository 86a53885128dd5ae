"""Flux2SR: supervised SR training of FLUX.2 (SPEC §2): flow matching + Charbonnier + LPIPS, LR as reference tokens.

    python -m experiments.sft [--preset tiny] [--out runs/foa/sft] [--steps N] [--resume] [section.field=value ...]
    python -m experiments.sft --preset flux2-dev --transformer T --vae V --prompt-embedding P --hr DIR [DIR ...]

At full scale it trains a LoRA (rank 64, `attn+add`) on the frozen bf16 base with AdamW and a constant-with-warmup
schedule. The tiny preset has no pretrained backbone: it trains all tiny transformer weights from scratch (after the
tiny VAE stage, `experiments.vae`, which it runs first when its weights are missing). Both read training samples from a
latent cache built once (HR latent and LR-condition latent per sample); checkpoints every N steps and at the end,
`--resume` continues exactly; metrics go to `metrics.jsonl`; held-out samples are saved as an image grid with
PSNR/SSIM/LPIPS beside bicubic upsampling and the untrained model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import common
from foa_jax import lora as lora_lib
from foa_jax import losses, sampling, sr, train
from foa_jax.data import cache as cache_lib
from foa_jax.data.dataset import DataConfig, Dataset, FolderPhotos
from foa_jax.models import flux2, layers, vae
from ports import convert, photos
from ports.lpips_weights import load_lpips_params


@dataclass(frozen=True)
class SFTConfig:
    """Everything that defines a Flux2SR run besides the model files; presets below, dotted overrides on the CLI."""

    mode: str = "lora"  # "lora" (frozen base) or "full" (every transformer weight trains: the tiny preset)
    lora: lora_lib.LoRAConfig = field(default_factory=lora_lib.LoRAConfig)
    loss: losses.SFTLossConfig = field(default_factory=losses.SFTLossConfig)
    optim: train.OptimConfig = field(default_factory=train.OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig.preset("full"))
    batch: int = 1
    samples: int = 50_000  # cached training pairs
    bf16: bool = True
    remat: str = "full"
    guidance: float = 1.0
    sample_steps: int = 16
    checkpoint_every: int = 1000
    validation_crops: int = 2  # per held-out photo
    validation_size: int | None = None  # HR side of the held-out crops (default: data.gt_size)
    validate: bool = True  # held-out samples and metrics at the end (off in tests)
    steps: int = 50_000

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"SFTConfig.mode must be 'lora' or 'full', got {self.mode!r}")
        if self.batch < 1 or self.samples < 1 or self.steps < 1:
            raise ValueError(f"SFTConfig: batch, samples and steps must be >= 1, got {self.batch}, {self.samples}, "
                             f"{self.steps}")


PRESETS = {
    "flux2-dev": SFTConfig(),
    "klein-4b": SFTConfig(),
    "klein-9b": SFTConfig(),
    # Trains on 128-px crops (64 tokens + 64 reference tokens: ~4x cheaper than 256 px) and validates at 256 px, the
    # size mining and evaluation use (RoPE makes the transformer size-agnostic). Flow matching only: decoding through
    # the VAE for the pixel terms costs more than the transformer here (0.16 s per step without them, 0.28 s with one
    # decoded sample of eight), and in the same time FM-only training is better on held-out PSNR/SSIM (17.64 dB /
    # 0.483 after 640 steps against 16.08 dB / 0.414 after 320 steps with Charbonnier + LPIPS-Alex on one sample;
    # LPIPS 0.828 against 0.775). Sized with the VAE stage for 5 min here.
    "tiny": SFTConfig(
        mode="full", bf16=False, remat="none", batch=8, samples=256, steps=560, checkpoint_every=280,
        data=dataclasses.replace(DataConfig.preset("tiny"), gt_size=128), validation_size=256,
        optim=train.OptimConfig(lr=3e-4, warmup=50, weight_decay=0.0),
        loss=losses.SFTLossConfig(lambda_pix=0.0, lambda_lpips=0.0, lpips_net="alex"),
    ),
}


def config_for(preset: str, overrides) -> SFTConfig:
    return common.apply_overrides(PRESETS.get(preset, PRESETS["flux2-dev"]), overrides)


# ------------------------------------------------------------------------------------------------ model and loss


def velocity_fn(models: sr.Models, grid: tuple[int, int], guidance: float):
    """`predict(transformer_params, lora, lora_scale, z_t, cond, t)`: velocity of the noisy tokens only."""
    ids = sampling.image_ids(grid, [grid])

    def predict(t_params, adapter, scale, z_t, cond, t):
        b, n = z_t.shape[:2]
        prompt = jnp.broadcast_to(models.prompt, (b, *models.prompt.shape[1:]))
        g = jnp.full((b,), guidance) if models.transformer_config.guidance_embeds else None
        out = flux2.apply(t_params, models.transformer_config, jnp.concatenate([z_t, cond], axis=1), prompt, t, ids,
                          models.txt_ids, g, lora=adapter, lora_scale=scale)
        return out[:, :n]

    return predict


def make_loss(models: sr.Models, config: SFTConfig, grid: tuple[int, int], size: int):
    """`loss(trainable, frozen, batch, key, step)` for the train step; which tree trains depends on the mode."""
    predict = velocity_fn(models, grid, config.guidance)

    def loss(trainable, frozen, batch, key, step):
        if config.mode == "lora":
            t_params, adapter = frozen["transformer"], trainable
        else:
            t_params, adapter = trainable, None

        def decode(tokens):
            return sr.to_unit_range(vae.decode_tokens(frozen["vae"], models.vae_config, tokens, size, size))

        return losses.sft_loss(lambda z_t, c, t: predict(t_params, adapter, config.lora.scale, z_t, c, t), decode,
                               frozen["lpips"], batch, key, step, config.loss)

    return loss


def training_batch(cache: cache_lib.LatentCache, seed: int, step: int, config: SFTConfig) -> dict:
    """The step's samples, shaped (grad_accum, batch, ...): HR tokens, LR tokens and HR images in [0, 1]."""
    n = config.optim.grad_accum
    raw = cache.batch(train.batch_indices(seed, step, len(cache), n * config.batch))
    batch = {"z": raw["z_hr"], "cond": raw["c"], "hr": raw["hr"].astype(np.float32) / 255.0}
    return {k: v.reshape(n, config.batch, *v.shape[1:]) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------ validation


def validation_pairs(config: SFTConfig) -> list:
    """Fixed LR/HR crops of the held-out bundled photos (never trained on), degraded with their own seed."""
    size = config.validation_size or config.data.gt_size
    _, held_out = photos.split(min_side=size)
    data = dataclasses.replace(config.data, gt_size=size, crops_per_image=config.validation_crops, seed=10_007)
    dataset = Dataset(data, held_out, report=lambda _: None)
    return [dataset.pair(i) for i in range(dataset.epoch_length)]


def validate(out: Path, models: sr.Models, untrained: sr.Models, adapter, config: SFTConfig, seed: int,
             step: int, metrics: common.Metrics) -> dict:
    """Held-out PSNR/SSIM/LPIPS of bicubic, the untrained model and the trained one; writes an image grid."""
    from ports import iqa

    pairs = validation_pairs(config)
    lrs = np.stack([lr for lr, _ in pairs])
    hrs = np.stack([hr for _, hr in pairs]).astype(np.float32) / 255.0
    size = hrs.shape[1]
    outputs = {
        "bicubic": sr.upsample_lr(lrs, (size, size)),
        "untrained": sr.super_resolve(untrained, lrs, (size, size), seed, config.sample_steps, config.guidance),
        "flux2sr": sr.super_resolve(models, lrs, (size, size), seed, config.sample_steps, config.guidance, adapter,
                                 config.lora.scale),
    }
    scorer = iqa.Scorer(("psnr", "ssim", "lpips"))
    table = {name: {m: float(np.mean(v)) for m, v in scorer.score(images, hrs).items()}
             for name, images in outputs.items()}
    grid = common.save_grid(out / f"validation_{step:06d}.png",
                            [[hr, *[o[i] for o in outputs.values()]] for i, hr in enumerate(hrs)],
                            ["HR", *outputs])
    metrics.write(step=step, validation=table)
    print(f"held-out ({len(pairs)} crops of {', '.join(photos.HELD_OUT)}; {size} px; step {step}):")
    for name, row in table.items():
        print(f"  {name:10s} " + "  ".join(f"{m} {v:.4f}" for m, v in row.items()))
    print(f"  grid: {grid}")
    return table


# ------------------------------------------------------------------------------------------------------------- main


def prepare_data(args, config: SFTConfig, models: sr.Models, out: Path) -> cache_lib.LatentCache:
    """The training latent cache: bundled training photos (tiny) or `--hr` folders, built once, resumable."""
    source = FolderPhotos(args.hr) if args.hr else photos.split(min_side=config.data.gt_size)[0]
    dataset = Dataset(config.data, source, report=print)
    encode = jax.jit(lambda x: vae.encode_tokens(models.vae, models.vae_config, sr.to_model_range(x)))
    with tqdm(total=config.samples, desc="latent cache") as bar:
        return cache_lib.build(out / "cache", dataset, config.samples, encode,
                               cache_lib.fingerprint(models.vae), store_images=True,
                               progress=lambda done, total: bar.update(done - bar.n), report=print)


def ensure_tiny_vae(args, runs: Path) -> Path | None:
    """The tiny preset's VAE: `--vae` if given, else the VAE stage's output, trained now if missing."""
    if args.vae is not None or args.preset != "tiny":
        return args.vae
    path = runs / "vae" / "weights" / "vae"
    if not (path / convert.FOA_CONFIG).exists():
        from experiments import vae as vae_stage

        print(f"no tiny VAE at {path}: training it first (experiments.vae)")
        vae_stage.main(["--out", str(runs / "vae"), "--seed", str(args.seed)])
    return path


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/sft")
    p.add_argument("--hr", type=Path, nargs="*", help="folders of HR training images (default: bundled photos)")
    args = p.parse_args(argv)
    config = config_for(args.preset, args.overrides)
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    out = common.prepare_out(args.out, args.resume, config)
    args.vae = ensure_tiny_vae(args, Path(args.out).parent)
    models = common.load_models(args)
    t_config = models.transformer_config.replace(dtype="bfloat16" if config.bf16 else "float32", remat=config.remat)
    base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), models.transformer) if config.bf16 else models.transformer
    models = models.replace(transformer=base, transformer_config=t_config)
    untrained = models

    cache = prepare_data(args, config, models, out)
    size = config.data.gt_size
    f = models.vae_config.token_factor
    # LPIPS stays frozen: its convolutions' input-gradient and Winograd kernels are formed once here, not in every step.
    lpips_params = layers.with_frozen_conv_kernels(load_lpips_params(config.loss.lpips_net))
    frozen = {"vae": models.vae, "lpips": lpips_params}
    if config.mode == "lora":
        trainable = lora_lib.init(models.transformer, config.lora, jax.random.PRNGKey(args.seed))
        frozen["transformer"] = models.transformer
    else:
        trainable = models.transformer
    state = train.init_state(trainable, config.optim, jax.random.PRNGKey(args.seed))
    checkpoints = common.Checkpoints(out / "checkpoints")
    start = 0
    if args.resume:
        state, start = checkpoints.restore_latest(state)
        print(f"resumed from step {start}")
    metrics = common.Metrics(out / "metrics.jsonl")
    metrics.truncate_after(start - 1)
    step_fn = train.make_step(make_loss(models, config, (size // f, size // f), size), config.optim)

    state = common.train_loop(step_fn, state, frozen, lambda step: training_batch(cache, args.seed, step, config),
                              config.steps, checkpoints, metrics, config.checkpoint_every, "sft", ("loss", "fm"))

    trained = state["params"]
    if config.mode == "full":
        models = models.replace(transformer=trained)
        adapter = None
    else:
        adapter = trained
    if config.validate:
        validate(out, models, untrained, adapter, config, args.seed, config.steps, metrics)
    save_weights(out / "weights", models, adapter, config, args)
    return out


def save_weights(folder: Path, models: sr.Models, adapter, config: SFTConfig, args) -> Path:
    """Everything a later stage loads: transformer (full mode) or adapter, the VAE and the prompt embedding."""
    from ports import text_encoder

    folder.mkdir(parents=True, exist_ok=True)
    if adapter is None:
        convert.save(folder / "transformer", jax.tree.map(lambda a: a.astype(jnp.float32), models.transformer),
                     models.transformer_config.replace(dtype="float32", remat="none"), convert.KINDS["transformer"],
                     "experiments.sft")
    else:
        from ports import lora_io

        lora_io.export_lora(folder / "lora.safetensors", adapter, config.lora)
    convert.save(folder / "vae", models.vae, models.vae_config, convert.KINDS["vae"], "experiments.sft")
    prompt = np.asarray(models.prompt, np.float32)
    text_encoder.save_prompt_embedding(folder / "prompt_embedding.safetensors", prompt, {
        "prompts": ["<the prompt embedding this model was trained with>"], "max_length": prompt.shape[1],
        "layers": [0], "encoder": str(args.prompt_embedding or "tiny preset: fixed random embedding"),
        "encoder_config_sha256": ""})
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
