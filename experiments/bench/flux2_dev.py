"""The `flux2_dev` section: the real preset on paper, its parameter count and XLA's memory plan of a bf16 forward."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from foa_jax import sampling
from foa_jax.models import flux2


def bench_flux2_dev(tokens: tuple[int, int, int] = (4096, 4096, 512)) -> dict:
    """FLUX.2-dev on paper: parameter count, and XLA's memory plan of one bf16 forward at batch 1 (abstract
    parameters: nothing is allocated; compiling 56 scanned blocks takes a while)."""
    config = flux2.preset("flux2-dev", dtype="bfloat16")
    row = {"params": flux2.param_count(config), "bf16_gib": flux2.param_count(config) * 2 / 2**30,
           "tokens": {"target": tokens[0], "reference": tokens[1], "text": tokens[2]}}
    print(f"[flux2_dev] {row['params']:,} parameters = {row['bf16_gib']:.2f} GiB in bf16", flush=True)
    n = tokens[0] + tokens[1]
    img_ids = sampling.image_ids((64, 64), [(64, 64)])
    assert len(img_ids) == n
    txt_ids = sampling.text_ids(tokens[2])
    shapes = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0), jnp.bfloat16))
    args = (jax.ShapeDtypeStruct((1, n, config.in_channels), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, tokens[2], config.joint_attention_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32))
    start = time.perf_counter()
    compiled = jax.jit(lambda p, x, c, t, g: flux2.apply(p, config, x, c, t, img_ids, txt_ids, g)).lower(
        shapes, *args).compile()
    row["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is not None:
        row["memory_gib"] = {k: getattr(memory, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "temp")}
        # XLA's CPU backend runs bf16 dots in float32 and converts each whole stacked bf16 weight before the scan:
        # that float32 copy (2x the bf16 weights) is most of the temp; the rest is activations.
        row["temp_beyond_f32_weight_copy_gib"] = row["memory_gib"]["temp"] - 2 * row["bf16_gib"]
    print(f"[flux2_dev] bf16 forward at {n} image + {tokens[2]} text tokens compiled in {row['compile_s']:.1f} s; "
          f"memory (GiB): {row.get('memory_gib')}", flush=True)
    return row
