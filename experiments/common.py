"""Plumbing every experiment shares: flags, dotted config overrides, run folders, JSONL metrics, checkpoints.

Every stage takes `--preset`, `--out DIR`, `--steps`, `--resume`, `--seed`, the model paths
(`--transformer`, `--vae`, `--prompt-embedding`) and any number of `section.field=value` overrides of its frozen
dataclass config, e.g. `python -m experiments.sft train.lr=3e-4 lora.rank=16`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def parser(description: str, default_out: str, default_steps: int | None = None) -> argparse.ArgumentParser:
    """The flags every stage shares; stages add their own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset: tiny, flux2-dev, klein-4b, klein-9b")
    p.add_argument("--out", type=Path, default=Path(default_out), help="run folder")
    p.add_argument("--steps", type=int, default=default_steps, help="optimisation steps (stage default if omitted)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transformer", type=Path, help="converted FLUX.2 transformer (python -m ports.convert)")
    p.add_argument("--vae", type=Path, help="converted FLUX.2 VAE (python -m ports.convert)")
    p.add_argument("--prompt-embedding", type=Path, help="cached prompt embedding (python -m ports.text_encoder)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    return p


def parse_value(text: str) -> Any:
    """`3e-4` -> float, `(1, 2)` -> tuple, `true` -> True, anything unparsable stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Sequence[str]):
    """Apply `a.b.c=value` strings to a tree of frozen dataclasses; unknown fields are an error listing known ones."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        dotted, raw = item.split("=", 1)
        config = _replace_path(config, dotted.split("."), raw, dotted)
    return config


def _replace_path(node, path: list[str], value, dotted: str):
    names = [f.name for f in dataclasses.fields(node)]
    if path[0] not in names:
        raise ValueError(f"unknown config field {dotted!r}: {type(node).__name__} has {names}")
    current = getattr(node, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{dotted!r}: {path[0]} is a value, not a section")
        value = _replace_path(current, path[1:], value, dotted)
    elif isinstance(current, str):  # a string field takes the text as written: `remat=none` is "none", not None
        pass
    else:
        value = parse_value(value)
        if isinstance(current, tuple) and isinstance(value, str):  # `(psnr, ssim)` without quotes
            value = tuple(parse_value(v.strip()) for v in value.strip("()[]").split(",") if v.strip())
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
    return dataclasses.replace(node, **{path[0]: value})


def to_jsonable(obj):
    """Dataclasses, paths, numpy and JAX scalars -> plain JSON types."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy and JAX arrays and scalars
        return np.asarray(obj).tolist()
    return obj


class Metrics:
    """Append-only JSON lines, one record per call, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the restored step so the log reads as one uninterrupted run."""
        kept = [r for r in self.read() if r.get("step", -1) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def prepare_out(out: Path, resume: bool, config) -> Path:
    """Create the run folder and record the config; refuse to silently overwrite another run's checkpoints."""
    out = Path(out)
    checkpoints = out / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()) and not resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_jsonable(config), indent=2))
    return out


def load_models(args, tiny_weights: Path | None = None, announce=print):
    """Backbone, VAE and prompt embedding for a stage: from the converted files given on the command line, else the
    preset's own weights (`tiny_weights`, the tiny preset's trained folder), else — tiny preset only — a random
    initialisation that is announced as such. Real presets without files raise, naming the flag to pass.
    """
    import jax
    import jax.numpy as jnp

    from foa_jax import sr
    from foa_jax.models import flux2, vae
    from ports import convert, text_encoder

    def pick(flag: str, path: Path | None, stored: Path | None, load, random_init):
        source = _source(path, stored)
        if source is not None:
            return load(source)
        if args.preset != "tiny":
            raise FileNotFoundError(f"--{flag} is required for preset {args.preset!r}: convert the FLUX.2 weights with "
                                    f"`python -m ports.convert` and pass the output folder")
        announce(f"[{flag}] no weights given or found at {stored}: using a RANDOM tiny initialisation")
        return random_init()

    t_params, t_config = pick(
        "transformer", args.transformer, tiny_weights and tiny_weights / "transformer", convert.load_transformer,
        lambda: (jax.jit(flux2.init, static_argnums=0)(flux2.preset(args.preset), jax.random.key(args.seed)),
                 flux2.preset(args.preset)))
    v_params, v_config = pick(
        "vae", args.vae, tiny_weights and tiny_weights / "vae", convert.load_vae,
        lambda: (vae.init(vae.VAEConfig.preset("tiny"), jax.random.key(args.seed + 1)), vae.VAEConfig.preset("tiny")))
    if v_config.token_channels != t_config.in_channels:
        raise ValueError(f"the VAE makes {v_config.token_channels}-channel tokens but the transformer takes "
                         f"{t_config.in_channels}")

    def load_prompt(path):
        embedding, _ = text_encoder.load_prompt_embedding(path, channels=t_config.joint_attention_dim)
        return jnp.asarray(embedding[:1], jnp.float32)

    prompt = pick("prompt-embedding", args.prompt_embedding,
                  tiny_weights and tiny_weights / "prompt_embedding.safetensors", load_prompt,
                  lambda: tiny_prompt(t_config, args.seed))
    return sr.Models(t_params, v_params, prompt, t_config, v_config)


