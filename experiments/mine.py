"""FoA-SR preference mining (SPEC §3–4): candidate pools, metric scores, profile rewards and winner–loser pairs.

    python -m experiments.mine [--preset tiny] [--out runs/foa/mine] [--sft runs/foa/sft/weights] [--resume]
                               [--hr DIR ...] [--iqa-weights DIR] [--seed S] [section.field=value ...]
    python -m experiments.mine --preset flux2-dev --transformer T --vae V --prompt-embedding P --sft SFT/weights \
        --hr DIR [DIR ...] --iqa-weights DIR

For each LR input the Flux2SR model (`--sft`: the weights folder `experiments.sft` writes) draws a pool of candidates
that differ only in the starting noise (16 Euler steps, guidance 1.0). Every candidate is scored once with every
metric of the Faithful and Aesthetic sets. Then, over all inputs: the profile rewards (Eq. 3–5), the mining
statistics of paper Tables 3 and 5 for the nested pools (first k candidates, k in `nested_pool_sizes`), and the
winner–loser pairs of each profile from the first `pool_size` (K) candidates (Eq. 6–7).

Files in `--out`:
    candidates/{i:05d}.npz   one per LR input, written atomically once the input is generated *and* scored:
                             latents (K', N, C) float32 final packed latents, cond (N, C) LR reference tokens,
                             images (K', H, W, 3) uint8 decoded candidates, lr, hr uint8, seeds (K',) int64,
                             scores (K', M) float64 raw metric values, metric_names (M,)   [K' = candidates generated]
    images/{i:05d}/          lr.png, hr.png, candidate_{k}.png
    scores.npz               scores (inputs, K', M), seeds, metric_names: everything the rewards were computed from
    pairs_{profile}.npz      input_index, winner, loser, gap, seed_w, seed_l, z_w, z_l, cond (P, N, C) and `meta`
                             (JSON: preset, model configs, SFT fingerprint, metric sets, reward config, K, ...):
                             read them with `load_pairs`, which refuses pairs of another checkpoint or preset
    stats.json, report.md    the SPEC §4 statistics beside the paper's, pair counts, candidate grids (grids/)
    identity.json            what the candidate files depend on; `--resume` refuses to mix runs
    metrics.jsonl            one record per input (timings, scores)

Candidate seeds: candidate k of input i under run seed S starts from `sr.candidate_noise(candidate_seed(S, i, k))`,
`candidate_seed` = the first word of NumPy's `SeedSequence([S, 0x4D494E45, i, k])`, shifted to 31 bits. It depends on
nothing else, so the nested pools are prefixes of one pool and a resumed or re-batched run draws the same noise.

Resuming: `--resume` skips every input whose candidate file exists (generation and scoring both happened), so a
killed run neither regenerates nor rescores finished inputs. `inputs=`, `reward.*`, `pool_size=` and
`nested_pool_sizes=` (keeping the same largest pool) may change on resume: that re-mines the stored candidates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from experiments import common
from foa_jax import rewards, sr
from foa_jax.data import cache as cache_lib
from foa_jax.data.dataset import DataConfig, Dataset, FolderPhotos
from ports import iqa, photos

MINING_DATA_SEED = 20_011  # crops and degradations differ from the SFT cache (seed 0) and its validation (10_007)
SEED_TAG = 0x4D494E45  # "MINE": keeps candidate seeds apart from any other use of SeedSequence([seed, ...])


@dataclass(frozen=True)
class MineConfig:
    """What defines a mining run besides the model files; presets below, dotted overrides on the CLI.

    `pool_size` (K) is the pool the pairs come from; `nested_pool_sizes` the pools of the statistics table. The run
    generates `candidates` = max(K, largest nested pool) per input; every pool is a prefix of them. `batch` is the
    number of candidates per sampler call (a smaller last chunk is padded, so one program serves the whole run).
    """

    data: DataConfig = field(default_factory=lambda: dataclasses.replace(DataConfig.preset("full"),
                                                                         seed=MINING_DATA_SEED))
    inputs: int = 500
    pool_size: int = 4
    nested_pool_sizes: tuple[int, ...] = (2, 4, 6, 8)
    sample_steps: int = 16
    guidance: float = 1.0
    batch: int = 4
    reward: rewards.RewardConfig = field(default_factory=rewards.RewardConfig)
    grid_inputs: int = 3  # inputs shown as candidate grids in the report

    def __post_init__(self):
        object.__setattr__(self, "nested_pool_sizes", tuple(self.nested_pool_sizes))
        if self.pool_size < 2:
            raise ValueError(f"MineConfig.pool_size: a pool needs at least 2 candidates to have a winner and a loser, "
                             f"got {self.pool_size}")
        small = [k for k in self.nested_pool_sizes if k < 2]
        if small:
            raise ValueError(f"MineConfig.nested_pool_sizes: every pool needs at least 2 candidates, got "
                             f"{self.nested_pool_sizes}")
        for name in ("inputs", "sample_steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"MineConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.grid_inputs < 0:
            raise ValueError(f"MineConfig.grid_inputs: expected >= 0, got {self.grid_inputs}")
        for name in self.metric_names:
            iqa.registry_entry(name)  # a name the scorer does not know fails here, listing the known ones

    @property
    def candidates(self) -> int:
        return max((self.pool_size, *self.nested_pool_sizes))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Score columns: the Faithful metrics, then the Aesthetic ones not already scored."""
        faithful = self.reward.faithful_metrics
        return faithful + tuple(m for m in self.reward.aesthetic_metrics if m not in faithful)

    @property
    def statistics_pool_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({*self.nested_pool_sizes, self.pool_size}))


