"""Evaluate SR methods on LR/HR pairs with raw pyiqa metrics: bicubic, Flux2SR and each profile adapter.

    python -m experiments.evaluate [--preset tiny] [--out runs/foa/eval] [--sft runs/foa/sft/weights]
        [--adapter faithful=runs/foa/dpo/faithful.safetensors ...] [--lr DIR --hr DIR [--scale 4]]
        [--iqa-weights DIR] [field=value ...]

Methods: `bicubic` (the LR upsampled to the HR size, the same resize that conditions Flux2SR), `flux2sr` (the SFT
weights folder, loaded by `common.load_flux2sr`: models plus the Flux2SR LoRA if the run trained one) and one method
per `--adapter NAME=PATH` (a LoRA file as `ports.lora_io.export_lora` writes it). A profile adapter is applied alone
to the transformer the SFT folder holds: in the tiny preset Flux2SR is a full-weight model without adapter and a DPO
adapter is a LoRA on top of it; at full scale Flux2SR is itself a LoRA and the DPO policy was initialised from it, so
the DPO file replaces it (the Flux2SR LoRA is not stacked under it).

Inputs: the bundled held-out photos (`held_out.crops` fixed crops each, `ports.photos.held_out_pairs`)
or `--lr DIR --hr DIR`, paired by file name (`foa_jax.data.dataset.paired_folders`: unmatched names and LR x scale !=
HR sizes are errors naming the files, raised before any model or metric is loaded).

Outputs in `--out`: `metrics.md` (mean per method, one column per method, the scorer's pinned settings,
per-image rows), `metrics.csv` (per-image rows), `metrics.json` (everything), `perception_distortion.png` (PSNR
against the no-reference metric `nr_metric`, one point per method), `crops.png` (the same centre crop of LR, every
method and HR, side by side) and `images/<method>/<image>.png`, the outputs exactly as scored.

Choices that change numbers, all recorded in the report:
- Outputs are rounded to 8 bits before scoring, so the saved PNGs reproduce every number with any external tool.
- Every SR input starts from the same noise, candidate `seed` drawn at batch size 1 as `experiments.sample` draws it,
  for every method: an output depends on neither its batch nor the other inputs.
- HR sides must be whole tokens (and multiples of the scale and of what the metrics need): other pairs are
  centre-cropped, LR and HR together on the same pixel grid, and each crop is listed in the report. Cropping rather
  than refusing keeps real test sets such as RealSR (arbitrary sizes) usable; it removes at most one token's width.
- Raw metric values, no normalisation: the mining normalisation of `foa_jax.rewards` is not applied here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from experiments import common
from experiments.configs.schema import EvalConfig, HeldOut
from foa_jax import lora as lora_lib
from foa_jax import sr
from foa_jax.data.dataset import EvalPair, paired_folders
from ports import iqa, photos

BICUBIC = "bicubic"
FLUX2SR = "flux2sr"
RESERVED_NAMES = ("LR", "HR")  # image folders and crop columns of their own
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# The paper's metrics that ports.iqa registers (FID, a folder statistic, is not a per-image metric and is left out).
PAPER_METRICS = EvalConfig().metrics
# What ports.iqa computes without any downloaded weight file.
OFFLINE_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "piqe")


def make_scorer(config: EvalConfig, weights_dir: Path | None = None) -> iqa.Scorer:
    """The scorer `evaluate` expects for `config` (its metrics and crop border); `weights_dir` holds pyiqa's files."""
    return iqa.Scorer(config.metrics, weights_dir=weights_dir, crop_border=config.crop_border)


# ----------------------------------------------------------------------------------------------------------- inputs


def held_out_pairs(held_out: HeldOut) -> list[EvalPair]:
    """The bundled held-out photos' fixed crops (never trained on), the ones Flux2SR's validation scores."""
    return photos.held_out_pairs(held_out.size, held_out.crops, held_out.seed)


def pair_scale(pair: EvalPair) -> int:
    """The integer factor between a pair's HR and LR sides; anything else is an error naming the pair."""
    (lh, lw), (hh, hw) = pair.lr.shape[:2], pair.hr.shape[:2]
    scale = hh // lh if lh else 0
    if scale < 1 or (lh * scale, lw * scale) != (hh, hw):
        raise ValueError(f"pair {pair.name!r}: HR {hh}x{hw} is not an integer multiple of LR {lh}x{lw}")
    return scale


