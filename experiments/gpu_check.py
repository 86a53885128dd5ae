"""One accelerator check on one GPU: parity with the CPU, the attention kernels, a full-width step.

    python -m experiments.gpu_check [--out gpu_check.json] [--steps 10]

Prints one table (and writes it as JSON to --out):
- parity: the tiny preset's transformer (with a LoRA) and VAE (encode -> decode), float32 at "highest" matmul
  precision, with the accelerator's default kernels on the accelerator against the "chunked" + "cpu" kernels on the
  CPU: the largest difference relative to the largest output;
- attention: "xla" (float32) and "cudnn" (bf16) against "chunked" (float32) on the same inputs, output and gradients,
  at FLUX.2-dev's 512² SFT shape (2,560 tokens, 48 heads of 128), and the time of a forward + backward of each;
- the SFT LoRA step at FLUX.2-dev width (inner dim 6144, 48 heads x 128) with 1 double and 2 single blocks, bf16,
  the flux2-dev preset's SFT settings (remat, LoRA, loss: flow matching + Charbonnier + LPIPS-VGG through the
  real-size VAE; random weights), at 512² HR (1,024 target + 1,024 reference + 512 text tokens): compile time,
  seconds per step (median after a warm-up), achieved TFLOP/s from the analytic model FLOPs (`foa_jax.flops`), peak
  device memory.
On a host without an accelerator only the small parts run (parity then compares the "xla" + "reference" kernels
with the "chunked" + "cpu" ones on the CPU, attention runs at a small shape) and the table says so. It needs no
weights, no data and nothing from `ports`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import configs
from foa_jax import flops, sampling, sr, train
from foa_jax import lora as lora_lib
from foa_jax.models import flux2, kernels, lpips, vae

ATTENTION_SHAPE = {"accelerator": (1, 2560, 48, 128), "cpu": (1, 256, 4, 128)}  # (B, S, H, Dh)


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _timed(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls after one warm-up, waiting for the results."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity_rows(device, cpu) -> list[dict]:
    """The tiny transformer and VAE on `device` with its platform's kernels against the CPU's "cpu" kernels."""
    on_cpu = device.platform == "cpu"
    t_config = flux2.preset("tiny")
    v_config = vae.VAEConfig.preset("tiny")
    if on_cpu:  # the platform's kernels are the CPU's: compare the reference set instead
        t_config = t_config.replace(attention="xla", kernels="reference")
        v_config = v_config.replace(attention="xla", kernels="reference")
    cpu_t, cpu_v = (c.replace(attention="chunked", kernels="cpu") for c in (t_config, v_config))
    rng = np.random.default_rng(0)
    params = flux2.init(t_config, jax.random.key(0))
    adapter = jax.tree.map(lambda a: a + 0.01, lora_lib.init(params, lora_lib.LoRAConfig(rank=8), jax.random.key(1)))
    img_ids, txt_ids = sampling.image_ids((8, 8), [(8, 8)]), sampling.text_ids(16)
    x = rng.standard_normal((2, len(img_ids), t_config.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 16, t_config.joint_attention_dim)).astype(np.float32)
    t = np.asarray([0.25, 0.75], np.float32)
    v_params = vae.init(v_config, jax.random.key(2))
    images = rng.uniform(-1, 1, (1, 64, 64, v_config.in_channels)).astype(np.float32)

    def transformer(config):
        return jax.jit(lambda p, a, x, c: flux2.apply(p, config, x, c, t, img_ids, txt_ids, jnp.ones(2), lora=a,
                                                      lora_scale=1.0))

    def autoencoder(config):
        return jax.jit(lambda p, x: vae.decode(p, config, vae.encode(p, config, x)))

    rows = []
    with jax.default_matmul_precision("highest"):
        for name, (make, config, cpu_config, args) in {
            "tiny transformer (LoRA), float32": (transformer, t_config, cpu_t, (params, adapter, x, ctx)),
            "tiny VAE encode -> decode, float32": (autoencoder, v_config, cpu_v, (v_params, images)),
        }.items():
            got = make(config)(*jax.device_put(args, device))
            want = make(cpu_config)(*jax.device_put(args, cpu))
            rows.append({"check": f"parity: {name}", "value": _relative(got, want), "unit": "max |diff| / max |CPU|",
                         "note": f"{device.platform} {config.attention}+{config.kernels} vs cpu chunked+cpu"})
    return rows


def attention_rows(device, repeats: int) -> list[dict]:
    """"xla" and "cudnn" against "chunked" (float32) at one shape: relative error of the output and gradients, and
    the seconds of a forward + backward."""
    on_cpu = device.platform == "cpu"
    shape = ATTENTION_SHAPE["cpu" if on_cpu else "accelerator"]
    rng = np.random.default_rng(3)
    q, k, v = (jax.device_put(rng.standard_normal(shape).astype(np.float32), device) for _ in range(3))
    weights = jax.device_put(rng.standard_normal((*shape[:2], shape[2] * shape[3])).astype(np.float32), device)

    def value_and_grads(impl, dtype):
        def functional(q, k, v):
            out = kernels.attention(q, k, v, impl)
            return jnp.sum(out.astype(jnp.float32) * weights), out

        step = jax.jit(jax.value_and_grad(functional, argnums=(0, 1, 2), has_aux=True))
        args = tuple(a.astype(dtype) for a in (q, k, v))
        (_, out), grads = step(*args)
        return [out, *grads], _timed(step, *args, repeats=repeats)

    want, chunked_seconds = value_and_grads("chunked", jnp.float32)
    rows = [{"check": f"attention chunked (float32) {shape}", "value": chunked_seconds * 1e3,
             "unit": "ms forward+backward", "note": "the reference of the rows below"}]
    impls = [("xla", jnp.float32)] + ([] if on_cpu else [("cudnn", jnp.bfloat16)])
    for impl, dtype in impls:
        got, seconds = value_and_grads(impl, dtype)
        error = max(_relative(g, w) for g, w in zip(got, want))
        rows.append({"check": f"attention {impl} ({jnp.dtype(dtype).name}) vs chunked", "value": error,
                     "unit": "max relative error (output, dq, dk, dv)", "note": f"{seconds * 1e3:.1f} ms fwd+bwd"})
    if on_cpu:
        rows.append({"check": "attention cudnn (bfloat16) vs chunked", "value": None, "unit": "",
                     "note": "skipped: no accelerator"})
    return rows


def sft_step_rows(device, repeats: int) -> list[dict]:
    """The SFT LoRA step at FLUX.2-dev width, 1 double + 2 single blocks, bf16, 512² HR, random weights."""
    preset = configs.get("flux2-dev")
    sft = preset.sft
    t_config = flux2.preset(preset.transformer, num_layers=1, num_single_layers=2, dtype="bfloat16", remat=sft.remat)
    v_config = vae.VAEConfig.preset(preset.vae_model)
    grid, text = (32, 32), 512
    rng = np.random.default_rng(4)
    with jax.default_device(device):
        base = jax.jit(flux2.init, static_argnums=(0, 2))(t_config, jax.random.key(0), jnp.bfloat16)
        adapter = lora_lib.init(base, sft.lora, jax.random.key(1))
        lpips_params = jax.tree.map(
            lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), jnp.float32),
            lpips.param_shapes(sft.loss.lpips_net))
        prompt = jnp.asarray(rng.standard_normal((1, text, t_config.joint_attention_dim)), jnp.bfloat16)
        models = sr.Models(base, vae.init(v_config, jax.random.key(2)), prompt, t_config, v_config)
        state = train.init_state(adapter, sft.optim, jax.random.key(3), device)
        channels, size = t_config.in_channels, grid[0] * v_config.token_factor
        batch = {"z": rng.standard_normal((1, 1, grid[0] * grid[1], channels)).astype(np.float32),
                 "cond": rng.standard_normal((1, 1, grid[0] * grid[1], channels)).astype(np.float32),
                 "hr": rng.uniform(size=(1, 1, size, size, 3)).astype(np.float32)}
        frozen = jax.device_put({"models": models, "lpips": lpips_params}, device)
        batch = jax.device_put(batch, device)
    step = train.make_step(sr.sft_loss("lora", sft.loss, grid, sft.guidance, sft.lora.scale), sft.optim)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    model_flops = flops.sft_step(t_config, v_config, sft.lora, grid, text, sft.loss.lpips_net).total
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    shape = (f"inner {t_config.inner_dim} = {t_config.num_attention_heads} x {t_config.attention_head_dim}, 1 double "
             f"+ 2 single, bf16, remat {t_config.remat}, attention {t_config.attention}, "
             f"loss {float(metrics['loss']):.3f}")
    return [
        {"check": "SFT LoRA step at FLUX.2-dev width, 512² HR: compile", "value": compile_seconds, "unit": "s",
         "note": shape},
        {"check": "SFT LoRA step: time", "value": seconds, "unit": "s per step",
         "note": f"median of {repeats} after a warm-up"},
        {"check": "SFT LoRA step: achieved", "value": model_flops / seconds / 1e12, "unit": "TFLOP/s",
         "note": f"{model_flops:.3e} model FLOPs per step"},
        {"check": "SFT LoRA step: peak device memory", "value": None if peak is None else peak / 2**30,
         "unit": "GiB", "note": "memory_stats peak_bytes_in_use"},
    ]


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_rows(header: str, rows: list[dict]) -> str:
    lines = [header, "", "| check | value | unit | note |", "|---|---:|---|---|"]
    lines += [f"| {r['check']} | {_cell(r['value'])} | {r['unit']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    p.add_argument("--steps", type=int, default=10, help="timed calls of each timed program")
    args = p.parse_args(argv)
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    on_cpu = device.platform == "cpu"
    t_default = flux2.preset("flux2-dev", dtype="bfloat16")
    header = (f"gpu_check on {device.device_kind} ({device.platform}), jax {jax.__version__}; FLUX.2-dev bf16 "
              f"defaults here: {t_default.describe()}")
    rows = parity_rows(device, cpu) + attention_rows(device, args.steps)
    if on_cpu:
        header += "\nno accelerator: only the small parts ran (the FLUX.2-dev-width SFT step needs one)"
        rows.append({"check": "SFT LoRA step at FLUX.2-dev width", "value": None, "unit": "",
                     "note": "skipped: no accelerator"})
    else:
        rows += sft_step_rows(device, args.steps)
    print(format_rows(header, rows))
    table = {"header": header, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
