"""FoA-SR profile DPO: one LoRA per profile trained on mined winner–loser pairs, against the frozen Flux2SR.

    python -m experiments.dpo                                   # the main job (experiments.pipeline), tiny preset
    python -m experiments.dpo --profile faithful [--pairs runs/foa/mine] [--sft WEIGHTS] [--out DIR] [field=value ...]

With `--profile`, one adapter is trained on the pairs `experiments.mine` wrote for that profile: the policy is a LoRA
initialised from the Flux2SR adapter (a fresh, exactly-zero LoRA when Flux2SR trained the full transformer, as the
tiny preset does), the reference is Flux2SR frozen; AdamW, one jitted donated step, checkpoints, `--resume`, JSON-line
metrics (loss, implicit accuracy, Δ, reward margin). Without `--profile` this command is the main job: every stage in
turn (see `experiments.pipeline`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import artifacts, common
from experiments.configs.schema import DPOStageConfig
from foa_jax import lora as lora_lib
from foa_jax import rewards, sr, train
from ports import lora_io

ADAPTER = Path("weights") / "lora.safetensors"


def pair_batch(pairs: dict, seed: int, step: int, config: DPOStageConfig) -> dict:
    """The step's pairs, shaped (grad_accum, batch, N, C)."""
    n = config.optim.grad_accum
    index = train.batch_indices(seed, step, len(pairs["gap"]), n * config.batch)
    return {k: pairs[k][index].reshape(n, config.batch, *pairs[k].shape[1:]) for k in ("z_w", "z_l", "cond")}


def run(config: DPOStageConfig, flux2sr: common.Flux2SR, pairs: dict, profile: str, out: Path, seed: int = 0,
        resume: bool = False, preset: str = "tiny", report=print) -> Path:
    """Train one profile adapter on `pairs` (from `artifacts.load_pairs`); returns `out/weights/lora.safetensors`."""
    if profile not in rewards.PROFILES:
        raise ValueError(f"--profile: expected one of {rewards.PROFILES}, got {profile!r}")
    if len(pairs["gap"]) == 0:
        raise ValueError(f"the {profile} pairs file holds no pairs (every gap was below τ = "
                         f"{pairs['meta']['reward']['gap_threshold']}): mine more inputs or lower reward.gap_threshold")
    grid = tuple(pairs["meta"]["grid"])
    if grid[0] * grid[1] != pairs["z_w"].shape[1]:
        raise ValueError(f"pairs_{profile}: grid {grid} does not hold {pairs['z_w'].shape[1]} tokens")
    lora_config = flux2sr.lora_config or config.lora
    out = common.prepare_out(out, resume, config)

    models = flux2sr.models
    t_config = models.transformer_config.replace(dtype="bfloat16" if config.bf16 else "float32", remat=config.remat)
    base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), models.transformer) if config.bf16 else models.transformer
    models = models.replace(transformer=base, transformer_config=t_config)
    reference = flux2sr.adapter
    policy = reference if reference is not None else lora_lib.init(base, lora_config, jax.random.PRNGKey(seed))
    frozen = {"models": models, "reference": reference}
    optim = config.optim.for_steps(config.steps)
    state = train.init_state(policy, optim, jax.random.PRNGKey(seed))  # copies: the reference stays
    state, checkpoints, metrics = common.resume_or_start(out, state, resume, report)
    report(f"DPO {profile}: {len(pairs['gap'])} pairs (mean gap {np.mean(pairs['gap']):.3f}), β {config.dpo.beta}, "
           f"LoRA rank {lora_config.rank} on {len(lora_lib.target_modules(base, lora_config))} module stacks, "
           f"reference {'the Flux2SR LoRA' if reference is not None else 'the Flux2SR transformer'}")
    step_fn = train.make_step(sr.dpo_loss(config.dpo, grid, config.guidance, lora_config.scale), optim)
    data = {k: np.asarray(pairs[k], np.float32) for k in ("z_w", "z_l", "cond")}
    data["gap"] = pairs["gap"]
    state = common.train_loop(step_fn, state, frozen, lambda step: pair_batch(data, seed, step, config),
                              config.steps, checkpoints, metrics, config.checkpoint_every, f"dpo {profile}",
                              ("loss", "accuracy"))
    file = lora_io.export_lora(out / ADAPTER, jax.device_get(state["params"]), lora_config,
                               metadata={"foa_profile": profile, "foa_preset": preset,
                                         "foa_sft_fingerprint": flux2sr.fingerprint})
    report(f"wrote {file}")
    return file


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(word == "--profile" or word.startswith("--profile=") for word in argv):
        from experiments import pipeline  # without --profile this command is the main job

        return pipeline.main(argv)
    p = common.parser(__doc__.split("\n\n")[0], None)
    p.add_argument("--profile", choices=rewards.PROFILES, required=True, help="the profile whose adapter to train")
    p.add_argument("--pairs", type=Path, help="experiments.mine output folder (default: runs/foa/mine)")
    p.add_argument("--sft", type=Path, help="Flux2SR weights folder (tiny: the shipped one)")
    args, config = common.parse(p, argv, "dpo")
    out = args.out or Path("runs/foa/dpo") / args.profile
    pairs_dir = args.pairs or Path("runs/foa/mine")
    flux2sr = common.load_flux2sr(args, config, common.resolve_sft(args))
    pairs = artifacts.load_pairs(artifacts.pairs_path(pairs_dir, args.profile), flux2sr.fingerprint, args.preset)
    return run(config.dpo, flux2sr, pairs, args.profile, out, args.seed, args.resume, args.preset)


if __name__ == "__main__":
    main()