# Tiny: the metrics that run offline, the R_F (PSNR, SSIM, LPIPS, DISTS) and NIQE + PIQE for R_A (a single
# metric makes every Aesthetic gap ~1). Per input (8 candidates of 256 px) sampling and decoding cost ~6-8 CPU-s,
# DISTS ~1.7 CPU-s per candidate and the other metrics ~3.5 CPU-s together (NIQE half of it).
TINY_REWARD = rewards.RewardConfig(faithful_metrics=("psnr", "ssim", "lpips", "dists"),
                                   aesthetic_metrics=("niqe", "piqe"))
PRESETS = {
    "flux2-dev": MineConfig(),
    "klein-4b": MineConfig(),
    "klein-9b": MineConfig(),
    "tiny": MineConfig(data=dataclasses.replace(DataConfig.preset("tiny"), seed=MINING_DATA_SEED), inputs=16,
                       batch=4, reward=TINY_REWARD),
}


def config_for(preset: str, overrides) -> MineConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return common.apply_overrides(PRESETS[preset], overrides)


# ------------------------------------------------------------------------------------------------------- candidates


def candidate_seed(run_seed: int, input_index: int, candidate: int) -> int:
    """The noise seed of candidate `candidate` of input `input_index` (31 bits, as `jax.random.PRNGKey` takes)."""
    state = np.random.SeedSequence([run_seed, SEED_TAG, input_index, candidate]).generate_state(1)
    return int(state[0] >> 1)


def sft_fingerprint(models: sr.Models, adapter, sources=None) -> str:
    """Identity of the model that drew the candidates: transformer, adapter, VAE and prompt embedding.

    The DPO stage computes it for the checkpoint it starts from and `load_pairs` compares: pairs mined with another
    model (or another VAE, which changes the latent space) are refused. `sources`, the files the models were read
    from (`common.model_sources`), let it be computed once per checkpoint instead of once per stage.
    """
    tree = {"transformer": models.transformer, "adapter": adapter or {}, "vae": models.vae, "prompt": models.prompt}
    # leaf by leaf: a full-size model is never copied to the host at once
    return common.cached_fingerprint(sources, lambda: cache_lib.fingerprint(tree))


def generate_pool(models: sr.Models, adapter, lora_scale: float, lr: np.ndarray, size: tuple[int, int],
                  seeds: list[int], config: MineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cond (N, C), latents (K', N, C) float32, images (K', H, W, 3) uint8) for one uint8 LR image."""
    cond = sr.condition(models, sr.upsample_lr(lr[None], size))
    grid = sr.token_grid(models, *size)
    noise = np.concatenate([np.asarray(sr.candidate_noise(seed, cond.shape)) for seed in seeds])
    latents, images = [], []
    for start in range(0, len(seeds), config.batch):
        chunk = noise[start:start + config.batch]
        padded = np.concatenate([chunk, np.zeros((config.batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        batch_cond = np.broadcast_to(np.asarray(cond), padded.shape)
        z = sr.generate(models, batch_cond, padded, config.sample_steps, grid, config.guidance, adapter, lora_scale)
        x = sr.decode(models, z, *size)
        latents.append(np.asarray(z, np.float32)[:len(chunk)])
        images.append(np.asarray(x)[:len(chunk)])
    images = np.clip(np.round(np.concatenate(images) * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(cond, np.float32)[0], np.concatenate(latents), images


def score_pool(scorer: iqa.Scorer, images: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Raw scores (K', M) of uint8 candidates against their uint8 HR, columns in `scorer.metrics` order.

    The saved uint8 images are what is scored, so scores can be recomputed from the files exactly.
    """
    as_float = images.astype(np.float32) / 255.0
    reference = np.broadcast_to(hr.astype(np.float32) / 255.0, as_float.shape)
    scores = scorer.score(as_float, reference)
    return np.stack([scores[name] for name in scorer.metrics], axis=-1)


