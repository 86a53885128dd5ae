"""The settings of every stage, as frozen dataclasses that validate themselves, and `Config`, one preset's whole tree.

The values live in the preset modules beside this one (`tiny.py`, `flux2_dev.py`, ...); the defaults here are the
full-scale ones (the paper's where it prints them, ours where it does not, said so in docs/method.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from foa_jax import dpo as dpo_lib
from foa_jax import lora as lora_lib
from foa_jax import losses, rewards, train
from foa_jax import nft as nft_lib
from foa_jax.data.dataset import DataConfig
from foa_jax.models import flux2, vae

MINING_DATA_SEED = 20_011  # mining crops and degradations differ from the SFT cache (seed 0) and the held-out crops
HELD_OUT_SEED = 10_007  # the bundled held-out crops' degradation seed
NFT_DATA_SEED = 30_011  # LucidNFT's training LR crops differ from the SFT cache and the mining inputs
CONSISTENCY_REWARD = "consistency"  # LucidConsistency(LR, SR); every other reward name is a no-reference metric
TARGETS = ("hr", "reference")
INITS = ("torch", "identity")


def _positive_ints(config, names) -> None:
    for key in names:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{key}: expected an int >= 1, got {value!r}")


@dataclass(frozen=True)
class HeldOut:
    """The bundled held-out photos' fixed crops (never trained on), degraded with their own seed: what the VAE stage,
    SFT validation and evaluation all measure on."""

    size: int = 256
    crops: int = 8  # per held-out photo
    seed: int = HELD_OUT_SEED

    def __post_init__(self):
        _positive_ints(self, ("size", "crops"))


@dataclass(frozen=True)
class VAEStageConfig:
    """Training the FLUX.2 VAE architecture as an autoencoder (the tiny preset has no pretrained one).

    Small crops, many per step: at equal pixels per step, 8 crops of 64 px reached 22.2 dB held out after 500 steps
    where 2 of 128 px reached 17.2 (docs/performance.md). `init="identity"` starts every residual branch at zero and
    scales the other kernels to keep the activations' variance (the torch default shrinks it by 3 per layer): the
    untrained network is then a chain of variance-keeping linear maps, which trained 4 dB further in 400 steps.
    """

    model: str = "tiny"  # the VAE preset trained
    init: str = "identity"
    batch: int = 8
    steps: int = 4000
    lambda_lpips: float = 0.1
    lpips_net: str = "alex"
    bn_samples: int = 256  # training crops whose latents set the BN statistics
    checkpoint_every: int = 500
    optim: train.OptimConfig = field(default_factory=lambda: train.OptimConfig(
        lr=1e-3, warmup=20, weight_decay=0.0, b2=0.99, clip_norm=1e6, schedule_kind="cosine", final_lr=1e-5))
    data: DataConfig = field(default_factory=lambda: DataConfig(gt_size=64, crops_per_image=8, hflip=True))
    held_out: HeldOut = field(default_factory=HeldOut)

    def __post_init__(self):
        vae.VAEConfig.preset(self.model)  # unknown presets fail here, listing the known ones
        _positive_ints(self, ("batch", "steps", "bn_samples", "checkpoint_every"))
        if self.init not in INITS:
            raise ValueError(f"VAEStageConfig.init must be one of {INITS}, got {self.init!r}")
        if self.lambda_lpips < 0 or self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"VAEStageConfig: lambda_lpips >= 0 and lpips_net 'vgg' or 'alex', got "
                             f"{self.lambda_lpips}, {self.lpips_net!r}")


@dataclass(frozen=True)
class SFTConfig:
    """Flux2SR training besides the model files: a LoRA on the frozen base (`mode="lora"`) or every transformer
    weight (`"full"`, the tiny preset, which has nothing pretrained to adapt).

    `target="reference"` is a diagnostic: the model learns to reproduce its reference tokens (the upsampled LR), so
    its samples should come close to bicubic; it shows the reference path works.
    """

    mode: str = "lora"
    target: str = "hr"
    lora: lora_lib.LoRAConfig = field(default_factory=lora_lib.LoRAConfig)
    loss: losses.SFTLossConfig = field(default_factory=losses.SFTLossConfig)
    optim: train.OptimConfig = field(default_factory=train.OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig.preset("full"))
    batch: int = 1
    samples: int = 50_000  # cached training pairs
    bf16: bool = True
    remat: str = "full"
    guidance: float = 1.0
    sample_steps: int = 16
    checkpoint_every: int = 1000
    validate: bool = True  # held-out samples and metrics at the end (off in tests)
    held_out: HeldOut = field(default_factory=lambda: HeldOut(size=512, crops=2))
    steps: int = 50_000

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"SFTConfig.mode must be 'lora' or 'full', got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"SFTConfig.target must be one of {TARGETS}, got {self.target!r}")
        _positive_ints(self, ("batch", "samples", "sample_steps", "checkpoint_every", "steps"))


@dataclass(frozen=True)
class MineConfig:
    """Candidate pools, scores and pairs.

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
        from ports import iqa

        object.__setattr__(self, "nested_pool_sizes", tuple(self.nested_pool_sizes))
        if not isinstance(self.pool_size, int) or self.pool_size < 2:
            raise ValueError(f"MineConfig.pool_size: a pool needs at least 2 candidates to have a winner and a loser, "
                             f"got {self.pool_size}")
        if any(not isinstance(k, int) or k < 2 for k in self.nested_pool_sizes):
            raise ValueError(f"MineConfig.nested_pool_sizes: every pool needs at least 2 candidates, got "
                             f"{self.nested_pool_sizes}")
        _positive_ints(self, ("inputs", "sample_steps", "batch"))
        if not isinstance(self.grid_inputs, int) or self.grid_inputs < 0:
            raise ValueError(f"MineConfig.grid_inputs: expected an int >= 0, got {self.grid_inputs}")
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


