"""On-paper plan of a preset at full scale: parameters, memory of the compiled steps, model FLOPs and MFU.

    python -m experiments.plan --preset flux2-dev [--sizes 512 1024] [--base-dtype bfloat16|int8|float8_e4m3fn]
        [--steps sft dpo sample] [--depth K] [--out plan.json]

Nothing is allocated. The SFT LoRA step, a DPO micro-step (one micro-batch of the accumulated step, with its
optimizer update) and one sampler step are built from the library (`sr.sft_loss`, `sr.dpo_loss`, `train.make_step`,
`sampling.sample`) with the stage presets' settings (LoRA, loss, batch, bf16, remat), compiled ahead of time on this
host for abstract inputs (`jax.ShapeDtypeStruct`), and XLA's memory analysis of each program is printed beside the
analytic model FLOPs (`foa_jax.flops`), the MFU the paper's step times imply on one H200 and the step times 45 % and
60 % MFU would give. The frozen base may be stored in 8 bits (`--base-dtype`, `foa_jax.quant`).

Memory is XLA:CPU's, the only compiler here, for the kernels a GPU runs: "reference" operations, the VAE's attention
"xla", and the transformer's attention compiled as "chunked", which like cuDNN's flash attention never holds a whole
score matrix (XLA:CPU cannot compile cuDNN calls). The block stacks are scanned, so a full-depth compile holds one
block per stack; `--depth K` compiles K and 2K blocks of each stack instead and extrapolates linearly per stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import configs
from foa_jax import flops, quant, sampling, sr, train
from foa_jax import lora as lora_lib
from foa_jax.models import flux2, lpips, vae

PEAK_FLOPS = 989e12  # one H200, bf16 dense
PAPER_SECONDS = {"sft": 0.94, "dpo": 3.6}  # the paper's SFT step and DPO micro-step on one H200
TARGET_MFU = (0.45, 0.60)
STEPS = ("sft", "dpo", "sample")


def stage_settings(preset: str) -> tuple:
    """(SFT stage config, DPO stage config, transformer preset, VAE preset) of the preset's config module: LoRA, loss,
    optimizer, batch, dtype and remat as the stages run them."""
    config = configs.get(preset)
    sft = dataclasses.replace(config.sft, optim=config.sft.optim.for_steps(config.sft.steps))
    dpo = dataclasses.replace(config.dpo, optim=config.dpo.optim.for_steps(config.dpo.steps))
    return sft, dpo, config.transformer, config.vae_model


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to compile: the transformer and VAE presets, HR side in pixels, text tokens, how the base is stored,
    block counts."""

    transformer: str
    vae_model: str
    size: int
    text_tokens: int = 512
    base_dtype: str = "bfloat16"
    layers: tuple[int, int] | None = None  # (double, single) blocks; None: the preset's

    def __post_init__(self):
        if self.base_dtype not in quant.BASE_DTYPES:
            raise ValueError(f"Plan.base_dtype must be one of {quant.BASE_DTYPES}, got {self.base_dtype!r}")


def _shapes(fn, *args):
    return jax.eval_shape(fn, *args)


def storage(base_dtype: str, bf16: bool) -> str:
    """The dtype the frozen base is stored in: the 8-bit code format, else the stage's own dtype ("bfloat16", the
    unquantised base, is float32 where the stage computes in float32, as the tiny preset's do)."""
    return base_dtype if base_dtype in quant.CODE_MAX else ("bfloat16" if bf16 else "float32")


def abstract_base(t_config: flux2.Flux2Config, base_dtype: str, bf16: bool) -> dict:
    """The frozen base as the stage holds it (bf16 or float32 as the stage computes), quantised to 8 bits if asked."""
    base = _shapes(lambda: flux2.init(t_config, jax.random.key(0), jnp.bfloat16 if bf16 else jnp.float32))
    return base if base_dtype not in quant.CODE_MAX else _shapes(lambda p: quant.quantize(p, base_dtype), base)


def abstract_models(plan: Plan, remat: str, bf16: bool) -> sr.Models:
    """Flux2SR's models as ShapeDtypeStructs: the transformer as `abstract_base` stores it, the VAE in float32, the
    prompt."""
    depth = {} if plan.layers is None else dict(num_layers=plan.layers[0], num_single_layers=plan.layers[1])
    t_config = flux2.preset(plan.transformer, dtype="bfloat16" if bf16 else "float32", remat=remat,
                            attention="chunked", kernels="reference", **depth)
    v_config = vae.VAEConfig.preset(plan.vae_model).replace(attention="xla", kernels="reference")
    base = abstract_base(t_config, plan.base_dtype, bf16)
    prompt = jax.ShapeDtypeStruct((1, plan.text_tokens, t_config.joint_attention_dim), jnp.dtype(t_config.dtype))
    return sr.Models(base, _shapes(lambda: vae.init(v_config, jax.random.key(1))), prompt, t_config, v_config)


def _grid(models: sr.Models, size: int) -> tuple[int, int]:
    f = models.vae_config.token_factor
    if size % f:
        raise ValueError(f"--sizes: {size} px is not a multiple of {f} (the VAE's pixels per token)")
    return size // f, size // f