def _save_npz_atomically(path: Path, **arrays) -> None:
    """Write to a hidden sibling, then rename: a killed run never leaves a half-written file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def candidate_path(out: Path, index: int) -> Path:
    return Path(out) / "candidates" / f"{index:05d}.npz"


def _save_pngs(folder: Path, lr: np.ndarray, hr: np.ndarray, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lr).save(folder / "lr.png")
    Image.fromarray(hr).save(folder / "hr.png")
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"candidate_{k}.png")


def mine_inputs(out: Path, dataset: Dataset, models: sr.Models, adapter, lora_scale: float, scorer: iqa.Scorer,
                config: MineConfig, seed: int) -> dict:
    """Generate, decode, score and save every input without a candidate file; returns this session's timings."""
    size = (config.data.gt_size, config.data.gt_size)
    metrics = common.Metrics(out / "metrics.jsonl")
    todo = [i for i in range(config.inputs) if not candidate_path(out, i).exists()]
    candidate_path(out, 0).parent.mkdir(parents=True, exist_ok=True)
    timing = {"inputs_done": 0, "generate_s": 0.0, "score_s": 0.0, "generate_cpu_s": 0.0, "score_cpu_s": 0.0}
    bar = tqdm(todo, desc="mine", initial=config.inputs - len(todo), total=config.inputs)
    for index in bar:
        lr, hr = dataset.pair(index)
        seeds = [candidate_seed(seed, index, k) for k in range(config.candidates)]
        clock = [(time.perf_counter(), time.process_time())]  # wall and this process's CPU (other jobs share it)
        cond, latents, images = generate_pool(models, adapter, lora_scale, lr, size, seeds, config)
        clock.append((time.perf_counter(), time.process_time()))
        scores = score_pool(scorer, images, hr)
        clock.append((time.perf_counter(), time.process_time()))
        _save_pngs(out / "images" / f"{index:05d}", lr, hr, images)
        _save_npz_atomically(candidate_path(out, index), latents=latents, cond=cond, images=images, lr=lr, hr=hr,
                             seeds=np.asarray(seeds, np.int64), scores=scores,
                             metric_names=np.asarray(scorer.metrics))
        spent = {f"{stage}{unit}": clock[n + 1][c] - clock[n][c] for n, stage in enumerate(("generate", "score"))
                 for c, unit in enumerate(("_s", "_cpu_s"))}
        metrics.write(input=index, **spent, scores={name: scores[:, m] for m, name in enumerate(scorer.metrics)})
        timing["inputs_done"] += 1
        for key, value in spent.items():
            timing[key] += value
        bar.set_postfix(generate=f"{spent['generate_s']:.1f}s", score=f"{spent['score_s']:.1f}s")
    return timing