@dataclass(frozen=True)
class DPOStageConfig:
    """One profile's DPO run. Full scale: batch 1, accumulation 8, bf16, 500 steps; the learning rate (the paper
    prints none) is ours."""

    dpo: dpo_lib.DPOConfig = field(default_factory=dpo_lib.DPOConfig)
    lora: lora_lib.LoRAConfig = field(default_factory=lora_lib.LoRAConfig)  # used only when Flux2SR has no adapter
    optim: train.OptimConfig = field(default_factory=lambda: train.OptimConfig(lr=1e-5, warmup=20, grad_accum=8))
    batch: int = 1
    bf16: bool = True
    remat: str = "full"
    guidance: float = 1.0
    checkpoint_every: int = 100
    steps: int = 500

    def __post_init__(self):
        _positive_ints(self, ("batch", "steps", "checkpoint_every"))


@dataclass(frozen=True)
class NFTStageConfig:
    """LucidNFT on Flux2SR: K rollouts per LR from the old policy, rewards, advantages, the DiffusionNFT loss.

    `steps` counts iterations (rollouts, then one optimiser step per training timestep of the sampler's grid, then
    the old-policy EMA); `rewards` are "consistency" and no-reference metric names, fused with `weights`. Every
    check runs here, so a bad name, K < 2 or a zero total weight fails before any model is loaded.
    """

    rewards: tuple[str, ...] = (CONSISTENCY_REWARD, "niqe", "piqe")
    weights: tuple[float, ...] = ()  # one per reward; () weighs every reward 1, so `rewards=` alone stays valid
    advantages: str = "decoupled"
    renormalise: bool = False
    group_size: int = 4  # K rollouts per LR
    groups: int = 2  # LR inputs per iteration
    inputs: int = 16  # the training LR pool when no --lr folder is given
    sample_steps: int = 10
    timestep_fraction: float = 0.99
    decay_type: int = 1
    guidance: float = 1.0
    nft: nft_lib.NFTConfig = field(default_factory=nft_lib.NFTConfig)
    lora: lora_lib.LoRAConfig = field(default_factory=lora_lib.LoRAConfig)  # used only when Flux2SR has no adapter
    optim: train.OptimConfig = field(default_factory=lambda: train.OptimConfig(lr=3e-4, warmup=0))
    data: DataConfig = field(default_factory=lambda: dataclasses.replace(DataConfig.preset("full"),
                                                                         seed=NFT_DATA_SEED))
    held_out: HeldOut = field(default_factory=lambda: HeldOut(size=512, crops=1))
    eval_inputs: int = 4  # held-out crops of the final evaluation and the held-out reward curves
    eval_every: int = 10  # iterations between held-out reward points
    bf16: bool = True
    remat: str = "full"
    checkpoint_every: int = 10
    steps: int = 200

    def __post_init__(self):
        from ports import iqa

        name = type(self).__name__
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        _positive_ints(self, ("groups", "inputs", "sample_steps", "eval_inputs", "eval_every", "checkpoint_every",
                              "steps"))
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"{name}.group_size: K rollouts per LR must be an int >= 2 (a group's mean and std need "
                             f"two), got {self.group_size!r}")
        if not self.rewards:
            raise ValueError(f"{name}.rewards: expected at least one reward name")
        for reward in self.rewards:
            if reward == CONSISTENCY_REWARD:
                continue
            try:
                entry = iqa.registry_entry(reward)
            except ValueError as err:
                raise ValueError(f"{name}.rewards: unknown reward {reward!r}: expected {CONSISTENCY_REWARD!r} or a "
                                 f"no-reference metric of the scorer ({err})") from None
            if entry.full_reference:
                raise ValueError(f"{name}.rewards: {reward!r} needs an HR reference, which LucidNFT's unpaired LR "
                                 f"inputs do not have; use {CONSISTENCY_REWARD!r} or a no-reference metric")
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"{name}.rewards: names repeat in {self.rewards}")
        if self.weights and len(self.weights) != len(self.rewards):
            raise ValueError(f"{name}.weights: {len(self.weights)} weights {self.weights} for {len(self.rewards)} "
                             f"rewards {self.rewards}")
        if sum(self.reward_weights) == 0:
            raise ValueError(f"{name}.weights: the reward weights {self.weights} sum to zero, so the fused advantage "
                             f"carries no preference")
        if self.advantages not in nft_lib.SCHEMES:
            raise ValueError(f"{name}.advantages: expected one of {nft_lib.SCHEMES}, got {self.advantages!r}")
        if self.renormalise and self.advantages != "decoupled":
            raise ValueError(f"{name}.renormalise applies to the decoupled advantages only")
        if self.decay_type not in nft_lib.DECAY_TYPES:
            raise ValueError(f"{name}.decay_type: expected one of {nft_lib.DECAY_TYPES}, got {self.decay_type!r}")
        if int(self.sample_steps * self.timestep_fraction) < 1 or not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"{name}.timestep_fraction: {self.timestep_fraction} of {self.sample_steps} sampler steps "
                             f"must keep at least one training timestep and be in (0, 1]")

    @property
    def reward_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.rewards)


