"""The main job: Flux2SR -> candidate mining -> one DPO adapter per profile -> evaluation -> report.

    python -m experiments.dpo                        # the same as python -m experiments.pipeline
    python -m experiments.pipeline [--retrain] [--out runs/foa] [section.field=value ...]
    python -m experiments.pipeline --preset flux2-dev --transformer T --vae V --prompt-embedding P --hr DIR \\
        [--iqa-weights DIR] [--eval-lr DIR --eval-hr DIR]

The tiny preset starts from the shipped tiny VAE and Flux2SR (`experiments/assets/tiny`, made by the commands its
manifest names); `--retrain` trains both here first (`vae`, `sft` under `--out`), as the real presets always do
(`sft` on the converted base). Then `mine`, `dpo/{faithful,aesthetic,hybrid}`, `eval` and `report/report.md`, whose
path is printed last. Each stage is a function call over the previous stage's files; a stage whose output is
complete is reused and a stage with partial output resumes, so a killed job is rerun with the same command.
Overrides name the stage first: `mine.inputs=128`, `dpo.optim.lr=3e-4`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from experiments import artifacts, common, report
from experiments import dpo as dpo_stage
from experiments import evaluate as evaluate_stage
from experiments import mine as mine_stage
from experiments import sft as sft_stage
from experiments import vae as vae_stage
from foa_jax import rewards
from ports import iqa, weights


class Timings:
    """Wall time of each stage of this session and whether its output was reused."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def stage(self, name: str, folder: Path, done: bool, work):
        t0 = time.perf_counter()
        print(f"== {name}: " + (f"reusing {folder}" if done else f"running into {folder}"), flush=True)
        result = None if done else work()
        self.rows[name] = {"seconds": time.perf_counter() - t0, "reused": done, "folder": str(folder)}
        return result


def _weights_done(folder: Path) -> bool:
    try:
        weights.verify(folder)
    except (weights.CorruptWeights, OSError):
        return False
    return True


def _pairs_done(mine_dir: Path, flux2sr: common.Flux2SR, preset: str) -> bool:
    """Every profile's pairs exist, are whole and were mined with this Flux2SR and preset."""
    try:
        for profile in rewards.PROFILES:
            artifacts.load_pairs(artifacts.pairs_path(mine_dir, profile), flux2sr.fingerprint, preset)
    except (FileNotFoundError, artifacts.CorruptArtifact):
        return False
    except ValueError as err:
        raise ValueError(f"{mine_dir} holds pairs of another model: {err}. Move it away to mine again.") from err
    return True


def train_flux2sr(args, config, root: Path, timings: Timings) -> Path:
    """The VAE (tiny preset) and Flux2SR stages; returns Flux2SR's weights folder."""
    vae_flag = args.vae
    if config.vae is not None and vae_flag is None:
        vae_weights = root / "vae" / "weights"
        timings.stage("vae", root / "vae", _weights_done(vae_weights),
                      lambda: vae_stage.run(config.vae, root / "vae", args.seed, resume=True))
        vae_flag = vae_weights
    sft_weights = root / "sft" / "weights"

    def train():
        flags = _with(args, vae=vae_flag)
        models = common.load_models(flags, config, for_training=True)
        source = common.photo_folders(args.hr) if args.hr else None
        return sft_stage.run(config.sft, models, common.prompt_meta(args, models.prompt), root / "sft", args.seed,
                             resume=True, source=source, vae_provenance=common.vae_provenance(flags, config))

    timings.stage("sft", root / "sft", _weights_done(sft_weights), train)
    return sft_weights


def _with(args, **changes):
    """A copy of the parsed flags with some changed (the stages read flags, never each other's state)."""
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def run(args, config) -> Path:
    """Every stage under `args.out`, reusing finished ones; returns the report file."""
    root = Path(args.out)
    timings = Timings()
    if args.retrain or config.preset != "tiny":
        sft_folder = train_flux2sr(args, config, root, timings)
    else:
        sft_folder = common.resolve_sft(args)
        if sft_folder is None and not args.random_init:
            raise FileNotFoundError(f"the shipped tiny weights are missing from {common.SHIPPED_TINY}: pass --retrain "
                                    f"to train them here")
    flux2sr = common.load_flux2sr(args, config, sft_folder)
    scorer = iqa.Scorer(config.mine.metric_names, weights_dir=args.iqa_weights)
    mine_dir = root / "mine"
    source = common.photo_folders(args.hr) if args.hr else None
    timings.stage("mine", mine_dir, _pairs_done(mine_dir, flux2sr, config.preset),
                  lambda: mine_stage.run(config.mine, flux2sr, mine_dir, args.seed, resume=True, source=source,
                                         scorer=scorer, preset=config.preset))
    adapters = {}
    for profile in rewards.PROFILES:
        folder = root / "dpo" / profile
        adapters[profile] = folder / dpo_stage.ADAPTER

        def train(profile=profile, folder=folder):
            pairs = artifacts.load_pairs(artifacts.pairs_path(mine_dir, profile), flux2sr.fingerprint, config.preset)
            return dpo_stage.run(config.dpo, flux2sr, pairs, profile, folder, args.seed, resume=True,
                                 preset=config.preset)

        timings.stage(f"dpo {profile}", folder, adapters[profile].is_file(), train)
    eval_dir = root / "eval"

    def evaluate():
        from foa_jax.data.dataset import paired_folders

        if args.eval_lr is not None:
            pairs, name = paired_folders(args.eval_lr, args.eval_hr), f"{args.eval_lr} / {args.eval_hr}"
        else:
            held = config.eval.held_out
            pairs, name = evaluate_stage.held_out_pairs(held), (f"bundled held-out photos ({held.crops} crops of "
                                                                f"{held.size} px each)")
        eval_scorer = evaluate_stage.make_scorer(config.eval, args.iqa_weights)
        eval_dir.mkdir(parents=True, exist_ok=True)
        evaluate_stage.evaluate(eval_dir, flux2sr.models, evaluate_stage.methods_for(flux2sr, adapters), pairs,
                                dataclasses.replace(config.eval, seed=args.seed), eval_scorer,
                                name + (" — RANDOM model" if flux2sr.random else ""))

    timings.stage("eval", eval_dir, False, evaluate)
    return report.write(root, timings.rows, flux2sr, sft_folder)


def parser():
    p = common.parser(__doc__.split("\n\n")[0], "runs/foa")
    p.add_argument("--retrain", action="store_true", help="tiny preset: train the VAE and Flux2SR here instead of "
                   "using the shipped ones")
    p.add_argument("--hr", type=Path, nargs="+", help="HR training folders for sft and mine (default: bundled photos)")
    p.add_argument("--iqa-weights", type=Path, help="pyiqa weights folder for the learned metrics")
    p.add_argument("--eval-lr", type=Path, help="LR test folder for evaluation (with --eval-hr)")
    p.add_argument("--eval-hr", type=Path, help="HR test folder for evaluation (with --eval-lr)")
    return p


def main(argv=None) -> Path:
    p = parser()
    args, config = common.parse(p, argv, None)
    if (args.eval_lr is None) != (args.eval_hr is None):
        p.error("--eval-lr and --eval-hr go together")
    path = run(args, config)
    print(f"report: {path.absolute()}")
    return path


if __name__ == "__main__":
    main()