def collect_scores(out: Path, config: MineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scores (inputs, K', M), seeds (inputs, K')) from the candidate files, checked against the config."""
    scores, seeds = [], []
    for index in range(config.inputs):
        path = candidate_path(out, index)
        with np.load(path) as stored:
            names = tuple(str(n) for n in stored["metric_names"])
            if names != config.metric_names:
                raise ValueError(f"{path}: scored with metrics {names}, this run uses {config.metric_names}")
            scores.append(stored["scores"])
            seeds.append(stored["seeds"])
    return np.stack(scores), np.stack(seeds)


# ------------------------------------------------------------------------------------------------------------ pairs


def write_pairs(out: Path, scores: np.ndarray, seeds: np.ndarray, config: MineConfig,
                meta: dict) -> dict[str, rewards.PreferencePairs]:
    """`pairs_{profile}.npz` for every profile, mined from the first K candidates; returns the pairs."""
    k = config.pool_size
    pairs = {p: rewards.mine_pairs(scores[:, :k], config.metric_names, config.reward, p) for p in rewards.PROFILES}
    needed = sorted({int(i) for p in pairs.values() for i in p.input_index})
    latents, conds = {}, {}
    for index in needed:  # one read per input, shared by the three profiles
        with np.load(candidate_path(out, index)) as stored:
            latents[index], conds[index] = stored["latents"][:k], stored["cond"]
    with np.load(candidate_path(out, 0)) as stored:
        token_shape = stored["cond"].shape
    def stack(arrays):
        return np.stack(arrays) if arrays else np.zeros((0, *token_shape), np.float32)

    for profile, p in pairs.items():
        rows = list(zip(p.input_index.tolist(), p.winner.tolist(), p.loser.tolist()))
        _save_npz_atomically(
            out / f"pairs_{profile}.npz", input_index=p.input_index.astype(np.int64),
            winner=p.winner.astype(np.int64), loser=p.loser.astype(np.int64), gap=p.gap.astype(np.float64),
            seed_w=seeds[p.input_index, p.winner], seed_l=seeds[p.input_index, p.loser],
            z_w=stack([latents[i][w] for i, w, _ in rows]), z_l=stack([latents[i][l] for i, _, l in rows]),
            cond=stack([conds[i] for i, _, _ in rows]),
            meta=np.asarray(json.dumps({**meta, "profile": profile, "pairs": len(rows)})))
    return pairs


def load_pairs(path, expected_fingerprint: str, expected_preset: str) -> dict:
    """The arrays of a `pairs_{profile}.npz` and its `meta` dict, refused unless they were mined with the expected
    SFT checkpoint (`sft_fingerprint`) and preset: DPO on another model's latents would train on the wrong pairs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mined pairs; run `python -m experiments.mine` first")
    with np.load(path) as stored:
        pairs = {key: stored[key] for key in stored.files}
    meta = json.loads(str(pairs.pop("meta")))
    if meta["preset"] != expected_preset:
        raise ValueError(f"{path}: pairs were mined with preset {meta['preset']!r}, expected {expected_preset!r}")
    if meta["sft_fingerprint"] != expected_fingerprint:
        raise ValueError(f"{path}: pairs were mined with the SFT checkpoint of fingerprint {meta['sft_fingerprint']} "
                         f"({meta.get('sft_weights')}), but this run's checkpoint has {expected_fingerprint}; "
                         f"re-run `python -m experiments.mine --sft <this checkpoint>`")
    return {**pairs, "meta": meta}


# ----------------------------------------------------------------------------------------------------------- report


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def statistics_table(stats: dict[int, rewards.MiningStats]) -> str:
    """Markdown: one row per statistic, one column per nested pool size, `ours [paper]`, and the disagreement that two
    unrelated rankings would show (a reading aid: the paper's 55–91% sit a few points above it)."""
    sizes = sorted(stats)
    cells: dict[str, dict[int, str]] = {}
    for k, name, ours, paper in rewards.compare_with_paper(stats):
        show = _percent if name == "winner_disagreement" else (
            (lambda v: f"{v:.0f}") if isinstance(ours, int) else (lambda v: f"{v:.4f}"))
        cells.setdefault(name, {})[k] = show(ours) + (f" [{show(paper)}]" if paper is not None else "")
    rows = [f"| statistic | {' | '.join(f'k = {k}' for k in sizes)} |", "|---|" + "---|" * len(sizes)]
    rows += [f"| {name} | {' | '.join(by_k[k] for k in sizes)} |" for name, by_k in cells.items()]
    rows.append(f"| winner_disagreement if R_F, R_A were independent (1 − 1/k) | "
                f"{' | '.join(_percent(1 - 1 / k) for k in sizes)} |")
    return "\n".join(rows)


def candidate_grids(out: Path, scores: np.ndarray, config: MineConfig) -> list[Path]:
    """One PNG per shown input: LR (bicubic), HR, then the K candidates labelled with R_F, R_A and the winners."""
    k = config.pool_size
    size = (config.data.gt_size, config.data.gt_size)
    paths = []
    for index in range(min(config.grid_inputs, config.inputs)):
        with jax.enable_x64(True):  # the precision mining uses, so the marked winners are the mined ones
            r = rewards.profile_rewards(scores[index, :k], config.metric_names, config.reward)
            faithful, aesthetic = np.asarray(r.faithful), np.asarray(r.aesthetic)
        with np.load(candidate_path(out, index)) as stored:
            lr, hr, images = stored["lr"], stored["hr"], stored["images"][:k]
        labels = [f"c{c} F{faithful[c]:.2f} A{aesthetic[c]:.2f}"
                  + (" wF" if c == np.argmax(faithful) else "") + (" wA" if c == np.argmax(aesthetic) else "")
                  for c in range(k)]
        paths.append(common.save_grid(out / "grids" / f"input_{index:05d}.png",
                                      [[sr.upsample_lr(lr[None], size)[0], hr, *images]],
                                      ["LR bicubic", "HR", *labels]))
    return paths