def _tokens(shape_lead, grid, channels):
    return jax.ShapeDtypeStruct((*shape_lead, grid[0] * grid[1], channels), jnp.float32)


def sft_program(plan: Plan, settings):
    """(jitted SFT LoRA step, its abstract arguments, analytic FLOPs)."""
    models = abstract_models(plan, settings.remat, settings.bf16)
    grid = _grid(models, plan.size)
    loss = sr.sft_loss("lora", settings.loss, grid, settings.guidance, settings.lora.scale)
    adapter = _shapes(lambda p: lora_lib.init(p, settings.lora, jax.random.key(2)), models.transformer)
    state = _shapes(lambda a: train.init_state(a, settings.optim, jax.random.key(3)), adapter)
    lead = (settings.optim.grad_accum, settings.batch)
    channels = models.transformer_config.in_channels
    batch = {"z": _tokens(lead, grid, channels), "cond": _tokens(lead, grid, channels),
             "hr": jax.ShapeDtypeStruct((*lead, plan.size, plan.size, 3), jnp.float32)}
    frozen = {"models": models, "lpips": lpips.param_shapes(settings.loss.lpips_net)}
    pixels = settings.loss.lpips_net if settings.loss.uses_pixels else None
    count = flops.sft_step(models.transformer_config, models.vae_config, settings.lora, grid, plan.text_tokens,
                           pixels, settings.batch, settings.loss.pixel_samples) * settings.optim.grad_accum
    return train.make_step(loss, settings.optim), (state, frozen, batch), count


def dpo_program(plan: Plan, settings, sft_lora: lora_lib.LoRAConfig):
    """(jitted DPO step of one micro-batch, its abstract arguments, analytic FLOPs): the policy and the reference are
    the SFT adapter's shape, as in the pipeline."""
    models = abstract_models(plan, settings.remat, settings.bf16)
    grid = _grid(models, plan.size)
    optim = dataclasses.replace(settings.optim, grad_accum=1)
    loss = sr.dpo_loss(settings.dpo, grid, settings.guidance, sft_lora.scale)
    adapter = _shapes(lambda p: lora_lib.init(p, sft_lora, jax.random.key(2)), models.transformer)
    state = _shapes(lambda a: train.init_state(a, optim, jax.random.key(3)), adapter)
    channels = models.transformer_config.in_channels
    batch = {k: _tokens((1, settings.batch), grid, channels) for k in ("z_w", "z_l", "cond")}
    count = flops.dpo_micro_step(models.transformer_config, sft_lora, grid, plan.text_tokens, settings.batch)
    return train.make_step(loss, optim), (state, {"models": models, "reference": adapter}, batch), count


def sample_program(plan: Plan, settings, batch: int = 1):
    """(jitted single Euler step of `sampling.sample` with the SFT adapter, its abstract arguments, FLOPs)."""
    models = abstract_models(plan, settings.remat, settings.bf16)
    grid = _grid(models, plan.size)
    config = models.transformer_config
    adapter = _shapes(lambda p: lora_lib.init(p, settings.lora, jax.random.key(2)), models.transformer)
    ids, txt_ids = sampling.image_ids(grid, [grid]), sampling.text_ids(plan.text_tokens)
    guidance = settings.guidance if config.guidance_embeds else None

    def step(params, lora, latents, cond, prompt):
        prompt = jnp.broadcast_to(prompt, (latents.shape[0], *prompt.shape[1:]))
        schedule = jnp.asarray(sampling.sigmas(1, grid[0] * grid[1]))
        return sampling.sample(params, config, latents, prompt, ids, txt_ids, schedule, references=cond,
                               guidance=guidance, lora=lora, lora_scale=settings.lora.scale)

    tokens = _tokens((batch,), grid, config.in_channels)
    args = (models.transformer, adapter, tokens, tokens, models.prompt)
    return jax.jit(step), args, flops.sampler_step(config, grid, plan.text_tokens, batch, settings.lora)


def memory(program) -> dict:
    """XLA's memory analysis of a compiled program, in bytes, with the peak it implies (arguments + outputs not
    aliased to them + temporaries) and the compile time."""
    fn, args = program[0], program[1]
    start = time.perf_counter()
    stats = fn.lower(*args).compile().memory_analysis()
    out = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    out["compile_seconds"] = time.perf_counter() - start
    return out


def _program(step: str, plan: Plan, settings: tuple):
    sft_settings, dpo_settings = settings[:2]
    if step == "sft":
        return sft_program(plan, sft_settings)
    if step == "dpo":
        return dpo_program(plan, dpo_settings, sft_settings.lora)
    return sample_program(plan, sft_settings)


