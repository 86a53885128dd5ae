"""Train LucidConsistency's head on the bundled training photos; compare raw and trained cosines on held-out ones.

    python -m experiments.consistency [--steps 300] [--out runs/consistency] [--qwen DIR] [section.field=value ...]

Each training photo gives `train_crops` HR crops; each crop is seen three ways, the HR itself and `lr_views`
Real-ESRGAN degradations of it (seeded), every LR upsampled back to the crop's size with the bicubic resize the SR
model's conditioning uses. The backbone (VGG16 of LPIPS by default, Qwen3-VL-Embedding with `--qwen DIR`) embeds
every view once; then the head trains on the frozen embeddings: each step takes `batch` crops and two different
views of each, the positives, the other crops being the negatives (InfoNCE).

On the held-out photos (never trained on) each crop gives one LR. The table is the cosine of matched LR–HR pairs
(same crop) and of mismatched pairs (crops of different photos), on the raw embedding and after the trained head,
beside the LucidNFT page's figures for Qwen3-VL-Embedding-8B on LSDIR-Val and across benchmarks. The HR stands in
for the SR output the score is meant for.

Writes `head.safetensors` (the torch Sequential's state dict and the backbone it belongs to), `consistency.json`
(config, backbone, table, timings) and `metrics.jsonl` (one record per training step) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from experiments import common, configs
from foa_jax import consistency as C
from foa_jax.data.dataset import DataConfig, Dataset
from foa_jax.data.degrade import DegradationConfig, degrade, min_hr_side
from foa_jax.data.resize import bicubic_upsample
from ports import photos

FILE_KIND = "foa-jax consistency head v1"
# The LucidNFT page's table (Qwen3-VL-Embedding-8B, raw -> head): matched LSDIR-Val, mismatched RealSR LR <->
# DRealSR HR.
REFERENCE = {"matched": (0.759, 0.890), "mismatched": (0.144, 0.100)}


@dataclass(frozen=True)
class ConsistencyConfig:
    """What the head trains and is scored on; the defaults are sized for the VGG backbone on a CPU."""

    crop: int = 256
    train_crops: int = 1  # HR crops per training photo
    # Real-ESRGAN LRs per training crop: on a split of the training photos, P(matched > mismatched) after the head was
    # 0.86 with 2 and 0.82 with 1 (HR-LR pairs only)
    lr_views: int = 2
    eval_crops: int = 3  # crops per held-out photo
    batch: int = 16  # crops per InfoNCE batch
    pooling: str = "stages"  # VGG backbone only
    backbone_batch: int = 8
    head: C.HeadTrainConfig = field(default_factory=C.HeadTrainConfig)

    def __post_init__(self):
        name = type(self).__name__
        for key in ("train_crops", "lr_views", "eval_crops", "backbone_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{name}.{key}: expected an int >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.batch, int) or self.batch < 2:
            raise ValueError(f"{name}.batch: InfoNCE needs negatives, so an int >= 2, got {self.batch!r}")
        smallest = min_hr_side(DegradationConfig())
        if self.crop % 16 or self.crop < smallest:
            raise ValueError(f"{name}.crop: expected a multiple of 16 (scale 4, token factor 16) and >= {smallest}, "
                             f"got {self.crop}")
        if self.pooling not in C.POOLINGS:
            raise ValueError(f"{name}.pooling: expected one of {C.POOLINGS}, got {self.pooling!r}")


# --------------------------------------------------------------------------------------------------------------------
# The head file


def save_head(path: Path, params: C.Params, backbone: dict) -> Path:
    """The head as a torch state dict in safetensors, with the backbone description it was trained on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(C.state_dict(params), str(path), metadata={"kind": FILE_KIND, "backbone": json.dumps(backbone)})
    return path


def load_head(path: Path) -> tuple[C.Params, dict]:
    """(head params, backbone description) from a file written by `save_head`; anything else is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"consistency head {path} does not exist: train one with "
                                f"`python -m experiments.consistency --out {path.parent}`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"consistency head {path} is corrupt or not a safetensors file: {err}") from err
    if metadata.get("kind") != FILE_KIND or "backbone" not in metadata:
        raise ValueError(f"{path} is not a consistency head: expected kind {FILE_KIND!r} and a backbone, got "
                         f"metadata {sorted(metadata)} with kind {metadata.get('kind')!r}")
    params = C.from_state_dict(tensors)
    backbone = json.loads(metadata["backbone"])
    if C.head_dim(params) != backbone["dim"]:
        raise ValueError(f"{path}: head width {C.head_dim(params)} but backbone {backbone} has dim {backbone['dim']}")
    return params, backbone


def load_backbone(description: dict) -> C.Backbone:
    """The backbone a head file names: VGG16 of LPIPS with its pooling, or Qwen3-VL-Embedding from its folder;
    a `dim` in the description must match the loaded backbone's."""
    if description["name"] == "vgg16-lpips":
        from ports.lpips_weights import load_lpips_params

        backbone = C.VGGBackbone(load_lpips_params("vgg"), pooling=description["pooling"],
                                 batch=description.get("batch", 8))
    elif description["name"] == "qwen3-vl-embedding":
        from ports.qwen_embedding import QwenBackbone

        backbone = QwenBackbone(description["folder"])
    else:
        raise ValueError(f"unknown consistency backbone {description['name']!r}: expected vgg16-lpips or "
                         "qwen3-vl-embedding")
    if "dim" in description and backbone.dim != description["dim"]:
        raise ValueError(f"backbone {description}: the loaded one has dim {backbone.dim}")
    return backbone


