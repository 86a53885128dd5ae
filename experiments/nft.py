"""LucidNFT on Flux2SR: decoupled multi-reward advantages and the DiffusionNFT objective on unpaired LR inputs.

    python -m experiments.nft [--sft WEIGHTS] [--lr DIR] [--consistency-head FILE] [--advantages decoupled|scalarised]
                              [--iqa-weights DIR] [--out runs/nft] [--resume] [--steps N] [section.field=value ...]
    python -m experiments.nft --advantages scalarised --out runs/nft-scalarised
    python -m experiments.nft --out runs/nft --compare runs/nft-scalarised     # both schemes in one evaluation
    python -m experiments.nft --random-init --random-head ...   # random tiny Flux2SR and head: a plumbing check

The inputs are LR images only (`--lr DIR`; by default degraded crops of the bundled training photos, whose HR is
never used): the method learns from real low-quality data without references. Each iteration draws `groups` LRs
(a pure function of seed and iteration) and K = `group_size` rollouts of each from the old policy, each from its
own seeded noise. Every rollout is scored with the rewards: "consistency" is LucidConsistency(LR, SR), the cosine of
the trained head's projections of the upsampled LR and the SR (`--consistency-head`, the file
`python -m experiments.consistency` writes), and every other name a no-reference metric of the scorer (NIQE, PIQE
offline; lower-is-better metrics are negated). Advantages are the decoupled ones (each reward z-scored in its group,
then weighted) or the scalarised DiffusionNFT baseline (`--advantages`); the reward weights r then drive the
DiffusionNFT loss on the rollouts' clean latents, one optimiser step per timestep of the sampler's own grid
(shuffled per rollout), with the policy a LoRA on Flux2SR and the reference Flux2SR itself, frozen. After the
iteration the old policy moves toward the policy by the EMA of its decay schedule.

Files in `--out`:
    metrics.jsonl      per iteration ("split": "train"): the raw mean of every reward, the loss terms, both schemes'
                       separability, the reward table (groups, K, rewards); and held-out reward points ("held_out")
    rewards.png        every reward over training, train and held-out inputs
    report.md          separability of both schemes on the same rollouts, the reward curves' ends, the held-out
                       evaluation of Flux2SR against the trained policy and every `--compare` run's (rewards, PSNR,
                       LPIPS, paired deltas to Flux2SR)
    weights/lora.safetensors, checkpoints/, config.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.configs.schema import CONSISTENCY_REWARD, NFTStageConfig
from foa_jax import consistency as C
from foa_jax import lora as lora_lib
from foa_jax import nft as nft_lib
from foa_jax import rewards as rewards_lib
from foa_jax import sampling, sr, train
from ports import iqa, lora_io, photos

ADAPTER = Path("weights") / "lora.safetensors"
HEAD_KIND = "foa-jax consistency head v1"  # the file kind experiments.consistency writes
DEFAULT_HEAD = Path("runs/consistency/head.safetensors")
MAIN_JOB_SFT = Path("runs/foa/sft/weights")  # where the main job's SFT stage writes Flux2SR
SEED_TAG = 0x4E4654  # "NFT": keeps rollout seeds apart from every other use of SeedSequence([seed, ...])
EVAL_SEED = 0  # the noise of every held-out SR output (candidate 0), the same for Flux2SR and the policy
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------------------------
# Rewards


def load_head(path: Path) -> tuple[C.Params, dict]:
    """(head params, backbone description) from a `experiments.consistency` head file; a missing file names the
    flag and the command that trains one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--consistency-head: {path} does not exist; train the head with "
                                f"`python -m experiments.consistency --out {path.parent}` (or pass --random-head for "
                                f"an untrained one, a plumbing check only)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open, not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"--consistency-head: {path} is corrupt or not a safetensors file: {err}") from err
    if metadata.get("kind") != HEAD_KIND or "backbone" not in metadata:
        raise ValueError(f"--consistency-head: {path} is not a consistency head (kind {metadata.get('kind')!r}, "
                         f"expected {HEAD_KIND!r})")
    params, backbone = C.from_state_dict(tensors), json.loads(metadata["backbone"])
    if C.head_dim(params) != backbone.get("dim", C.head_dim(params)):
        raise ValueError(f"{path}: head width {C.head_dim(params)} but its backbone has dim {backbone['dim']}")
    return params, backbone