def write_report(out: Path, config: MineConfig, scorer: iqa.Scorer, stats: dict[int, rewards.MiningStats],
                 pairs: dict[str, rewards.PreferencePairs], grids: list[Path], summary: dict) -> Path:
    """`report.md`: run, metrics (scorer registry rows), reward composition, SPEC §4 table, pair counts, grids."""
    reward, session = config.reward, summary["session"]

    def composition(metrics, weights):
        return ", ".join(f"{m} ({w:.3g})" for m, w in zip(metrics, weights)) if weights else ", ".join(metrics)

    model = f"`{summary['sft_weights']}` (fingerprint `{summary['sft_fingerprint']}`)"
    if summary["random_init"]:
        model += " — **RANDOM initialisation**: " + "; ".join(summary["random_init"])
    run = (f"Preset `{summary['preset']}`; {config.inputs} LR inputs of {config.data.gt_size} px; "
           f"{config.candidates} candidates per input ({config.sample_steps} Euler steps, guidance {config.guidance}); "
           f"pairs from the first K = {config.pool_size}. Model: {model}.")
    timing = (f"This session: {session['inputs_done']} inputs generated and scored; {session['total_s']:.1f} s wall "
              f"in total (generation {session['generate_s']:.1f} s, scoring {session['score_s']:.1f} s), "
              f"{session['total_cpu_s']:.1f} s of CPU time (generation {session['generate_cpu_s']:.1f} s, scoring "
              f"{session['score_cpu_s']:.1f} s; wall time depends on what else runs on the machine).")
    pair_rows = [f"| {p} | {len(pp.gap)} | {config.inputs} | "
                 f"{np.mean(pp.gap) if len(pp.gap) else float('nan'):.4f} |" for p, pp in pairs.items()]
    grid_note = ("LR (bicubic), HR, then candidates c0, c1, ... with their R_F (F) and R_A (A) in the pool of K; "
                 "wF / wA mark the Faithful / Aesthetic winners.")
    lines = [
        "# FoA-SR preference mining", "", run, "", timing, "",
        "## Metrics", "", scorer.describe(), "",
        "## Rewards (Eq. 3–5: directions aligned, min–max within each pool)", "",
        f"- R_F (Faithful) = mean of {composition(reward.faithful_metrics, reward.faithful_weights)}",
        f"- R_A (Aesthetic) = mean of {composition(reward.aesthetic_metrics, reward.aesthetic_weights)}",
        "- R_H (Hybrid) = (R_F + R_A) / 2",
        f"- ε = {reward.eps:g}; pairs with gap < τ = {reward.gap_threshold:g} are dropped", "",
        "## Mining statistics (SPEC §4): ours [paper]", "", statistics_table(stats), "",
        f"Paper values: {rewards.PAPER_MINING_STATS_SOURCE}", "",
        f"## Pairs (first K = {config.pool_size} candidates, after the τ filter)", "",
        "| profile | pairs | of inputs | mean gap |", "|---|---|---|---|", *pair_rows, "",
        "## Candidate grids", "", grid_note, "", *[f"![{g.stem}](grids/{g.name})" for g in grids], "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------------------------- main


def _identity(config: MineConfig, preset: str, seed: int, fingerprint: str, dataset: Dataset) -> dict:
    """What the candidate files depend on. Not in it: inputs, K, nested sizes and rewards (re-minable on resume)."""
    return common.to_jsonable({
        "preset": preset, "seed": seed, "sft_fingerprint": fingerprint, "photos": dataset.fingerprint(),
        "data": config.data.to_json(), "candidates": config.candidates, "sample_steps": config.sample_steps,
        "guidance": config.guidance, "batch": config.batch, "metrics": config.metric_names})


def _finished_inputs(out: Path, resume: bool) -> int:
    """How many candidate files `out` holds; refuses to add to another run's files unless resuming."""
    finished = len(list((out / "candidates").glob("*.npz")))
    if finished and not resume:
        raise FileExistsError(f"{out} already holds {finished} mined inputs: pass --resume to continue that run, "
                              f"or choose another --out")
    return finished


def _check_identity(out: Path, identity: dict, finished: int) -> None:
    """Refuse to resume a run whose candidate files were made by other settings; record this run's identity."""
    path = out / "identity.json"
    if finished:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        differing = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if differing:
            raise ValueError(f"--resume: {out} was mined with other settings; (stored, now): {differing}")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2))