def fit_to_grid(pairs: Sequence[EvalPair], multiple: int) -> tuple[list[EvalPair], list[str]]:
    """Centre-crop every pair whose HR sides are not multiples of `multiple` (itself a multiple of each pair's scale),
    LR and HR on the same grid: the HR crop starts at a multiple of the scale, the LR crop at that divided by it.
    Returns the pairs and one note per cropped pair."""
    fitted, notes = [], []
    for pair in pairs:
        scale = pair_scale(pair)
        if multiple % scale:
            raise ValueError(f"pair {pair.name!r}: crop multiple {multiple} is not a multiple of its scale {scale}")
        h, w = pair.hr.shape[:2]
        ch, cw = h - h % multiple, w - w % multiple
        if (ch, cw) == (h, w):
            fitted.append(pair)
            continue
        if not ch or not cw:
            raise ValueError(f"pair {pair.name!r}: HR {h}x{w} is smaller than one {multiple}-px tile")
        top, left = (h - ch) // 2 // scale * scale, (w - cw) // 2 // scale * scale
        hr = pair.hr[top:top + ch, left:left + cw]
        lr = pair.lr[top // scale:(top + ch) // scale, left // scale:(left + cw) // scale]
        fitted.append(EvalPair(pair.name, np.ascontiguousarray(lr), np.ascontiguousarray(hr)))
        notes.append(f"{pair.name}: HR {h}x{w} centre-cropped to {ch}x{cw} at ({top}, {left}), LR likewise at "
                     f"1/{scale}")
    return fitted, notes


def grid_multiple(models: sr.Models, pairs: Sequence[EvalPair], metrics: Sequence[str]) -> int:
    """The side multiple every HR image needs: whole tokens, whole LR pixels, and what the metrics divide by."""
    return math.lcm(models.vae_config.token_factor, *{pair_scale(p) for p in pairs},
                    *(iqa.REGISTRY[m].multiple_of for m in metrics))


# ---------------------------------------------------------------------------------------------------------- methods


def check_methods(methods: Mapping[str, object]) -> dict[str, str]:
    """A description of every method, after checking its name and value: `BICUBIC`, None (the Flux2SR model as
    loaded) or `(adapter tree, LoRAConfig)` as `ports.lora_io.import_lora` and `common.load_flux2sr` return them."""
    if not methods:
        raise ValueError("evaluate: no methods given")
    described = {}
    for name, method in methods.items():
        check_method_name(name)
        if isinstance(method, str) and method == BICUBIC:
            described[name] = "bicubic upsampling of the LR input"
        elif method is None:
            described[name] = "the SR model without adapter"
        elif (isinstance(method, tuple) and len(method) == 2 and isinstance(method[0], dict)
              and isinstance(method[1], lora_lib.LoRAConfig)):
            c = method[1]
            described[name] = f"LoRA rank {c.rank}, alpha {c.alpha or c.rank}, targets {c.targets} on the SR model"
        else:
            raise ValueError(f"method {name!r}: expected {BICUBIC!r}, None or (adapter tree, LoRAConfig), got "
                             f"{type(method).__name__}")
    return described


def check_method_name(name) -> None:
    """A method name names a folder and a column: letters, digits and `_.+-`, not one of `RESERVED_NAMES`."""
    if not isinstance(name, str) or not _METHOD_NAME.match(name) or name in RESERVED_NAMES:
        raise ValueError(f"method name {name!r}: expected letters, digits and _.+- (and not one of {RESERVED_NAMES})")


def run_method(models: sr.Models, method, lrs: np.ndarray, hr_size: tuple[int, int], config: EvalConfig) -> np.ndarray:
    """One method's outputs for an LR batch, rounded to uint8 (what is saved and scored)."""
    if isinstance(method, str):
        images = sr.upsample_lr(lrs, hr_size)
    else:
        adapter, lora_config = method if method is not None else (None, None)
        images = sr.super_resolve(models, lrs, hr_size, config.seed, config.sample_steps, config.guidance, adapter,
                               lora_config.scale if lora_config else 1.0)
    return to_uint8(images)


def to_uint8(images) -> np.ndarray:
    return np.clip(np.round(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def batches(pairs: Sequence[EvalPair], size: int) -> list[list[int]]:
    """Pair indices in batches of at most `size` with one HR shape each, in pair order within a shape."""
    by_shape: dict[tuple, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_shape.setdefault(pair.hr.shape, []).append(index)
    return [group[i:i + size] for group in by_shape.values() for i in range(0, len(group), size)]


# ---------------------------------------------------------------------------------------------------- the evaluation


def evaluate(out: Path, models: sr.Models, methods: Mapping[str, object], pairs: Sequence[EvalPair],
             config: EvalConfig, scorer: iqa.Scorer, source: str = "pairs", announce=print) -> dict:
    """Run every method on every pair, score the outputs and write the report files into `out`.

    `methods` maps a name to `BICUBIC`, None (the SR model as loaded) or `(adapter tree, LoRAConfig)`; `scorer` must
    be `make_scorer(config)`'s (same metrics, same crop border). Returns the mean table `{method: {metric: mean}}`.
    """
    start = time.perf_counter()
    kinds = check_methods(methods)
    pairs, notes = prepare_pairs(models, pairs, config, scorer)
    out = Path(out)
    for pair in pairs:
        save_png(out / "images" / "LR" / f"{pair.name}.png", pair.lr)
        save_png(out / "images" / "HR" / f"{pair.name}.png", pair.hr)
    rows, crops, seconds = run_and_score(out, models, methods, pairs, config, scorer)
    means = {m: {metric: float(np.mean([r[metric] for r in rows if r["method"] == m])) for metric in config.metrics}
             for m in methods}
    seconds["total"] = time.perf_counter() - start
    report = {
        "source": source, "pairs": len(pairs), "hr_sizes": sorted({f"{p.hr.shape[0]}x{p.hr.shape[1]}" for p in pairs}),
        "methods": kinds, "notes": standard_notes(config) + notes, "config": common.to_jsonable(config),
        "metric_settings": scorer.describe(), "plot_metric": config.plot_metric, "means": means, "rows": rows,
        "seconds": seconds,
    }
    write_report(out, report, config)
    common.save_grid(out / "crops.png", [list(row) for row in zip(*crops.values())], list(crops))
    plot_perception_distortion(out / "perception_distortion.png", means, config.plot_metric, source)
    announce(mean_table(means, config.metrics))
    announce(scorer.describe())
    announce(f"{len(pairs)} pairs x {len(methods)} methods in {seconds['total']:.1f} s; report: {out / 'metrics.md'}")
    return means


def prepare_pairs(models: sr.Models, pairs: Sequence[EvalPair], config: EvalConfig,
                  scorer: iqa.Scorer) -> tuple[list[EvalPair], list[str]]:
    """Everything that can fail before SR work: the scorer, unique names, sizes; then the fit to the token grid."""
    if tuple(scorer.metrics) != tuple(config.metrics) or scorer.crop_border != config.crop_border:
        raise ValueError(f"evaluate: the scorer computes {scorer.metrics} with crop border {scorer.crop_border}, the "
                         f"config asks for {config.metrics} with {config.crop_border}: build it with make_scorer")
    if not pairs:
        raise ValueError("evaluate: no LR/HR pairs given")
    names = [pair.name for pair in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: image names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    pairs, notes = fit_to_grid(pairs, grid_multiple(models, pairs, config.metrics))
    for shape in {pair.hr.shape[:2] for pair in pairs}:
        scorer._check_sizes(*shape)  # a metric that cannot score this size fails here, naming the size it needs
    return pairs, notes


def run_and_score(out: Path, models: sr.Models, methods: Mapping[str, object], pairs: Sequence[EvalPair],
                  config: EvalConfig, scorer: iqa.Scorer) -> tuple[list[dict], dict[str, list], dict[str, float]]:
    """Per-image rows (method-major), the crop columns (LR, each method, HR) and seconds per method; the outputs are
    saved as `images/<method>/<image>.png` on the way (only crops stay in memory)."""
    crop_pairs = pairs[:config.crop_images]
    side = crop_side(config.crop_size, pairs)
    crops = {"LR": [lr_crop(p, side) for p in crop_pairs]}
    scores_by_image, seconds = {}, {}
    groups = batches(pairs, config.batch)
    with tqdm(total=len(methods) * len(groups), desc="evaluate") as bar:
        for name, method in methods.items():
            t0 = time.perf_counter()
            crops[name] = [None] * len(crop_pairs)
            for group in groups:
                outputs = run_method(models, method, np.stack([pairs[i].lr for i in group]),
                                     pairs[group[0]].hr.shape[:2], config)
                hrs = np.stack([pairs[i].hr for i in group])
                scores = scorer.score(outputs.astype(np.float32) / 255.0, hrs.astype(np.float32) / 255.0)
                for k, i in enumerate(group):
                    save_png(out / "images" / name / f"{pairs[i].name}.png", outputs[k])
                    scores_by_image[(name, i)] = {m: float(scores[m][k]) for m in config.metrics}
                    if i < len(crop_pairs):
                        crops[name][i] = centre_crop(outputs[k], side)
                bar.update()
            seconds[name] = time.perf_counter() - t0
    crops["HR"] = [centre_crop(p.hr, side) for p in crop_pairs]
    rows = [{"image": pair.name, "method": m, **scores_by_image[(m, i)]}
            for m in methods for i, pair in enumerate(pairs)]
    return rows, crops, seconds


def standard_notes(config: EvalConfig) -> list[str]:
    return [
        "raw metric values, no normalisation; means are over images of per-image values",
        "outputs rounded to 8 bits before scoring, as saved in images/<method>/",
        (f"every SR input starts from the same noise (candidate seed {config.seed}, drawn at batch size 1), for "
         f"every method; {config.sample_steps} Euler steps, guidance {config.guidance}"),
    ]


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def crop_side(crop_size: int, pairs: Sequence[EvalPair]) -> int:
    """One crop side for every pair (a grid needs equal tiles): `crop_size`, or less if a pair is smaller, rounded
    down to a multiple of every scale so the LR crop covers exactly the same area."""
    scales = math.lcm(*{pair_scale(p) for p in pairs})
    side = min(crop_size, *(min(p.hr.shape[:2]) for p in pairs))
    return max(side // scales * scales, scales)


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def lr_crop(pair: EvalPair, side: int) -> np.ndarray:
    """The LR pixels under the HR centre crop of `side` (a multiple of the scale), enlarged by pixel repetition: what
    the model actually sees."""
    scale = pair_scale(pair)
    h, w = pair.hr.shape[:2]
    top, left = (h - side) // 2 // scale, (w - side) // 2 // scale
    lr = pair.lr[top:top + side // scale, left:left + side // scale]
    return np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)


# ------------------------------------------------------------------------------------------------------------ report


def arrow(metric: str) -> str:
    return "↑" if iqa.REGISTRY[metric].higher_is_better else "↓"


def mean_table(means: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    """Markdown: one row per metric, one column per method, raw means."""
    methods = list(means)
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for metric in metrics:
        lines.append(f"| {metric} {arrow(metric)} | " + " | ".join(fmt(means[m][metric]) for m in methods) + " |")
    return "\n".join(lines)


def fmt(value: float) -> str:
    return f"{value:.4f}"


def write_report(out: Path, report: dict, config: EvalConfig) -> None:
    """metrics.json (everything), metrics.csv (per-image rows) and metrics.md (means, settings, per-image rows)."""
    metrics = config.metrics
    (out / "metrics.json").write_text(json.dumps(common.to_jsonable(report), indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "method", *metrics], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["rows"])
    (out / "metrics.csv").write_text(buffer.getvalue())
    per_image = ["| image | method | " + " | ".join(f"{m} {arrow(m)}" for m in metrics) + " |",
                 "|---|---|" + "---:|" * len(metrics)]
    per_image += [f"| {r['image']} | {r['method']} | " + " | ".join(fmt(r[m]) for m in metrics) + " |"
                  for r in report["rows"]]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    text = "\n\n".join([
        f"# Evaluation: {report['source']}",
        f"{report['pairs']} LR/HR pairs (HR {', '.join(report['hr_sizes'])}).",
        "Methods:\n\n" + "\n".join(f"- `{name}`: {kind}" for name, kind in report["methods"].items()),
        "Notes:\n\n" + "\n".join(f"- {note}" for note in report["notes"]),
        "## Mean per method (raw values; ↑ higher is better, ↓ lower is better)",
        mean_table(report["means"], metrics),
        "## Metric settings (ports.iqa)",
        report["metric_settings"],
        "## Per image",
        "\n".join(per_image),
        f"Runtime: {timing}.",
    ])
    (out / "metrics.md").write_text(text + "\n")


def plot_perception_distortion(path: Path, means: Mapping[str, Mapping[str, float]], nr_metric: str,
                               title: str) -> Path:
    """PSNR (x, right is better) against `nr_metric` (y, oriented so that up is better), one point per method, named
    in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = "osD^vP*Xhp<>"  # distinct shapes, so methods that land on one spot stay tellable apart
    for k, (method, row) in enumerate(means.items()):
        axes.scatter(row["psnr"], row[nr_metric], s=40, marker=markers[k % len(markers)], alpha=0.8, label=method)
    higher = iqa.REGISTRY[nr_metric].higher_is_better
    if not higher:
        axes.invert_yaxis()
    axes.set_xlabel("PSNR (dB, Y channel) → higher is better")
    axes.set_ylabel(f"{nr_metric} ({'higher' if higher else 'lower'} is better; axis "
                    f"{'normal' if higher else 'inverted'}, up is better)")
    axes.set_title(f"perception-distortion: {title}\n(better is up and to the right)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    axes.margins(0.2)
    figure.tight_layout()
    figure.savefig(path)
    return path


# -------------------------------------------------------------------------------------------------------------- main


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=PATH` flags -> {name: path}; bad forms, reserved or repeated names and missing files are errors."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        if name in (BICUBIC, FLUX2SR) or name in adapters:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is taken ({[BICUBIC, FLUX2SR, *adapters]})")
        check_method_name(name)
        if not Path(path).exists():
            raise FileNotFoundError(f"--adapter {spec!r}: {path} does not exist")
        adapters[name] = Path(path)
    return adapters


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/eval")
    p.add_argument("--sft", type=Path, help="Flux2SR weights folder (experiments.sft's weights/; tiny: the shipped one)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a profile adapter (LoRA safetensors) to evaluate as method NAME; repeatable")
    p.add_argument("--lr", type=Path, help="folder of LR test images (with --hr; default: bundled held-out photos)")
    p.add_argument("--hr", type=Path, help="folder of HR test images, matched to --lr by file name")
    p.add_argument("--scale", type=int, default=4, help="HR / LR size factor of --lr/--hr")
    p.add_argument("--lr-suffix", default="", help="suffix of LR file stems to ignore when pairing, e.g. _LR4")
    p.add_argument("--hr-suffix", default="", help="suffix of HR file stems to ignore when pairing, e.g. _HR")
    p.add_argument("--iqa-weights", type=Path, help="folder of pyiqa's weight files (pyiqa/, clip/); "
                   "default torch's hub folder")
    args, config = common.parse(p, argv, "eval")
    if args.steps is not None or args.resume:
        p.error("--steps and --resume do not apply to evaluation (sampling steps: sample_steps=N)")
    if (args.lr is None) != (args.hr is None):
        p.error("--lr and --hr go together")
    eval_config = dataclasses.replace(config.eval, seed=args.seed)

    adapter_files = parse_adapters(args.adapter)
    if args.lr is not None:
        pairs = paired_folders(args.lr, args.hr, args.scale, args.lr_suffix, args.hr_suffix)
        source = f"{args.lr} / {args.hr}"
    else:
        pairs = held_out_pairs(eval_config.held_out)
        source = (f"bundled held-out photos ({eval_config.held_out.crops} crops of {eval_config.held_out.size} px "
                  f"each)")
    scorer = make_scorer(eval_config, args.iqa_weights)
    flux2sr = common.load_flux2sr(args, config, common.resolve_sft(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluate(out, flux2sr.models, methods_for(flux2sr, adapter_files), pairs, eval_config, scorer,
             source + (" — RANDOM model" if flux2sr.random else ""))
    return out


def methods_for(flux2sr: common.Flux2SR, adapters: Mapping[str, Path]) -> dict:
    """bicubic, Flux2SR as loaded, and one method per profile adapter file (applied alone to Flux2SR's transformer)."""
    from ports import lora_io

    methods = {BICUBIC: BICUBIC, FLUX2SR: None if flux2sr.adapter is None else (flux2sr.adapter, flux2sr.lora_config)}
    for name, path in adapters.items():
        methods[name] = lora_io.import_lora(path, flux2sr.models.transformer)
    return methods


if __name__ == "__main__":
    main()
