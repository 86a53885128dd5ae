"""Super-resolve LR images with Flux2SR: K candidates per image that differ only in the seed.

    python -m experiments.sample [--image LR.png ...] [--num-samples 4] [--sft WEIGHTS] [--out runs/sample]
        [sample_steps=16 guidance=1.0]

Without `--image`, a held-out bundled photo (HR crop -> Real-ESRGAN degradation -> LR) is used. The model is a
Flux2SR weights folder (`--sft`; the tiny preset's default is the shipped one, announced), a LoRA folder on
`--transformer` at full scale, or with `--random-init` a random tiny model (the grid's title then says RANDOM).
Images are read as every other entry point reads them (`foa_jax.data.images.read_image`: any mode, EXIF
orientation, alpha on white, 16-bit and float scaled); errors name the file. The sampler settings are the
preset's evaluation ones (`sample_steps=`, `guidance=` override them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import common
from foa_jax import sr
from foa_jax.data import degrade
from foa_jax.data.images import read_image
from ports import photos


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/sample")
    p.add_argument("--image", type=Path, nargs="+", help="LR images (default: a degraded held-out bundled photo)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--scale", type=int, default=4, help="upscaling factor")
    p.add_argument("--sft", type=Path, help="Flux2SR weights folder (experiments.sft's weights/; tiny: the shipped one)")
    args, config = common.parse(p, argv, "eval")
    if args.steps is not None or args.resume:
        p.error("--steps and --resume do not apply to sampling (sampler steps: sample_steps=N)")
    if args.num_samples < 1 or args.scale < 1:
        p.error(f"--num-samples and --scale must be >= 1, got {args.num_samples} and {args.scale}")
    settings = config.eval
    flux2sr = common.load_flux2sr(args, config, common.resolve_sft(args))
    models = flux2sr.models
    if args.image:
        named = [(path.name, read_image(path)) for path in args.image]
    else:
        hr = photos.skimage_photo(photos.HELD_OUT[0])[100:356, 100:356]
        named = [(f"held-out {photos.HELD_OUT[0]} crop", degrade.degrade(hr, seed=args.seed))]
    f = models.vae_config.token_factor
    for name, lr in named:  # every size is checked before any sampling
        h, w = lr.shape[0] * args.scale, lr.shape[1] * args.scale
        if h % f or w % f:
            p.error(f"{name} is {lr.shape[1]}x{lr.shape[0]} px: x{args.scale} gives {w}x{h}, which must be a "
                    f"multiple of {f} px per side")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (name, lr) in enumerate(named):
        size = (lr.shape[0] * args.scale, lr.shape[1] * args.scale)
        up = sr.upsample_lr(lr[None], size)
        samples = [sr.super_resolve(models, lr[None], size, args.seed + k, settings.sample_steps, settings.guidance,
                                    flux2sr.adapter, flux2sr.lora_scale)[0] for k in range(args.num_samples)]
        title = " (RANDOM model)" if flux2sr.random else ""
        grid = common.save_grid(out / f"samples_{index:03d}.png", [[up[0], *samples]],
                                [f"{name} bicubic{title}", *[f"seed {args.seed + k}" for k in range(args.num_samples)]])
        print(f"{name}: wrote {grid}")
    return out


if __name__ == "__main__":
    main()
