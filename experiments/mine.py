"""FoA-SR preference mining: candidate pools, metric scores, profile rewards and winner–loser pairs.

    python -m experiments.mine [--preset tiny] [--out runs/foa/mine] [--sft runs/foa/sft/weights] [--resume]
                               [--hr DIR ...] [--iqa-weights DIR] [--seed S] [section.field=value ...]
    python -m experiments.mine --preset flux2-dev --transformer T --vae V --prompt-embedding P --sft SFT/weights \
        --hr DIR [DIR ...] --iqa-weights DIR

For each LR input the Flux2SR model (`--sft`: the weights folder `experiments.sft` writes) draws a pool of candidates
that differ only in the starting noise (16 Euler steps, guidance 1.0). Every candidate is scored once with every
metric of the Faithful and Aesthetic sets. Then, over all inputs: the profile rewards (Eq. 3–5), the mining
statistics of paper Tables 3 and 5 for the nested pools (first k candidates, k in `nested_pool_sizes`), and the
winner–loser pairs of each profile from the first `pool_size` (K) candidates (Eq. 6–7).

Files in `--out` (the candidate and pairs files are `experiments.artifacts`'s, hashed at save and checked at load):
    candidates/{i:05d}.npz   one per LR input, written once the input is generated *and* scored
    images/{i:05d}/          lr.png, hr.png, candidate_{k}.png
    scores.npz               scores (inputs, K', M), seeds, metric names: everything the rewards were computed from
    pairs_{profile}.npz      the winner–loser pairs of each profile, refused by the DPO stage unless mined with its
                             Flux2SR (fingerprint) and preset
    stats.json, report.md    the mining statistics beside the paper's, pair counts, candidate grids (grids/)
    identity.json            what the candidate files depend on; `--resume` refuses to mix runs
    metrics.jsonl            one record per input (timings, scores)

Candidate seeds: candidate k of input i under run seed S starts from `sr.candidate_noise(candidate_seed(S, i, k))`,
`candidate_seed` = the first word of NumPy's `SeedSequence([S, 0x4D494E45, i, k])`, shifted to 31 bits. It depends on
nothing else, so the nested pools are prefixes of one pool and a resumed or re-batched run draws the same noise.

Resuming: `--resume` skips every input whose candidate file is whole (its hash checks), so a killed run neither
regenerates nor rescores finished inputs, and re-does one whose file was damaged. `inputs=`, `reward.*`, `pool_size=` and
`nested_pool_sizes=` (keeping the same largest pool) may change on resume: that re-mines the stored candidates.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from experiments import artifacts, common
from experiments.configs.schema import MineConfig
from foa_jax import rewards, sr
from foa_jax.data.dataset import Dataset
from ports import iqa, photos

SEED_TAG = 0x4D494E45  # "MINE": keeps candidate seeds apart from any other use of SeedSequence([seed, ...])


# ------------------------------------------------------------------------------------------------------- candidates


def candidate_seed(run_seed: int, input_index: int, candidate: int) -> int:
    """The noise seed of candidate `candidate` of input `input_index` (31 bits, as `jax.random.PRNGKey` takes)."""
    state = np.random.SeedSequence([run_seed, SEED_TAG, input_index, candidate]).generate_state(1)
    return int(state[0] >> 1)


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
    todo = [i for i in range(config.inputs) if not artifacts.is_valid(artifacts.candidate_path(out, i))]
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
        artifacts.save_candidates(out, index, latents=latents, cond=cond, images=images, lr=lr, hr=hr, seeds=seeds,
                                  scores=scores, metric_names=scorer.metrics)
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
        stored = artifacts.load_candidates(out, index)
        if stored["metric_names"] != config.metric_names:
            raise ValueError(f"{artifacts.candidate_path(out, index)}: scored with metrics {stored['metric_names']}, "
                             f"this run uses {config.metric_names}")
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
        stored = artifacts.load_candidates(out, index)
        latents[index], conds[index] = stored["latents"][:k], stored["cond"]
    token_shape = artifacts.load_candidates(out, 0)["cond"].shape

    def stack(arrays):
        return np.stack(arrays) if arrays else np.zeros((0, *token_shape), np.float32)

    for profile, p in pairs.items():
        rows = list(zip(p.input_index.tolist(), p.winner.tolist(), p.loser.tolist()))
        artifacts.save_pairs(artifacts.pairs_path(out, profile), {
            "input_index": p.input_index.astype(np.int64), "winner": p.winner.astype(np.int64),
            "loser": p.loser.astype(np.int64), "gap": p.gap.astype(np.float64),
            "seed_w": seeds[p.input_index, p.winner], "seed_l": seeds[p.input_index, p.loser],
            "z_w": stack([latents[i][w] for i, w, _ in rows]), "z_l": stack([latents[i][l] for i, _, l in rows]),
            "cond": stack([conds[i] for i, _, _ in rows])}, {**meta, "profile": profile, "pairs": len(rows)})
    return pairs


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
        stored = artifacts.load_candidates(out, index)
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
    """`report.md`: run, metrics (scorer registry rows), reward composition, statistics table, pair counts, grids."""
    reward, session = config.reward, summary["session"]

    def composition(metrics, weights):
        return ", ".join(f"{m} ({w:.3g})" for m, w in zip(metrics, weights)) if weights else ", ".join(metrics)

    model = f"`{summary['sft_weights']}` (fingerprint `{summary['sft_fingerprint']}`)"
    if summary["random_init"]:
        model += " — **RANDOM initialisation**, asked for by --random-init"
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
    title = "# FoA-SR preference mining" + (" (RANDOM model)" if summary["random_init"] else "")
    lines = [
        title, "", run, "", timing, "",
        "## Metrics", "", scorer.describe(), "",
        "## Rewards (Eq. 3–5: directions aligned, min–max within each pool)", "",
        f"- R_F (Faithful) = mean of {composition(reward.faithful_metrics, reward.faithful_weights)}",
        f"- R_A (Aesthetic) = mean of {composition(reward.aesthetic_metrics, reward.aesthetic_weights)}",
        "- R_H (Hybrid) = (R_F + R_A) / 2",
        f"- ε = {reward.eps:g}; pairs with gap < τ = {reward.gap_threshold:g} are dropped", "",
        "## Mining statistics: ours [paper]", "", statistics_table(stats), "",
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


def run(config: MineConfig, flux2sr: common.Flux2SR, out: Path, seed: int = 0, resume: bool = False, source=None,
        scorer: iqa.Scorer | None = None, preset: str = "tiny", report=print) -> Path:
    """Mine `config.inputs` LR inputs of `source` (default: the bundled training photos) into `out`; returns `out`."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    finished = _finished_inputs(out, resume)
    scorer = scorer or iqa.Scorer(config.metric_names)
    models = flux2sr.models
    if models.vae_config.token_factor != config.data.token_factor:
        raise ValueError(f"data.token_factor {config.data.token_factor} differs from the VAE's "
                         f"{models.vae_config.token_factor} pixels per token")
    source = source if source is not None else photos.split(min_side=config.data.gt_size)[0]
    dataset = Dataset(config.data, source, report=report)
    _check_identity(out, _identity(config, preset, seed, flux2sr.fingerprint, dataset), finished)
    common.prepare_out(out, resume, config)

    session = mine_inputs(out, dataset, models, flux2sr.adapter, flux2sr.lora_scale, scorer, config, seed)
    scores, seeds = collect_scores(out, config)
    artifacts.save(out / "scores.npz", {"scores": scores, "seeds": seeds}, {"metric_names": list(config.metric_names)})
    stats = rewards.nested_pool_statistics(scores, config.metric_names, config.reward, config.statistics_pool_sizes)
    size = config.data.gt_size
    meta = common.to_jsonable({
        "preset": preset, "sft_fingerprint": flux2sr.fingerprint, "sft_weights": flux2sr.source,
        "random_init": flux2sr.random, "transformer_config": models.transformer_config,
        "vae_config": models.vae_config, "lora_scale": flux2sr.lora_scale, "metrics": config.metric_names,
        "faithful_metrics": config.reward.faithful_metrics, "aesthetic_metrics": config.reward.aesthetic_metrics,
        "reward": config.reward, "pool_size": config.pool_size, "candidates": config.candidates,
        "grid": sr.token_grid(models, size, size), "image_size": [size, size], "sample_steps": config.sample_steps,
        "guidance": config.guidance, "seed": seed, "data": config.data.to_json(), "inputs": config.inputs})
    pairs = write_pairs(out, scores, seeds, config, meta)
    grids = candidate_grids(out, scores, config)
    session["total_s"] = time.perf_counter() - t_start
    session["total_cpu_s"] = time.process_time() - cpu_start
    summary = {"preset": preset, "sft_weights": flux2sr.source, "sft_fingerprint": flux2sr.fingerprint,
               "random_init": flux2sr.random, "session": session}
    (out / "stats.json").write_text(json.dumps(common.to_jsonable({
        **summary, "metrics": config.metric_names, "pool_size": config.pool_size, "inputs": config.inputs,
        "statistics": {k: dataclasses.asdict(s) for k, s in stats.items()},
        "paper": {k: dict(v) for k, v in rewards.PAPER_MINING_STATS.items()},
        "paper_source": rewards.PAPER_MINING_STATS_SOURCE,
        "pairs": {p: {"kept": len(pp.gap), "mean_gap": float(np.mean(pp.gap)) if len(pp.gap) else None}
                  for p, pp in pairs.items()}}), indent=2, allow_nan=True))
    path = write_report(out, config, scorer, stats, pairs, grids, summary)
    report(statistics_table(stats))
    report("pairs: " + ", ".join(f"{p} {len(pp.gap)}" for p, pp in pairs.items()) + f"; report: {path}; "
           f"{session['total_s']:.1f} s")
    return out


def main(argv=None) -> Path:
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa/mine")
    p.add_argument("--sft", type=Path, help="Flux2SR weights folder (experiments.sft's weights/; tiny: the shipped one)")
    p.add_argument("--hr", type=Path, nargs="+", help="folders of HR images (default: the bundled training photos)")
    p.add_argument("--iqa-weights", type=Path, help="folder of pyiqa weight files (pyiqa/, clip/) for learned metrics")
    args, config = common.parse(p, argv, "mine")
    if args.steps is not None:
        p.error("--steps: mining does not train; set the sampler's steps with sample_steps=N")
    scorer = iqa.Scorer(config.mine.metric_names, weights_dir=args.iqa_weights)  # missing weight files fail here
    flux2sr = common.load_flux2sr(args, config, common.resolve_sft(args))
    source = common.photo_folders(args.hr) if args.hr else None
    return run(config.mine, flux2sr, Path(args.out), args.seed, args.resume, source, scorer, args.preset)


if __name__ == "__main__":
    main()
