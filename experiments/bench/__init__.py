"""foa-jax against PyTorch eager (diffusers + peft) on this CPU: same weights, same inputs, float32.

    python -m experiments.bench [--only transformer,lora_step,sampler,dpo_step,flux2_dev] [--repeats 5]
                                [--processes 2] [--out runs/bench] [--wait-idle SECONDS]

Sections (one module each):
- `transformer`: forward and forward+backward (gradient of an MSE loss w.r.t. every weight) of the `tiny` preset's
  training shape and of the small config (hidden 512 = 4 heads x 128, 2 double + 4 single blocks, 1024 target +
  1024 reference + 64 text tokens); compile time of the small config's forward+backward at depth 2 and 16 (scanned
  stacks keep it flat).
- `steps` (`lora_step`, `dpo_step`): one Flux2SR LoRA train step on the small config (rank 16, `attn+add`): flow
  matching + Charbonnier + LPIPS-VGG through the tiny VAE decoder at 256 px, clipped AdamW; and one Diffusion-DPO
  step (`foa_jax.dpo.dpo_loss`: policy LoRA on winner and loser with shared t and noise, frozen reference). The
  torch side is `ports.torch_steps`. JAX's peak memory includes the heap reserve `common.train_loop` makes too.
- `sampler`: candidates per second of the 16-step Euler sampler with one reference image (`foa_jax.sr`) against
  `Flux2Pipeline.__call__`.
- `flux2_dev`: the real preset on paper: parameter count and the compiled memory of a bf16 forward.

The rest: `workloads` (configs, identical weights and inputs), `measure` (warm-up until a call no longer grows the
heap, medians, memory, the machine's load), `workers` (each framework alone in `--processes` fresh processes per
framework, alternating JAX, torch, torch, JAX, ...), `stats` (each JAX/torch ratio's 95 % two-stage bootstrap
interval and the verdict on the target JAX <= 1.0x torch: met, missed or undecided), `report` (the table), `cli`.

Weights and inputs are resident in both frameworks before timing (torch tensors; JAX device arrays, as the trainers
hold them); torch forwards run under `torch.no_grad`; JAX's first call includes compilation and is reported
separately. Every comparison also prints how far apart the two frameworks' results are, so a ratio is never between
two different computations. Other jobs sharing the CPU distort the ratios, torch's far more than JAX's: before each
section the CPU use of other jobs and the hypervisor's steal are recorded, and `--wait-idle SECONDS` waits for the
other jobs to leave. Results: a table on stdout, JSON in `<out>/bench.json`.
"""
