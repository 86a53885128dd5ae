"""The bench's results as comparisons (both medians, the ratio's interval, the verdict, how far apart the two
frameworks' results are) and as the table printed at the end."""

from __future__ import annotations

from experiments.bench.stats import ratio_interval, verdict


def comparisons(results: dict) -> list[dict]:
    """Every JAX-against-torch timing in `results`: name, both medians, the ratio's interval, its verdict, and how
    far apart the two frameworks' results are."""
    rows = []

    def add(name, jax_timing, torch_timing, agreement):
        interval = ratio_interval(*(t.get("process_ms", t["all_ms"]) for t in (jax_timing, torch_timing)))
        rows.append({"name": name, "jax_ms": jax_timing["median_ms"], "torch_ms": torch_timing["median_ms"],
                     "interval": interval, "verdict": verdict(interval), "agreement": agreement})

    for work in ("tiny", "small"):
        if work not in results.get("transformer", {}):
            continue
        row = results["transformer"][work]
        add(f"transformer {work} forward", row["jax_fwd"], row["torch_fwd"], f"max|Δout| {row['max_abs_diff_out']:.1e}")
        add(f"transformer {work} forward+backward", row["jax_fwd_bwd"], row["torch_fwd_bwd"],
            f"loss {row['loss_jax']:.6f} vs {row['loss_torch']:.6f}")
    for section in ("lora_step", "dpo_step"):
        if section in results:
            row = results[section]
            processes = len(row["jax"].get("process_ms", [None]))
            add(section + (f" ({processes} proc.)" if processes > 1 else ""), row["jax"], row["torch"],
                f"loss {row['jax']['loss']:.6f} vs {row['torch']['loss']:.6f}, grad norm "
                f"{row['jax']['grad_norm']:.4g} vs {row['torch']['grad_norm']:.4g}")
    if "sampler" in results:
        row = results["sampler"]
        add(f"sampler ({row['candidates']} cand. x {row['steps']} steps)", row["jax"], row["torch"],
            f"max|Δlatents| {row['max_abs_diff_latents']:.1e}")
    return rows


def table(results: dict) -> list[str]:
    """One line per comparison: JAX ms, torch ms, JAX/torch (below 1 = JAX faster) with its 95 % bootstrap interval
    and whether the target is met, how far apart the results are; then compile times, memory and flux2-dev."""
    lines = [f"{'section':<38}{'JAX':>10}{'torch':>10}{'JAX/torch':>10}{'95% interval':>15}  {'<= 1.0x':<10} "
             f"agreement"]
    for c in comparisons(results):
        i = c["interval"]
        span = "" if i["low"] is None else f"[{i['low']:.2f}, {i['high']:.2f}]"
        lines.append(f"{c['name']:<38}{c['jax_ms']:>7.0f} ms{c['torch_ms']:>7.0f} ms{i['ratio']:>9.2f}x{span:>15}  "
                     f"{c['verdict']:<10} {c['agreement']}")
    lines += _compile_lines(results) + _memory_lines(results) + _sampler_lines(results) + _flux2_dev_lines(results)
    return lines


def _compile_lines(results: dict) -> list[str]:
    if "compile" not in results.get("transformer", {}):
        return []
    c = results["transformer"]["compile"]
    return [f"{'compile small rolled, depth 2/16':<38}{c['depth_2_s']:>8.1f} s{c['depth_16_s']:>8.1f} s"
            f"  (JAX at depth 2 | depth 16)"]


def _memory_lines(results: dict) -> list[str]:
    lines = []
    for section in ("lora_step", "dpo_step"):
        if section in results:
            jax_row, torch_row = results[section]["jax"], results[section]["torch"]
            lines.append(f"{section + ' peak RSS increase':<38}{jax_row['rss_increase_mib']:>6.0f} MiB"
                         f"{torch_row['rss_increase_mib']:>6.0f} MiB"
                         f"{jax_row['rss_increase_mib'] / torch_row['rss_increase_mib']:>9.2f}x  "
                         f"peak RSS {jax_row['rss_peak_steps_mib']:.0f} vs {torch_row['rss_peak_steps_mib']:.0f} "
                         f"MiB; XLA plan {sum(jax_row.get('xla_gib', {}).values()):.2f} GiB, heap reserved "
                         f"{jax_row.get('reserved_mib', 0):.0f} MiB")
    return lines


def _sampler_lines(results: dict) -> list[str]:
    if "sampler" not in results:
        return []
    row = results["sampler"]
    return [f"{'  candidates/s (JAX/torch = speed-up)':<38}{row['jax']['candidates_per_s']:>10.3f}"
            f"{row['torch']['candidates_per_s']:>10.3f}"
            f"{row['jax']['candidates_per_s'] / row['torch']['candidates_per_s']:>9.2f}x"]


def _flux2_dev_lines(results: dict) -> list[str]:
    if "flux2_dev" not in results:
        return []
    row = results["flux2_dev"]
    lines = [f"flux2-dev: {row['params']:,} parameters ({row['bf16_gib']:.2f} GiB bf16)"]
    if "memory_gib" in row:
        m = row["memory_gib"]
        lines.append(f"  bf16 forward, batch 1, 8192 image + 512 text tokens, XLA CPU plan: arguments "
                     f"{m['argument']:.2f} GiB, temp {m['temp']:.2f} GiB (of which a float32 copy of the weights "
                     f"{2 * row['bf16_gib']:.2f} GiB, the rest {row['temp_beyond_f32_weight_copy_gib']:.2f} GiB)")
    return lines
