"""Plumbing every experiment shares: flags, dotted config overrides, run folders, JSONL metrics, checkpoints.

Every stage takes `--preset`, `--out DIR`, `--steps`, `--resume`, `--seed`, the model paths
(`--transformer`, `--vae`, `--prompt-embedding`) and any number of `section.field=value` overrides of its frozen
dataclass config, e.g. `python -m experiments.sft optim.lr=3e-4 lora.rank=16` (docs: README "Configuration").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import configs


def parser(description: str, default_out: str | None) -> argparse.ArgumentParser:
    """The flags every stage shares; stages add their own. `section.field=value` overrides go anywhere (`parse`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Config overrides: field.path=value anywhere on the line, e.g. optim.lr=3e-4 "
                                       "(the fields are the stage's slice of experiments/configs/<preset>.py).")
    p.add_argument("--preset", default="tiny", choices=sorted(configs.PRESETS), help="model preset")
    p.add_argument("--out", type=Path, default=Path(default_out) if default_out else None, help="run folder")
    p.add_argument("--steps", type=int, help="optimisation steps (the preset's if omitted)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transformer", type=Path, help="converted FLUX.2 transformer (python -m ports.convert)")
    p.add_argument("--vae", type=Path, help="VAE: a converted FLUX.2 VAE (python -m ports.convert) or a weights folder")
    p.add_argument("--prompt-embedding", type=Path, help="cached prompt embedding (python -m ports.text_encoder)")
    p.add_argument("--random-init", action="store_true",
                   help="tiny preset: use randomly initialised models where no weights are given (every report then "
                        "says RANDOM)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, section: str | None):
    """`(args, config)`: the flags, and the preset's config with the overrides applied to its `section` slice (the
    whole tree when None) and `--steps` set where the slice has steps. Every override is checked, for its field and
    its type, before the stage does anything; so is `--steps`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="tiny")
    preset = preset_parser.parse_known_args(argv)[0].preset
    if preset not in configs.PRESETS:
        p.error(f"--preset {preset!r}: valid presets are {sorted(configs.PRESETS)}")
    config = configs.get(preset)
    target = config if section is None else getattr(config, section)
    rest, overrides = configs.split_overrides(argv, target) if target is not None else (argv, [])
    args, unknown = p.parse_known_args(rest)
    for word in unknown:
        if "=" in word and not word.startswith("-"):
            key = word.split("=", 1)[0]
            fields = [f.name for f in dataclasses.fields(target)] if target is not None else []
            p.error(f"unknown config field {key!r}: valid fields are {fields}")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive number of steps, got {args.steps}")
    try:
        target = configs.override(target, overrides) if overrides else target
        if args.steps is not None:
            if target is None or "steps" not in {f.name for f in dataclasses.fields(target)}:
                p.error(f"--steps does not apply here ({section or 'the pipeline'} has no steps setting"
                        + ("; name the stage, e.g. sft.steps=N" if section is None else "") + ")")
            target = dataclasses.replace(target, steps=args.steps)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    return args, (target if section is None else dataclasses.replace(config, **{section: target}))


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


# The tiny preset's Flux2SR (with its VAE and prompt embedding), trained once by the project's own commands and shipped
# as a weights folder; its manifest names the commands, the commit and the data.
SHIPPED_TINY = Path(__file__).resolve().parent / "assets" / "tiny"


@dataclass(frozen=True)
class Flux2SR:
    """A loaded Flux2SR: the models (transformer = the base, or the whole tiny model), its adapter (None when the
    transformer itself was trained), where it came from, and its identity for the files made with it."""

    models: Any
    adapter: dict | None
    lora_config: Any
    source: str
    fingerprint: str
    random: bool = False

    @property
    def lora_scale(self) -> float:
        return self.lora_config.scale if self.lora_config is not None else 1.0


def photo_folders(folders: Sequence[Path]):
    """`--hr` folders as a photo source; unreadable files are reported by name and left out."""
    from foa_jax.data.dataset import FolderPhotos

    return FolderPhotos(folders)


def _load_vae(path: Path):
    """(params, config) from a weights folder (checked against its manifest) or a converted / diffusers VAE."""
    from ports import convert, weights

    path = Path(path)
    if (path / weights.MANIFEST).is_file():
        loaded = weights.load(path)
        return loaded.vae, loaded.vae_config
    return convert.load_vae(path)


def tiny_prompt(config, seed: int = 0):
    """The tiny preset has no text encoder: its one prompt is a fixed 4-token random embedding (seeded)."""
    import jax

    return jax.random.normal(jax.random.key(10_000 + seed), (1, 4, config.joint_attention_dim))


def prompt_meta(args, prompt) -> dict:
    """What a weights folder records of its prompt embedding: the `--prompt-embedding` file's own metadata, or what
    the tiny preset's fixed embedding is."""
    from ports import text_encoder

    if args.prompt_embedding is not None:
        _, meta = text_encoder.load_prompt_embedding(args.prompt_embedding)
        return {key: meta[key] for key in text_encoder.CALLER_META_KEYS}
    return {"prompts": [""], "max_length": int(prompt.shape[1]), "layers": [0], "encoder_config_sha256": "",
            "encoder": "none: the tiny preset's fixed N(0, 1) embedding (common.tiny_prompt, seed 10000)"}


def vae_provenance(args, config) -> dict | None:
    """The provenance of the VAE `load_models` takes, when it comes from a weights folder (what the VAE stage and the
    shipped weights are), for the Flux2SR folder built on it to record."""
    from ports import weights

    path = args.vae if args.vae is not None else (_default_vae(config) if config.preset == "tiny" else None)
    if path is None or not (Path(path) / weights.MANIFEST).is_file():
        return None
    provenance = weights.read_manifest(path)["provenance"]
    return provenance.get("vae", provenance)


def _default_vae(config) -> Path:
    stage_output = Path("runs/foa/vae/weights")
    return stage_output if (stage_output / "manifest.json").is_file() else SHIPPED_TINY


def _check_tokens(t_config, v_config) -> None:
    if v_config.token_channels != t_config.in_channels:
        raise ValueError(f"the VAE makes {v_config.token_channels}-channel tokens but the transformer takes "
                         f"{t_config.in_channels}")


def load_models(args, config, for_training: bool = False, announce=print):
    """The models Flux2SR training starts from: `--transformer`, `--vae`, `--prompt-embedding`.

    The tiny preset has nothing pretrained: with `for_training` its transformer starts from a random initialisation
    (what training from scratch means) and its prompt is `tiny_prompt`; its VAE is `--vae`, else the VAE stage's
    `runs/foa/vae/weights`, else the shipped one, announced. A real preset without a file is an error naming the flag.
    """
    import jax

    from foa_jax import sr
    from foa_jax.models import flux2
    from ports import convert, text_encoder

    tiny = config.preset == "tiny"
    if args.transformer is not None:
        t_params, t_config = convert.load_transformer(args.transformer)
    elif tiny and (for_training or args.random_init):
        t_config = flux2.preset(config.transformer)
        announce(f"[transformer] a random {config.transformer} initialisation (seed {args.seed})"
                 + ("" if for_training else ": RANDOM, asked for by --random-init"))
        t_params = jax.jit(flux2.init, static_argnums=0)(t_config, jax.random.key(args.seed))
    else:
        raise FileNotFoundError(f"--transformer is required for preset {config.preset!r}: convert the FLUX.2 weights "
                                f"with `python -m ports.convert` and pass the output folder")
    vae_path = args.vae
    if vae_path is None and tiny:
        vae_path = _default_vae(config)
        announce(f"[vae] {vae_path} ({'shipped' if vae_path == SHIPPED_TINY else 'the VAE stage output'}; "
                 f"--vae picks another)")
    if vae_path is None:
        raise FileNotFoundError(f"--vae is required for preset {config.preset!r}: convert the FLUX.2 VAE with "
                                f"`python -m ports.convert` and pass the output folder")
    v_params, v_config = _load_vae(vae_path)
    _check_tokens(t_config, v_config)
    if args.prompt_embedding is not None:
        embedding, _ = text_encoder.load_prompt_embedding(args.prompt_embedding, channels=t_config.joint_attention_dim)
        prompt = jax.numpy.asarray(embedding[:1], jax.numpy.float32)
    elif tiny:
        prompt = tiny_prompt(t_config)
    else:
        raise FileNotFoundError(f"--prompt-embedding is required for preset {config.preset!r}: make one with "
                                f"`python -m ports.text_encoder`")
    return sr.Models(t_params, v_params, prompt, t_config, v_config)


def resolve_sft(args, announce=print) -> Path | None:
    """The Flux2SR weights folder a stage uses: `--sft`; none with `--random-init` (a random model is asked for);
    else (tiny) the shipped one, announced."""
    flag, random_init = getattr(args, "sft", None), getattr(args, "random_init", False)
    if flag is not None:
        if random_init:
            raise ValueError("--sft and --random-init exclude each other: pass one")
        return Path(flag)
    if random_init:
        return None
    if args.preset == "tiny" and (SHIPPED_TINY / "manifest.json").is_file():
        announce(f"[sft] the shipped tiny Flux2SR {SHIPPED_TINY} (--sft picks another, e.g. runs/foa/sft/weights; "
                 f"`python -m experiments.dpo --retrain` rebuilds it)")
        return SHIPPED_TINY
    return None


def load_flux2sr(args, config, folder: Path | None, announce=print) -> Flux2SR:
    """A trained Flux2SR from its weights folder (hashes checked first): a full-weight model (the tiny preset), or
    a LoRA on `--transformer`'s base. Without a folder: an error naming `--sft`, or with `--random-init` (tiny
    preset) a random model whose `random` flag every report shows."""
    import jax

    from foa_jax import sr
    from foa_jax.data import cache as cache_lib
    from foa_jax.models import flux2, vae
    from ports import convert, weights

    if folder is None:
        if not (config.preset == "tiny" and getattr(args, "random_init", False)):
            raise FileNotFoundError(f"--sft: no Flux2SR weights folder given for preset {config.preset!r} (train one "
                                    f"with `python -m experiments.sft`, or pass --random-init for a random tiny model)")
        t_config, v_config = flux2.preset(config.transformer), vae.VAEConfig.preset(config.vae_model)
        models = sr.Models(jax.jit(flux2.init, static_argnums=0)(t_config, jax.random.key(args.seed)),
                           vae.init(v_config, jax.random.key(args.seed + 1)), tiny_prompt(t_config, args.seed),
                           t_config, v_config)
        announce(f"[sft] RANDOM tiny Flux2SR (seed {args.seed}), asked for by --random-init")
        tree = {"transformer": models.transformer, "vae": models.vae, "prompt": models.prompt}
        return Flux2SR(models, None, None, f"RANDOM tiny initialisation (seed {args.seed})",
                       cache_lib.fingerprint(tree), random=True)
    folder = Path(folder)
    fingerprint = weights.fingerprint(folder)
    manifest = weights.read_manifest(folder)
    if weights.LORA in manifest["files"]:
        if args.transformer is None:
            raise FileNotFoundError(f"{folder} holds a LoRA: pass the base it adapts with --transformer")
        base, t_config = convert.load_transformer(args.transformer)
        loaded = weights.load(folder, lora_base=base)
        fingerprint = cached_fingerprint([Path(args.transformer)], lambda: cache_lib.fingerprint(base)) + fingerprint
    else:
        loaded = weights.load(folder)
        if loaded.transformer is None:
            raise ValueError(f"{folder} is a VAE-only weights folder, not a Flux2SR (pass experiments.sft's weights/)")
        base, t_config = loaded.transformer, loaded.transformer_config
    if loaded.prompt is None:
        raise ValueError(f"{folder} holds no prompt embedding")
    _check_tokens(t_config, loaded.vae_config)
    models = sr.Models(base, loaded.vae, jax.numpy.asarray(loaded.prompt[:1]), t_config, loaded.vae_config)
    return Flux2SR(models, loaded.lora, loaded.lora_config, str(folder), fingerprint)


def cached_fingerprint(sources: Sequence[Path], compute) -> str:
    """`compute()` (a content hash of loaded weights), remembered per state of the `sources` files.

    Hashing FLUX.2-dev's 64 GB takes minutes and mining, every DPO profile and the pipeline's pair check each need the
    hash of the same base. The key is every file's absolute path, size and modification time (`st_mtime_ns`), so
    rewriting a file recomputes it; the value lives in `$FOA_FINGERPRINT_CACHE` (default
    `~/.cache/foa-jax/fingerprints`).
    """
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
    tmp = record.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(value)
    tmp.replace(record)
    return value


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


def resume_or_start(out: Path, state, resume: bool, report=print):
    """`(state, checkpoints, metrics)` of a training run in `out`: the newest checkpoint's state on `resume` (else
    `state`), and the metrics log cut back to the restored step, so a resumed log reads as one run."""
    checkpoints = Checkpoints(Path(out) / "checkpoints")
    if resume and checkpoints.latest_step() is not None:
        state, start = checkpoints.restore_latest(state)
        report(f"resumed from step {start}")
    metrics = Metrics(Path(out) / "metrics.jsonl")
    metrics.truncate_after(int(state["step"]) - 1)
    return state, checkpoints, metrics


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