def main(argv=None) -> Path:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/mine")
    p.add_argument("--sft", type=Path, default=Path("runs/foa/sft/weights"),
                   help="Flux2SR weights folder written by experiments.sft (tiny: random init if absent)")
    p.add_argument("--hr", type=Path, nargs="*", help="folders of HR images (default: the bundled training photos)")
    p.add_argument("--iqa-weights", type=Path, help="folder of pyiqa weight files (pyiqa/, clip/) for learned metrics")
    args = p.parse_args(argv)
    if args.steps is not None:
        raise ValueError("--steps: mining does not train; set the sampler's steps with sample_steps=N")
    config = config_for(args.preset, args.overrides)  # bad pool sizes and metric names fail here, before any work
    out = Path(args.out)
    finished = _finished_inputs(out, args.resume)
    scorer = iqa.Scorer(config.metric_names, weights_dir=args.iqa_weights)  # missing weight files fail here

    random_init = []
    models, adapter, lora_config = common.load_flux2sr(
        args, args.sft, announce=lambda msg: (print(msg), random_init.append(msg)))
    lora_scale = lora_config.scale if lora_config is not None else 1.0
    if models.vae_config.token_factor != config.data.token_factor:
        raise ValueError(f"data.token_factor {config.data.token_factor} differs from the VAE's "
                         f"{models.vae_config.token_factor} pixels per token")
    source = FolderPhotos(args.hr) if args.hr else photos.split(min_side=config.data.gt_size)[0]
    dataset = Dataset(config.data, source, report=print)
    fingerprint = sft_fingerprint(models, adapter, common.model_sources(args, args.sft))
    _check_identity(out, _identity(config, args.preset, args.seed, fingerprint, dataset), finished)
    common.prepare_out(out, args.resume, config)

    session = mine_inputs(out, dataset, models, adapter, lora_scale, scorer, config, args.seed)
    scores, seeds = collect_scores(out, config)
    _save_npz_atomically(out / "scores.npz", scores=scores, seeds=seeds, metric_names=np.asarray(config.metric_names))
    stats = rewards.nested_pool_statistics(scores, config.metric_names, config.reward, config.statistics_pool_sizes)
    size = config.data.gt_size
    meta = common.to_jsonable({
        "preset": args.preset, "sft_fingerprint": fingerprint, "sft_weights": args.sft,
        "random_init": bool(random_init), "transformer_config": models.transformer_config,
        "vae_config": models.vae_config, "lora_scale": lora_scale, "metrics": config.metric_names,
        "faithful_metrics": config.reward.faithful_metrics, "aesthetic_metrics": config.reward.aesthetic_metrics,
        "reward": config.reward, "pool_size": config.pool_size, "candidates": config.candidates,
        "grid": sr.token_grid(models, size, size), "image_size": [size, size], "sample_steps": config.sample_steps,
        "guidance": config.guidance, "seed": args.seed, "data": config.data.to_json(), "inputs": config.inputs})
    pairs = write_pairs(out, scores, seeds, config, meta)
    grids = candidate_grids(out, scores, config)
    session["total_s"] = time.perf_counter() - t_start
    session["total_cpu_s"] = time.process_time() - cpu_start
    summary = {"preset": args.preset, "sft_weights": str(args.sft), "sft_fingerprint": fingerprint,
               "random_init": random_init, "session": session}
    (out / "stats.json").write_text(json.dumps(common.to_jsonable({
        **summary, "metrics": config.metric_names, "pool_size": config.pool_size, "inputs": config.inputs,
        "statistics": {k: dataclasses.asdict(s) for k, s in stats.items()},
        "paper": {k: dict(v) for k, v in rewards.PAPER_MINING_STATS.items()},
        "paper_source": rewards.PAPER_MINING_STATS_SOURCE,
        "pairs": {p: {"kept": len(pp.gap), "mean_gap": float(np.mean(pp.gap)) if len(pp.gap) else None}
                  for p, pp in pairs.items()}}), indent=2, allow_nan=True))
    report = write_report(out, config, scorer, stats, pairs, grids, summary)
    print(statistics_table(stats))
    print("pairs: " + ", ".join(f"{p} {len(pp.gap)}" for p, pp in pairs.items()) + f"; report: {report}; "
          f"{session['total_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