def load_backbone(description: dict) -> C.Backbone:
    """The frozen embedder a head file names (VGG16 of LPIPS, or Qwen3-VL-Embedding from its folder)."""
    if description["name"] == "vgg16-lpips":
        from ports.lpips_weights import load_lpips_params

        return C.VGGBackbone(load_lpips_params("vgg"), pooling=description.get("pooling", "stages"),
                             batch=description.get("batch", 8))
    if description["name"] == "qwen3-vl-embedding":
        from ports.qwen_embedding import QwenBackbone

        return QwenBackbone(description["folder"])
    raise ValueError(f"unknown consistency backbone {description['name']!r}: expected vgg16-lpips or "
                     f"qwen3-vl-embedding")


class Rewards:
    """Every reward of one config for (LR, SR) pairs: raw values `(B, M)` and direction-aligned ones (higher better).

    The consistency head and backbone are loaded only when "consistency" is a reward; the scorer only when a metric is.
    """

    def __init__(self, names, head: C.Params | None = None, backbone: C.Backbone | None = None,
                 iqa_weights: Path | None = None, source: str = ""):
        self.names = tuple(names)
        metrics = [n for n in self.names if n != CONSISTENCY_REWARD]
        if CONSISTENCY_REWARD in self.names and (head is None or backbone is None):
            raise ValueError("the consistency reward needs a head and its backbone")
        self.head, self.backbone, self.source = head, backbone, source
        self.scorer = iqa.Scorer(metrics, weights_dir=iqa_weights) if metrics else None
        self.signs = np.array([1.0 if n == CONSISTENCY_REWARD or rewards_lib.metric_spec(n).higher_is_better else -1.0
                               for n in self.names])

    def raw(self, lrs: np.ndarray, srs: np.ndarray) -> np.ndarray:
        """(B, M) raw values for uint8 LRs (B, h, w, 3) and [0, 1] SR outputs (B, H, W, 3)."""
        columns = {}
        if CONSISTENCY_REWARD in self.names:
            upsampled = sr.upsample_lr(lrs, srs.shape[1:3])
            lr_emb = jnp.asarray(self.backbone(upsampled))
            sr_emb = jnp.asarray(self.backbone(srs))
            columns[CONSISTENCY_REWARD] = np.asarray(C.score(self.head, lr_emb, sr_emb), np.float64)
        if self.scorer is not None:
            columns.update(self.scorer.score(srs))
        return np.stack([columns[n] for n in self.names], axis=-1)

    def aligned(self, raw: np.ndarray) -> np.ndarray:
        return raw * self.signs


def build_rewards(config: NFTStageConfig, head_path: Path | None, random_head: bool, iqa_weights: Path | None,
                  seed: int, announce=print) -> Rewards:
    """The rewards of `config`: the trained head (default `runs/consistency/head.safetensors`), or with
    `random_head` a seeded untrained one on the VGG backbone, announced as RANDOM."""
    head = backbone = None
    source = ""
    if CONSISTENCY_REWARD in config.rewards:
        if random_head:
            if head_path is not None:
                raise ValueError("--consistency-head and --random-head exclude each other: pass one")
            backbone = load_backbone({"name": "vgg16-lpips", "pooling": "stages"})
            head = C.init_head(jax.random.key(seed + 3), backbone.dim)
            source = f"RANDOM untrained head (seed {seed + 3}) on vgg16-lpips, asked for by --random-head"
        else:
            path = Path(head_path or DEFAULT_HEAD)
            head, description = load_head(path)
            backbone = load_backbone(description)
            source = f"{path} ({description['name']})"
        announce(f"[consistency] {source}")
    return Rewards(config.rewards, head, backbone, iqa_weights, source)


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def check_lr_side(side: int, scale: int, token_factor: int, what: str) -> None:
    """An LR whose upsampled side cannot hold one token of the model is refused, naming the sizes."""
    if side * scale < token_factor:
        raise ValueError(f"{what}: an LR side of {side} px gives {side * scale} px at x{scale}, smaller than the "
                         f"model's token factor {token_factor} px; LR images need sides >= "
                         f"{-(-token_factor // scale)} px")