# --------------------------------------------------------------------------------------------------------------------
# Data


def crops(photo_set: dict, config: ConsistencyConfig, per_photo: int, seed: int) -> tuple[list, list, list]:
    """(HR uint8 crops, their photo names, their degradation seeds), one epoch of `per_photo` crops per photo."""
    dataset = Dataset(DataConfig(gt_size=config.crop, crops_per_image=per_photo, seed=seed), photo_set, report=print)
    specs = [dataset.spec(i) for i in range(dataset.epoch_length)]
    return [dataset.hr(s.index, s) for s in specs], [s.source for s in specs], [s.degradation_seed for s in specs]


def lr_view(hr: np.ndarray, seed: int) -> np.ndarray:
    """Real-ESRGAN LR of an HR crop, bicubically upsampled back to its size: float32 in [0, 1]."""
    return bicubic_upsample(degrade(hr, seed), hr.shape[:2])


def unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def embed(backbone: C.Backbone, images: np.ndarray, chunk: int, desc: str) -> np.ndarray:
    """`backbone(images)` `chunk` images at a time, with a progress bar: embedding is the slow part of a run."""
    return np.concatenate([np.asarray(backbone(images[i:i + chunk]))
                           for i in tqdm(range(0, len(images), chunk), desc=desc)])


# --------------------------------------------------------------------------------------------------------------------
# Scores


def _mean_std(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "count": int(values.size)}


def cosine_table(lr: np.ndarray, hr: np.ndarray, sources: list[str], head: C.Params) -> dict:
    """Matched (same crop) and mismatched (crops of different photos) LR–HR cosines, raw and after the head.

    `separation` is the fraction of (matched, mismatched) pairs in which the matched one scores higher.
    """
    different = np.asarray(sources)[:, None] != np.asarray(sources)[None, :]
    table = {}
    for name, (a, b) in {"raw": (lr, hr), "head": (C.apply_head(head, lr), C.apply_head(head, hr))}.items():
        cos = np.asarray(C.normalise(jnp.asarray(a)) @ C.normalise(jnp.asarray(b)).T)
        matched, mismatched = np.diag(cos), cos[different]
        table[name] = {"matched": _mean_std(matched), "mismatched": _mean_std(mismatched),
                       "separation": float(np.mean(matched[:, None] > mismatched[None, :]))}
    return table