def _source(path: Path | None, stored: Path | None) -> Path | None:
    """The file a model part is read from: the flag's path, else the stage's stored one if it exists, else None."""
    if path is not None:
        return Path(path)
    return stored if stored is not None and stored.exists() else None


def model_sources(args, weights: Path | None) -> list[Path] | None:
    """Every file or folder `load_flux2sr(args, weights)` reads, or None when some part is a random initialisation."""
    weights = None if weights is None else Path(weights)
    parts = [(args.transformer, "transformer"), (args.vae, "vae"),
             (args.prompt_embedding, "prompt_embedding.safetensors")]
    sources = [_source(path, weights and weights / name) for path, name in parts]
    if any(source is None for source in sources):
        return None
    adapter = weights and weights / "lora.safetensors"
    return sources + ([adapter] if adapter is not None and adapter.exists() else [])


def cached_fingerprint(sources: Sequence[Path] | None, compute) -> str:
    """`compute()` (a content hash of loaded weights), remembered per state of the `sources` files.

    Hashing FLUX.2-dev's 64 GB takes minutes and mining, every DPO profile and the pipeline's pair check each need the
    hash of the same checkpoint. The key is every file's absolute path, size and modification time (`st_mtime_ns`), so
    rewriting a file recomputes it; the value lives in `$FOA_FINGERPRINT_CACHE` (default
    `~/.cache/foa-jax/fingerprints`). Without sources (random tiny initialisations) it is computed every time.
    """
    if not sources:
        return compute()
    signature = hashlib.sha256()
    for source in sources:
        source = Path(source).resolve()
        for file in sorted([source] if source.is_file() else [f for f in source.rglob("*") if f.is_file()]):
            stat = file.stat()
            signature.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    folder = Path(os.environ.get("FOA_FINGERPRINT_CACHE", Path.home() / ".cache" / "foa-jax" / "fingerprints"))
    record = folder / f"{signature.hexdigest()}.txt"
    if record.exists():
        return record.read_text().strip()
    value = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.replace(record)
    return value


def load_flux2sr(args, weights: Path | None, announce=print):
    """(models, adapter, lora_config) of a trained Flux2SR: a stage's `weights/` folder as `experiments.sft` writes it
    (`transformer/` for a full-weight run or `lora.safetensors` for a LoRA run, `vae/`, `prompt_embedding.safetensors`)
    on top of the model flags. `adapter` is None when the transformer itself was trained (the tiny preset).
    """
    from ports import lora_io

    models = load_models(args, weights, announce)
    adapter_file = None if weights is None else Path(weights) / "lora.safetensors"
    if adapter_file is None or not adapter_file.exists():
        return models, None, None
    adapter, lora_config = lora_io.import_lora(adapter_file, models.transformer)
    return models, adapter, lora_config


def tiny_prompt(config, seed: int):
    """The tiny preset has no text encoder: its one prompt is a fixed 4-token random embedding (seeded)."""
    import jax

    return jax.random.normal(jax.random.key(10_000 + seed), (1, 4, config.joint_attention_dim))


