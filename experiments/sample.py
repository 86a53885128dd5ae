"""Super-resolve LR images with Flux2SR: K candidates per image that differ only in the seed.

    python -m experiments.sample [--image LR.png ...] [--num-samples 4] [--sample-steps 16] [--out runs/sample]

Without `--image`, a held-out bundled photo (HR crop -> Real-ESRGAN degradation -> LR) is used. With
`--transformer/--vae/--prompt-embedding` the converted FLUX.2-dev weights are used; without them, the tiny preset's
trained weights from `--weights` (default: the SFT run of the embedded pipeline) or, failing that, a random
initialisation (announced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from experiments import common
from foa_jax import sr
from foa_jax.data import degrade
from ports import photos


def read_lr(path: Path) -> np.ndarray:
    """An LR image file -> uint8 RGB; unreadable files are an error naming the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read LR image {path}: {err}") from err


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/sample")
    p.add_argument("--image", type=Path, nargs="*", help="LR images (default: a degraded held-out bundled photo)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--scale", type=int, default=4, help="upscaling factor")
    p.add_argument("--weights", type=Path, default=Path("runs/foa/sft/weights"), help="tiny preset's trained weights")
    args = p.parse_args(argv)
    models = common.load_models(args, args.weights)

    if args.image:
        lrs = [read_lr(path) for path in args.image]
    else:
        hr = photos.skimage_photo(photos.HELD_OUT[0])[100:356, 100:356]
        lrs = [degrade.degrade(hr, seed=args.seed)]
    f = models.vae_config.token_factor
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, lr in enumerate(lrs):
        h, w = lr.shape[0] * args.scale, lr.shape[1] * args.scale
        if h % f or w % f:
            raise ValueError(f"LR image {index} is {lr.shape[1]}x{lr.shape[0]}: x{args.scale} must be a multiple of "
                             f"{f} px per side")
        up = sr.upsample_lr(lr[None], (h, w))
        cond = sr.condition(models, up)
        samples = [sr.decode(models, sr.generate(models, cond, sr.candidate_noise(args.seed + k, cond.shape),
                                                 args.sample_steps, (h // f, w // f)), h, w)[0]
                   for k in range(args.num_samples)]
        grid = common.save_grid(out / f"samples_{index:03d}.png", [[up[0], *samples]],
                                ["LR bicubic", *[f"seed {i}" for i in range(args.num_samples)]])
        print(f"wrote {grid}")
    return out


if __name__ == "__main__":
    main()