def folder_lrs(folder: Path, scale: int, token_factor: int, max_hr: int) -> np.ndarray:
    """uint8 LR images (P, s, s, 3) from a folder, each centre-cropped to the largest side every image allows whose
    upsampled size tiles into whole tokens (and is at most `max_hr`): one program then serves every rollout."""
    import math

    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--lr: {folder} is not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--lr: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        image = np.asarray(Image.open(file).convert("RGB"))
        check_lr_side(min(image.shape[:2]), scale, token_factor, f"--lr {file}")
        images.append(image)
    step = math.lcm(scale, token_factor)
    hr = min(min(min(i.shape[:2]) * scale for i in images) // step * step, max(max_hr // step * step, step))
    if hr < step:
        raise ValueError(f"--lr: the smallest image in {folder} gives {hr} px at x{scale}; sides must reach {step} px")
    side = hr // scale
    crops = []
    for image in images:
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        crops.append(image[top:top + side, left:left + side])
    return np.stack(crops)


def photo_lrs(config: NFTStageConfig) -> np.ndarray:
    """uint8 LR crops (inputs, s, s, 3) of the bundled training photos, degraded; their HR crops are dropped here."""
    from foa_jax.data.dataset import Dataset

    train_photos, _ = photos.split(min_side=config.data.gt_size)
    dataset = Dataset(config.data, train_photos, report=lambda _: None)
    return np.stack([dataset.pair(i)[0] for i in range(config.inputs)])


def held_out(config: NFTStageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) uint8 of the first `eval_inputs` bundled held-out crops: the HR only scores the final evaluation."""
    pairs = photos.held_out_pairs(config.held_out.size, config.held_out.crops, config.held_out.seed)
    pairs = pairs[:config.eval_inputs]
    return np.stack([p.lr for p in pairs]), np.stack([p.hr for p in pairs])


def rollout_seed(run_seed: int, iteration: int, group: int, k: int) -> int:
    """The noise seed of rollout k of group `group` in iteration `iteration` (31 bits)."""
    return int(np.random.SeedSequence([run_seed, SEED_TAG, iteration, group, k]).generate_state(1)[0] >> 1)


def iteration_inputs(seed: int, iteration: int, count: int, groups: int) -> np.ndarray:
    return train.batch_indices(seed, iteration, count, groups)


# --------------------------------------------------------------------------------------------------------------------
# Rollouts and the loss


def rollouts(models: sr.Models, old, lora_scale: float, lrs: np.ndarray, seeds: np.ndarray,
             config: NFTStageConfig) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """(cond, clean latents, SR images in [0, 1] rounded to 8 bits) of K rollouts per LR, group-major (G·K, ...).

    Each LR is encoded once per rollout: the encoder then runs at the sampler's batch, the shape a held-out batch of
    G·K inputs also has, so one compiled program serves both (encoding is a small part of a rollout).
    """
    k = seeds.shape[1]
    size = (lrs.shape[1] * config.data.scale, lrs.shape[2] * config.data.scale)
    grid = sr.token_grid(models, *size)
    cond = sr.condition(models, np.repeat(sr.upsample_lr(lrs, size), k, axis=0))
    noise = jnp.concatenate([sr.candidate_noise(int(s), (1, *cond.shape[1:])) for s in seeds.ravel()])
    latents = sr.generate(models, cond, noise, config.sample_steps, grid, config.guidance, _placed(old), lora_scale)
    images = np.round(np.asarray(sr.decode(models, latents, *size)) * 255.0) / 255.0
    return cond, latents, images.astype(np.float32)


def _placed(tree):
    """`tree` committed to the first device, as the train step's outputs are: the sampler's compiled program is keyed
    on its arguments' placement, so the policy, the old policy and a fresh adapter then share one."""
    return None if tree is None else jax.device_put(tree, jax.devices()[0])


def nft_step_loss(config: nft_lib.NFTConfig, guidance: float, grid: tuple[int, int], lora_scale: float):
    """The DiffusionNFT objective as `train.make_step`'s loss: frozen = {"models", "reference" (None: the base),
    "old"}; batch = {"x0", "cond", "t", "noise", "r"} of one training timestep per rollout."""

    def loss(policy, frozen, batch, key, step):
        def predict(adapter, z_t, cond, t):
            adapter = frozen["reference"] if adapter is None else adapter
            return sr.velocity(frozen["models"], z_t, cond, t, grid, guidance, adapter, lora_scale)

        return nft_lib.nft_objective(predict, policy, frozen["old"], batch["x0"], batch["cond"], batch["t"],
                                     batch["noise"], batch["r"], config)

    return loss


@functools.lru_cache(maxsize=8)
def nft_step(config: nft_lib.NFTConfig, guidance: float, grid: tuple[int, int], lora_scale: float,
             optim: train.OptimConfig):
    """The jitted train step, one per setting in a process: a resumed or repeated run in the same process (the
    tests, a notebook) then reuses its compiled program."""
    return train.make_step(nft_step_loss(config, guidance, grid, lora_scale), optim)


# --------------------------------------------------------------------------------------------------------------------
# The run


def _means(names, raw: np.ndarray) -> dict:
    return {name: float(np.mean(raw[..., m])) for m, name in enumerate(names)}


def held_out_rewards(models, adapter, lora_scale, lrs, rewards: Rewards,
                     config: NFTStageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(SR images, raw rewards) of the held-out LRs under `adapter`, every one from the evaluation noise."""
    size = (lrs.shape[1] * config.data.scale, lrs.shape[2] * config.data.scale)
    images = sr.super_resolve(models, lrs, size, EVAL_SEED, config.sample_steps, config.guidance, _placed(adapter),
                              lora_scale)
    return images, rewards.raw(lrs, images)


def _jsonable_separability(stats: dict) -> dict:
    return jax.tree.map(float, stats)


def run(config: NFTStageConfig, flux2sr: common.Flux2SR, lrs: np.ndarray, rewards: Rewards, out: Path,
        seed: int = 0, resume: bool = False, held: tuple[np.ndarray, np.ndarray] | None = None, preset: str = "tiny",
        compare=(), report=print) -> Path:
    """Train a LucidNFT policy on uint8 LR inputs `lrs` (P, s, s, 3); returns `out/weights/lora.safetensors`.

    `held`: held-out (LR, HR) for the reward curves and the final evaluation (default: the bundled held-out crops);
    `compare`: other run folders whose adapters the evaluation scores beside this one (the other scheme's run).
    Every input check runs before the first rollout.
    """
    config = dataclasses.replace(config)  # re-validates a config built by hand
    if lrs.ndim != 4 or lrs.shape[-1] != 3 or lrs.dtype != np.uint8 or len(lrs) == 0:
        raise ValueError(f"LR inputs must be a non-empty uint8 (P, h, w, 3) array, got {lrs.dtype} {lrs.shape}")
    factor, scale = flux2sr.models.vae_config.token_factor, config.data.scale
    check_lr_side(min(lrs.shape[1:3]), scale, factor, "LR inputs")
    size = (lrs.shape[1] * scale, lrs.shape[2] * scale)
    grid = sr.token_grid(flux2sr.models, *size)
    if tuple(rewards.names) != config.rewards:
        raise ValueError(f"the rewards {rewards.names} were built for another config than {config.rewards}")
    held = held if held is not None else held_out(config)
    check_lr_side(min(held[0].shape[1:3]), scale, factor, "held-out LR inputs")
    weights = config.reward_weights
    out = common.prepare_out(out, resume, config)
    start_time = time.perf_counter()

    lora_config = flux2sr.lora_config or config.lora
    models = flux2sr.models
    t_config = models.transformer_config.replace(dtype="bfloat16" if config.bf16 else "float32", remat=config.remat)
    base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), models.transformer) if config.bf16 else models.transformer
    models = models.replace(transformer=base, transformer_config=t_config)
    reference = flux2sr.adapter
    scale_lora = lora_config.scale
    policy = reference if reference is not None else lora_lib.init(base, lora_config, jax.random.PRNGKey(seed))
    optim = config.optim.for_steps(config.steps * int(config.sample_steps * config.timestep_fraction))
    state = train.init_state(policy, optim, jax.random.PRNGKey(seed))
    old = jax.tree.map(jnp.array, state["params"])
    checkpoints = common.Checkpoints(out / "checkpoints")
    start = 0
    if resume and checkpoints.latest_step() is not None:
        restored, start = checkpoints.restore_latest({"train": state, "old": old})
        state, old = restored["train"], restored["old"]
        report(f"resumed after iteration {start}")
    metrics = common.Metrics(out / "metrics.jsonl")
    if not resume:
        metrics.path.write_text("")  # a fresh run: no record of an earlier one in this folder survives
    metrics.truncate_after(start - 1)
    random = flux2sr.random or rewards.source.startswith("RANDOM")
    report(f"LucidNFT ({config.advantages}): {len(lrs)} LR inputs of {lrs.shape[1]}x{lrs.shape[2]} px, "
           f"{config.groups} x K = {config.group_size} rollouts per iteration, rewards "
           f"{dict(zip(config.rewards, weights))}, LoRA rank {lora_config.rank}" + (" [RANDOM]" if random else ""))

    step_fn = nft_step(config.nft, config.guidance, grid, scale_lora, optim)
    sigma_grid = jnp.asarray(sampling.sigmas(config.sample_steps, grid[0] * grid[1])[:-1])
    held_lrs, held_hrs = held
    if start == 0 and not any(r.get("split") == "held_out" for r in metrics.read()):
        _, raw = held_out_rewards(models, old, scale_lora, held_lrs, rewards, config)
        metrics.write(step=-1, split="held_out", iteration=0, rewards=_means(config.rewards, raw))

    for iteration in range(start, config.steps):
        t0 = time.perf_counter()
        index = iteration_inputs(seed, iteration, len(lrs), config.groups)
        seeds = np.array([[rollout_seed(seed, iteration, g, k) for k in range(config.group_size)]
                          for g in range(config.groups)])
        cond, latents, images = rollouts(models, old, scale_lora, lrs[index], seeds, config)
        group_lrs = np.repeat(lrs[index], config.group_size, axis=0)
        raw = rewards.raw(group_lrs, images)
        table = rewards.aligned(raw).reshape(config.groups, config.group_size, len(config.rewards))
        advantages = nft_lib.advantages(table, weights, config.advantages, renormalise=config.renormalise)
        r = nft_lib.reward_weight(advantages, config.nft.adv_clip).reshape(-1)
        separability = nft_lib.compare_schemes(table, weights, config.nft.adv_clip, renormalise=config.renormalise)
        rollout_s = time.perf_counter() - t0

        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), SEED_TAG), iteration)
        key_t, key_n = jax.random.split(key)
        timesteps = nft_lib.training_timesteps(key_t, sigma_grid, latents.shape[0], config.timestep_fraction)
        noise = jax.random.normal(key_n, (timesteps.shape[1], *latents.shape), jnp.float32)
        terms = []
        for j in range(timesteps.shape[1]):
            batch = {"x0": latents[None], "cond": cond[None], "t": timesteps[None, :, j], "noise": noise[j][None],
                     "r": r[None]}
            state, m = step_fn(state, {"models": models, "reference": reference, "old": old}, batch)
            terms.append({k: float(v) for k, v in m.items()})
        loss = {k: float(np.mean([t[k] for t in terms])) for k in terms[0]}
        if not np.isfinite(loss["loss"]):
            raise FloatingPointError(f"nft: loss is {loss['loss']} at iteration {iteration}; the last good checkpoint "
                                     f"is {checkpoints.latest_step()} in {checkpoints.directory}")
        decay = float(nft_lib.old_policy_decay(iteration, config.decay_type))
        old = nft_lib.ema_update(old, state["params"], decay)
        metrics.write(step=iteration, split="train", inputs=index, seeds=seeds, rewards=_means(config.rewards, raw),
                      reward_table=raw.reshape(table.shape), advantages=advantages, reward_weight=r,
                      separability=_jsonable_separability(separability), decay=decay, rollout_s=rollout_s,
                      iteration_s=time.perf_counter() - t0, **loss)
        report(f"iteration {iteration + 1}/{config.steps}: loss {loss['loss']:.4f}, rewards "
               + ", ".join(f"{k} {v:.4f}" for k, v in _means(config.rewards, raw).items()))
        done = iteration + 1
        if done % config.eval_every == 0 or done == config.steps:
            _, raw_held = held_out_rewards(models, state["params"], scale_lora, held_lrs, rewards, config)
            metrics.write(step=iteration, split="held_out", iteration=done, rewards=_means(config.rewards, raw_held))
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoints.save(done, {"train": state, "old": old})

    file = lora_io.export_lora(out / ADAPTER, jax.device_get(state["params"]), lora_config,
                               metadata={"foa_stage": "nft", "foa_preset": preset, "foa_advantages": config.advantages,
                                         "foa_sft_fingerprint": flux2sr.fingerprint})
    # Without a Flux2SR adapter the fresh LoRA (B = 0) stands for Flux2SR: exactly the base, through the same program
    baseline = reference if reference is not None else policy
    trained = state["params"]
    candidates = [(f"LucidNFT-{config.advantages}", trained, scale_lora),
                  *compared_runs(compare, models.transformer, config.advantages)]
    evaluation = evaluate(models, baseline, candidates, scale_lora, held_lrs, held_hrs, rewards, config)
    records = metrics.read()
    plot_rewards(out / "rewards.png", records, config.rewards)
    write_report(out / "report.md", config, flux2sr, rewards, records, evaluation, lrs, random,
                 time.perf_counter() - start_time)
    report(f"wrote {file}, {out / 'report.md'}")
    return file


# --------------------------------------------------------------------------------------------------------------------
# Evaluation and the report


def evaluate(models, baseline, candidates, lora_scale, lrs, hrs, rewards: Rewards, config: NFTStageConfig) -> dict:
    """Flux2SR (`baseline`) against each `(label, adapter, scale)` candidate on the held-out crops, every output
    from the same noise: every reward (raw), PSNR and LPIPS against the HR, and each candidate's paired delta to
    Flux2SR with a normal 95% interval."""
    fr = iqa.Scorer(("psnr", "lpips"))
    hr = hrs.astype(np.float32) / 255.0
    columns = {}
    for label, adapter, scale in (("Flux2SR", baseline, lora_scale), *candidates):
        images, raw = held_out_rewards(models, adapter, scale, lrs, rewards, config)
        scores = {name: raw[:, m] for m, name in enumerate(rewards.names)}
        scores.update(fr.score(images, hr))
        columns[label] = scores
    table = {}
    for name in columns["Flux2SR"]:
        a = np.asarray(columns["Flux2SR"][name])
        row = {"Flux2SR": float(np.mean(a))}
        for label, _, _ in candidates:
            delta = np.asarray(columns[label][name]) - a
            half = 1.96 * float(np.std(delta, ddof=1)) / np.sqrt(len(delta)) if len(delta) > 1 else float("nan")
            row[label] = {"mean": float(np.mean(a + delta)), "delta": float(np.mean(delta)), "ci95": half}
        table[name] = row
    return {"inputs": len(lrs), "labels": [label for label, _, _ in candidates], "table": table}


def compared_runs(folders, base, scheme: str) -> list[tuple[str, dict, float]]:
    """`(label, adapter, scale)` of other LucidNFT runs' adapters (e.g. the other advantage scheme), labelled by the
    scheme their file records; a label this run already has gets the folder name added."""
    from safetensors import safe_open

    runs, labels = [], {f"LucidNFT-{scheme}"}
    for folder in folders:
        file = Path(folder) / ADAPTER
        if not file.is_file():
            raise FileNotFoundError(f"--compare: {folder} holds no {ADAPTER} (an experiments.nft run folder)")
        with safe_open(str(file), framework="numpy") as f:
            other = (f.metadata() or {}).get("foa_advantages", "?")
        label = f"LucidNFT-{other}"
        if label in labels:
            label = f"{label} ({Path(folder).name})"
        labels.add(label)
        tree, lora_config = lora_io.import_lora(file, base)
        runs.append((label, tree, lora_config.scale))
    return runs


def plot_rewards(path: Path, records: list[dict], names) -> Path:
    """One panel per reward: its raw mean over the rollouts of each iteration and on the held-out inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, style in (("train", "-"), ("held_out", "o--")):
            points = [(r.get("iteration", r["step"] + 1), r["rewards"][name]) for r in records
                      if r.get("split") == split]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, style, label=split.replace("_", "-"))
        better = "higher" if name == CONSISTENCY_REWARD or rewards_lib.metric_spec(name).higher_is_better else "lower"
        ax.set_title(f"{name} ({better} is better)")
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def pooled_separability(records: list[dict], config: NFTStageConfig, signs: np.ndarray) -> dict:
    """Both schemes' separability on every rollout of the run (all groups of all iterations at once)."""
    tables = [np.asarray(r["reward_table"]) * signs for r in records if r.get("split") == "train"]
    if not tables:
        return {}
    stats = nft_lib.compare_schemes(np.concatenate(tables), config.reward_weights, config.nft.adv_clip,
                                    renormalise=config.renormalise)
    return _jsonable_separability(stats)


def write_report(path: Path, config: NFTStageConfig, flux2sr, rewards: Rewards, records, evaluation, lrs, random,
                 seconds: float) -> Path:
    train_records = [r for r in records if r.get("split") == "train"]
    held_records = [r for r in records if r.get("split") == "held_out"]
    sep = pooled_separability(records, config, rewards.signs)
    lines = ["# LucidNFT on Flux2SR", ""]
    if random:
        lines += [("**RANDOM**: a randomly initialised Flux2SR or consistency head; these numbers only check the "
                   "plumbing."), ""]
    lines += [f"- Flux2SR: {flux2sr.source}", f"- consistency head: {rewards.source or 'not a reward'}",
              (f"- advantages: {config.advantages} (renormalise {config.renormalise}); rewards and weights: "
               f"{dict(zip(config.rewards, config.reward_weights))}"),
              (f"- {len(train_records)} iterations x {config.groups} LRs x K = {config.group_size} rollouts, "
               f"{config.sample_steps} sampler steps; {len(lrs)} LR inputs of {lrs.shape[1]} px; "
               f"this session {seconds:.0f} s"), "",
              "## Separability of the two schemes on the same rollouts", ""]
    if sep:
        lines += ["| scheme | in-group range | distinct values per group | collapsed (abs(r − 1/2) < 0.05) |",
                  "|---|---|---|---|"]
        for scheme in nft_lib.SCHEMES:
            s = sep[scheme]
            lines.append(f"| {scheme} | {s['range']:.3f} | {s['distinct']:.2f} | {s['collapsed']:.3f} |")
        lines += ["", f"Sign disagreement between the schemes: {sep['sign_disagreement']:.3f} of the rollouts.", ""]
    lines += ["## Reward curves (raw means; rewards.png)", "",
              "| reward | train first | train last | held-out first | held-out last |", "|---|---|---|---|---|"]
    for name in config.rewards:
        cells = []
        for chosen in (train_records, held_records):
            cells += [f"{chosen[0]['rewards'][name]:.4f}", f"{chosen[-1]['rewards'][name]:.4f}"] if chosen \
                else ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    labels = evaluation["labels"]
    lines += ["", f"## Held-out evaluation ({evaluation['inputs']} crops, the same noise for every model)", "",
              "| metric | Flux2SR | " + " | ".join(f"{label} | Δ (95% interval)" for label in labels) + " |",
              "|---|---|" + "---|---|" * len(labels)]
    for name, row in evaluation["table"].items():
        cells = [f"{row[label]['mean']:.4f} | {row[label]['delta']:+.4f} ± {row[label]['ci95']:.4f}"
                 for label in labels]
        lines.append(f"| {name} | {row['Flux2SR']:.4f} | " + " | ".join(cells) + " |")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "report.json").write_text(json.dumps(common.to_jsonable(
        {"separability": sep, "evaluation": evaluation, "seconds": seconds, "random": random}), indent=2))
    return path


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.parser(__doc__.split("\n\n")[0], "runs/nft")
    p.add_argument("--sft", type=Path, help="Flux2SR weights folder (tiny: the shipped one, else the main job's "
                                            f"{MAIN_JOB_SFT})")
    p.add_argument("--lr", type=Path, help="folder of LR images (default: degraded crops of the training photos)")
    p.add_argument("--consistency-head", type=Path,
                   help=f"LucidConsistency head (default {DEFAULT_HEAD}; `python -m experiments.consistency`)")
    p.add_argument("--random-head", action="store_true", help="an untrained consistency head: a plumbing check only")
    p.add_argument("--advantages", choices=nft_lib.SCHEMES, help="advantage scheme (the config's if omitted)")
    p.add_argument("--iqa-weights", type=Path, help="pyiqa weights folder for the metrics that need files")
    p.add_argument("--compare", type=Path, nargs="+", default=[],
                   help="other experiments.nft run folders (e.g. the other --advantages) evaluated beside this run")
    args, config = common.parse(p, argv, "nft")
    nft_config = config.nft
    if args.advantages is not None:
        try:
            nft_config = dataclasses.replace(nft_config, advantages=args.advantages)
        except ValueError as err:
            p.error(str(err))
    factor, scale = nft_config.data.token_factor, nft_config.data.scale
    if args.lr is not None:
        lrs = folder_lrs(args.lr, scale, factor, nft_config.data.gt_size)
    else:
        check_lr_side(nft_config.data.lr_size, scale, factor, "data.gt_size")
        lrs = photo_lrs(nft_config)
    held = held_out(nft_config)
    rewards = build_rewards(nft_config, args.consistency_head, args.random_head, args.iqa_weights, args.seed)
    folder = common.resolve_sft(args)
    if folder is None and args.preset == "tiny" and not args.random_init and (MAIN_JOB_SFT / "manifest.json").is_file():
        print(f"[sft] the main job's Flux2SR {MAIN_JOB_SFT} (--sft picks another)")
        folder = MAIN_JOB_SFT
    flux2sr = common.load_flux2sr(args, config, folder)
    for folder in args.compare:
        if not (Path(folder) / ADAPTER).is_file():
            raise FileNotFoundError(f"--compare: {folder} holds no {ADAPTER} (an experiments.nft run folder)")
    return run(nft_config, flux2sr, lrs, rewards, args.out, args.seed, args.resume, held, args.preset, args.compare)


if __name__ == "__main__":
    main()