def save_grid(path: Path, rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None) -> Path:
    """Save equally sized [0, 1] float (or uint8) HWC images as a PNG grid, rows by columns."""
    from PIL import Image, ImageDraw

    def as_uint8(img):
        img = np.asarray(img)
        return img if img.dtype == np.uint8 else np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

    tiles = [[as_uint8(img) for img in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    pad = 2
    label_h = 14 if labels else 0
    cols = max(len(r) for r in tiles)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(tiles) * (h + pad) + pad + label_h), (255, 255, 255))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (pad + c * (w + pad), label_h + pad + r * (h + pad)))
    if labels:
        draw = ImageDraw.Draw(canvas)
        for c, text in enumerate(labels):
            draw.text((pad + c * (w + pad), 1), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


class Checkpoints:
    """Orbax checkpoints of a state pytree: save every N steps and at the end, keep the newest few, resume the newest.

    A checkpoint that does not match the state of this run (another preset, LoRA rank, optimizer) is refused with
    the differing arrays named, before anything is restored.
    """

    def __init__(self, directory: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                                             item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore_latest(self, template):
        """(state, step) from the newest checkpoint, shaped like `template`; no checkpoint is an error."""
        import jax

        from foa_jax import params as P

        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.directory}")
        stored = self.manager.item_metadata(step)
        flat_stored = {k: tuple(v.shape) for k, v in P.flatten(_as_dict(stored)).items() if v is not None}
        flat_expected = {k: tuple(np.shape(v)) for k, v in P.flatten(_as_dict(template)).items()}
        if flat_stored != flat_expected:
            diff = sorted(set(flat_stored.items()) ^ set(flat_expected.items()))
            raise ValueError(f"checkpoint {self.directory / str(step)} does not match this run's state "
                             f"(other preset, LoRA rank or optimizer?); differing entries: {diff[:20]}")
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract)), int(step)


# How many blocks of a step's temporaries `reserve_step_heap` reserves: the LoRA step's heap settled at three.
HEAP_RESERVE_TEMPS = 3


def reserve_step_heap(compiled) -> int:
    """Reserve `HEAP_RESERVE_TEMPS` times a compiled step's temporaries in the host heap (`host.reserve_heap`), so
    its calls stop page-faulting when the heap fragments; only on the CPU backend (elsewhere the temporaries live on
    the device) with the tuned allocator. Returns the bytes reserved."""
    import jax

    import experiments
    from experiments import host

    memory = compiled.memory_analysis()
    if jax.default_backend() != "cpu" or not experiments.ALLOCATOR_TUNED or memory is None:
        return 0
    return host.reserve_heap(HEAP_RESERVE_TEMPS * memory.temp_size_in_bytes)


def train_loop(step_fn, state, frozen, batch_for, steps: int, checkpoints: Checkpoints, metrics: Metrics,
               checkpoint_every: int, desc: str, shown=("loss",)):
    """Run `state, metrics = step_fn(state, frozen, batch_for(step))` from the state's step to `steps`, logging every
    step (all metrics + step time) and checkpointing every `checkpoint_every` steps and at the end. Returns the state.
    """
    from tqdm import tqdm

    start = int(state["step"])
    if start < steps:  # compiles the step (jit keeps it for the calls below)
        reserve_step_heap(step_fn.lower(state, frozen, batch_for(start)).compile())
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps)
    for step in bar:
        t0 = time.perf_counter()
        state, m = step_fn(state, frozen, batch_for(step))
        m = {k: float(v) for k, v in m.items()}
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"{desc}: loss is {m['loss']} at step {step}; the last good checkpoint is "
                                     f"step {checkpoints.latest_step()} in {checkpoints.directory}")
        metrics.write(step=step, step_time=time.perf_counter() - t0, **m)
        bar.set_postfix({k: f"{m[k]:.4f}" for k in shown})
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoints.save(step + 1, state)
    return state


def _as_dict(tree):
    """Orbax metadata trees and states -> nested plain dicts (sequences keyed by position)."""
    if hasattr(tree, "_asdict"):  # optimizer states are namedtuples; orbax metadata keys them by field name
        tree = tree._asdict()
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {str(k): _as_dict(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        return {str(i): _as_dict(v) for i, v in enumerate(tree)}
    return tree