@dataclass(frozen=True)
class EvalConfig:
    """What changes an evaluation's numbers or pictures."""

    metrics: tuple[str, ...] = ("psnr", "ssim", "lpips", "dists", "topiq_fr", "afine_fr", "clipiqa", "niqe", "musiq",
                                "maniqa", "clipiqa+", "topiq_nr", "afine_nr", "nima", "topiq_iaa")
    nr_metric: str | None = None  # y axis of the perception-distortion plot (x is PSNR); None: the first NR metric
    sample_steps: int = 16
    guidance: float = 1.0
    seed: int = 0  # noise of every SR input (candidate `seed`)
    batch: int = 1  # SR inputs per sampler call; does not change any output
    crop_size: int = 256  # side of the side-by-side crops in crops.png
    crop_images: int = 8  # pairs shown in crops.png (the first ones by name)
    crop_border: int = 0  # pixels removed per side before PSNR/SSIM (0, as pyiqa-based SR papers)
    held_out: HeldOut = field(default_factory=HeldOut)

    def __post_init__(self):
        from ports import iqa

        name = type(self).__name__
        if isinstance(self.metrics, str) or not self.metrics:
            raise ValueError(f"{name}.metrics: expected a non-empty tuple of metric names, got {self.metrics!r}")
        for metric in self.metrics:
            iqa.registry_entry(metric)  # unknown names raise, listing the known ones
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"{name}.metrics: names repeat in {self.metrics}")
        if "psnr" not in self.metrics:
            raise ValueError(f"{name}.metrics: psnr is required (the x axis of the perception-distortion plot), "
                             f"got {self.metrics}")
        no_reference = [m for m in self.metrics if not iqa.REGISTRY[m].full_reference]
        if not no_reference or (self.nr_metric is not None and self.nr_metric not in no_reference):
            raise ValueError(f"{name}.nr_metric: expected one of the no-reference metrics in metrics "
                             f"{no_reference} (None: the first), got {self.nr_metric!r}")
        for key, low in (("sample_steps", 1), ("seed", 0), ("batch", 1), ("crop_size", 1), ("crop_images", 1),
                         ("crop_border", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}.{key}: expected an int >= {low}, got {value!r}")

    @property
    def plot_metric(self) -> str:
        """The no-reference metric on the plot's y axis."""
        from ports import iqa

        return self.nr_metric or next(m for m in self.metrics if not iqa.REGISTRY[m].full_reference)


@dataclass(frozen=True)
class Config:
    """One preset: the model architectures it names and every stage's settings (`vae` only where the preset trains
    its own VAE)."""

    preset: str
    transformer: str  # foa_jax.models.flux2 preset: the architecture a random or converted model must have
    vae_model: str  # foa_jax.models.vae preset
    sft: SFTConfig
    mine: MineConfig
    dpo: DPOStageConfig
    eval: EvalConfig
    vae: VAEStageConfig | None = None
    nft: NFTStageConfig = field(default_factory=NFTStageConfig)

    def __post_init__(self):
        flux2.preset(self.transformer)
        vae.VAEConfig.preset(self.vae_model)