def extrapolated_memory(step: str, plan: Plan, settings: tuple, depth: int, full: tuple[int, int]) -> dict:
    """Memory at the preset's depth from compiles at (K, K), (2K, K) and (K, 2K) blocks: every figure is linear in
    each stack's depth (a scanned stack holds per block its weights and, for the backward, its saved inputs)."""
    k = depth
    measured = {layers: memory(_program(step, dataclasses.replace(plan, layers=layers), settings))
                for layers in ((k, k), (2 * k, k), (k, 2 * k))}
    base, more_double, more_single = measured[(k, k)], measured[(2 * k, k)], measured[(k, 2 * k)]
    out = {}
    for key in base:
        per_double = (more_double[key] - base[key]) / k
        per_single = (more_single[key] - base[key]) / k
        out[key] = base[key] + per_double * (full[0] - k) + per_single * (full[1] - k)
    out["compile_seconds"] = sum(m["compile_seconds"] for m in measured.values())
    out["extrapolated_from"] = [list(layers) for layers in measured]
    return out


def plan_table(preset: str, sizes, base_dtype: str, steps, depth: int | None, text_tokens: int) -> dict:
    """Everything the command prints, as one JSON-able dict."""
    settings = stage_settings(preset)
    sft_settings, _, transformer, vae_model = settings
    t_config = flux2.preset(transformer)
    base = jax.eval_shape(lambda: flux2.init(t_config, jax.random.key(0), jnp.bfloat16))
    adapter = jax.eval_shape(lambda p: lora_lib.init(p, sft_settings.lora, jax.random.key(1)), base)
    stored = abstract_base(t_config, base_dtype, sft_settings.bf16)  # as the SFT step holds it
    full = (t_config.num_layers, t_config.num_single_layers)
    factor = vae.VAEConfig.preset(vae_model).token_factor
    table = {"preset": preset, "base_dtype": base_dtype, "base_storage": storage(base_dtype, sft_settings.bf16),
             "parameters": flux2.param_count(t_config),
             "lora": {"rank": sft_settings.lora.rank, "targets": sft_settings.lora.targets,
                      "parameters": lora_lib.count(adapter)},
             "base_bytes": quant.nbytes(stored), "bf16_base_bytes": quant.nbytes(base),
             "remat": {"sft": settings[0].remat, "dpo": settings[1].remat}, "steps": []}
    for size in sizes:
        plan = Plan(transformer, vae_model, size, text_tokens, base_dtype)
        for step in steps:
            program = _program(step, plan, settings)
            mem = memory(program) if depth is None else extrapolated_memory(step, plan, settings, depth, full)
            model_flops = program[2].total
            grid_tokens = (size // factor) ** 2
            row = {"step": step, "size": size,
                   "tokens": {"target": grid_tokens, "reference": grid_tokens, "text": text_tokens},
                   "memory": mem, "model_flops": model_flops}
            if step in PAPER_SECONDS and size == 512:
                seconds = PAPER_SECONDS[step]
                row["paper_seconds"] = seconds
                row["paper_mfu"] = model_flops / (seconds * PEAK_FLOPS)
            row["seconds_at_mfu"] = {f"{m:.0%}": model_flops / (m * PEAK_FLOPS) for m in TARGET_MFU}
            table["steps"].append(row)
    return table


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def format_table(table: dict) -> str:
    lines = [
        f"{table['preset']}: {table['parameters']:,} parameters; base stored as {table['base_storage']}: "
        f"{_gib(table['base_bytes'])} GiB (bf16 {_gib(table['bf16_base_bytes'])} GiB); LoRA rank "
        f"{table['lora']['rank']} on {table['lora']['targets']}: {table['lora']['parameters']:,} parameters; remat "
        f"SFT {table['remat']['sft']}, DPO {table['remat']['dpo']}",
        "",
        "| step | HR px | tokens (target+ref+text) | args GiB | temp GiB | peak GiB | model TFLOP | paper s | "
        "paper MFU | s at 45% | s at 60% |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["steps"]:
        mem, tok = row["memory"], row["tokens"]
        paper = f"{row['paper_seconds']:.2f} | {row['paper_mfu']:.0%}" if "paper_seconds" in row else "- | -"
        lines.append(
            f"| {row['step']} | {row['size']}² | {tok['target']}+{tok['reference']}+{tok['text']} | "
            f"{_gib(mem['arguments'])} | {_gib(mem['temporaries'])} | {_gib(mem['peak'])} | "
            f"{row['model_flops'] / 1e12:.1f} | {paper} | {row['seconds_at_mfu']['45%']:.2f} | "
            f"{row['seconds_at_mfu']['60%']:.2f} |")
    lines += ["", f"MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s (one H200, bf16 dense); model FLOPs are matrix "
                  f"products only (foa_jax.flops); memory is XLA:CPU's analysis of the compiled step."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="flux2-dev", choices=sorted(configs.PRESETS))
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="HR sides in pixels")
    p.add_argument("--base-dtype", default="bfloat16", choices=quant.BASE_DTYPES,
                   help="storage of the frozen base (bfloat16: unquantised, in the stage's dtype)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--depth", type=int, help="compile K and 2K blocks per stack and extrapolate (default: full depth)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.depth is not None and args.depth < 1:
        p.error("--depth must be >= 1")
    table = plan_table(args.preset, args.sizes, args.base_dtype, args.steps, args.depth, args.text_tokens)
    print(format_table(table))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