def format_table(table: dict, title: str) -> str:
    def cell(stats):
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}"

    rows = [title,
            f"{'cosine':<26}{'raw embedding':>17}{'trained head':>17}    LucidNFT page (Qwen3-VL-Embedding-8B)"]
    for key, label, where in (("matched", "matched LR–HR", "LSDIR-Val"),
                              ("mismatched", "mismatched LR–HR", "RealSR LR ↔ DRealSR HR")):
        raw, head = REFERENCE[key]
        rows.append(f"{label:<26}{cell(table['raw'][key]):>17}{cell(table['head'][key]):>17}    "
                    f"{raw:.3f} → {head:.3f} ({where})")
    rows.append(f"{'P(matched > mismatched)':<26}{table['raw']['separation']:>17.3f}"
                f"{table['head']['separation']:>17.3f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------------
# Training


def train_head(embeddings: np.ndarray, config: ConsistencyConfig, seed: int, metrics: common.Metrics) -> C.Params:
    """The head trained on `(crops, views, d)` frozen embeddings: each step, `batch` crops, two distinct views each."""
    count, views, dim = embeddings.shape
    if count < config.batch:
        raise ValueError(f"consistency: {count} training crops cannot fill a batch of {config.batch}; lower batch or "
                         "raise train_crops")
    state = C.init_train_state(C.init_head(jax.random.key(seed), dim), config.head)
    step_fn = C.make_train_step(config.head)
    rng = np.random.default_rng([seed, 2])
    for step in range(config.head.steps):
        rows = rng.choice(count, config.batch, replace=False)
        pairs = np.stack([rng.choice(views, 2, replace=False) for _ in rows])
        state, m = step_fn(state, embeddings[rows, pairs[:, 0]], embeddings[rows, pairs[:, 1]])
        m = jax.device_get(m)
        metrics.write(step=step, **m)
        if step % 50 == 0 or step + 1 == config.head.steps:
            print(f"  step {step:4d}  loss {float(m['loss']):.4f}  accuracy {float(m['accuracy']):.2f}  "
                  f"positive {float(m['positive']):.3f}  negative {float(m['negative']):.3f}")
    return state["params"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/consistency"), help="run folder")
    p.add_argument("--steps", type=int, help="head training steps (config head.steps if omitted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qwen", type=Path, help="local Qwen3-VL-Embedding folder (default backbone: VGG16 of LPIPS)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    args = p.parse_intermixed_args(argv)  # overrides may stand anywhere on the line, as in the stages
    try:
        steps = [] if args.steps is None else [f"head.steps={args.steps}"]
        config = configs.override(ConsistencyConfig(), [*args.overrides, *steps])
    except (ValueError, TypeError) as err:
        p.error(str(err))
    times, start, cpu_start = {}, time.perf_counter(), time.process_time()

    description = ({"name": "qwen3-vl-embedding", "folder": str(args.qwen)} if args.qwen else
                   {"name": "vgg16-lpips", "pooling": config.pooling, "batch": config.backbone_batch})
    backbone = load_backbone(description)
    description["dim"] = backbone.dim

    train_photos, held_photos = photos.split(min_side=config.crop)
    train_hr, train_sources, train_seeds = crops(train_photos, config, config.train_crops, args.seed)
    held_hr, held_sources, held_seeds = crops(held_photos, config, config.eval_crops, args.seed)
    train_views = np.stack([[unit(hr), *(lr_view(hr, seed + v) for v in range(config.lr_views))]
                            for hr, seed in zip(train_hr, train_seeds)])
    held_lr = np.stack([lr_view(hr, seed) for hr, seed in zip(held_hr, held_seeds)])
    held_hr = np.stack([unit(hr) for hr in held_hr])
    times["data"] = time.perf_counter() - start
    print(f"{len(train_hr)} training crops of {len(train_photos)} photos x {1 + config.lr_views} views, "
          f"{len(held_hr)} held-out crops of {len(held_photos)} photos ({', '.join(sorted(held_photos))}); "
          f"{times['data']:.0f} s")

    t0 = time.perf_counter()
    flat = train_views.reshape(-1, *train_views.shape[2:])
    train_embeddings = embed(backbone, flat, config.backbone_batch, "embed train").reshape(
        *train_views.shape[:2], backbone.dim)
    held_lr_embeddings = embed(backbone, held_lr, config.backbone_batch, "embed held-out LR")
    held_hr_embeddings = embed(backbone, held_hr, config.backbone_batch, "embed held-out HR")
    times["embed"] = time.perf_counter() - t0
    print(f"embedded {len(flat) + 2 * len(held_hr)} images with {description['name']} (d = {backbone.dim}) in "
          f"{times['embed']:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = common.Metrics(out / "metrics.jsonl")
    metrics.path.write_text("")  # a rerun replaces the log: the head is retrained from scratch
    t0 = time.perf_counter()
    head = train_head(train_embeddings, config, args.seed, metrics)
    times["train"] = time.perf_counter() - t0

    table = cosine_table(held_lr_embeddings, held_hr_embeddings, held_sources, head)
    train_table = cosine_table(train_embeddings[:, 1], train_embeddings[:, 0], train_sources, head)
    times["total"] = time.perf_counter() - start
    times["cpu_total"] = time.process_time() - cpu_start  # all threads: on a shared machine the fairer figure
    title = (f"LucidConsistency on {len(held_hr)} held-out {config.crop}-px crops of {len(held_photos)} photos, "
             f"backbone {description['name']}" + (f" ({config.pooling})" if not args.qwen else "") +
             f", d = {backbone.dim}, {config.head.steps} steps")
    print(format_table(table, title))
    print(f"training crops (LR view 1 vs HR): matched {train_table['head']['matched']['mean']:.3f}, mismatched "
          f"{train_table['head']['mismatched']['mean']:.3f} after the head; {times['total']:.0f} s "
          f"({times['cpu_total']:.0f} s of CPU)")

    save_head(out / "head.safetensors", head, description)
    report = {"config": common.to_jsonable(config), "seed": args.seed, "backbone": description,
              "held_out": {"photos": sorted(held_photos), "crops": len(held_hr), "table": table},
              "train": {"photos": len(train_photos), "crops": len(train_hr), "table": train_table},
              "reference": REFERENCE, "time_s": times}
    (out / "consistency.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'head.safetensors'} and {out / 'consistency.json'}")
    return report


if __name__ == "__main__":
    main()
