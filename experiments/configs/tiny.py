"""The embedded default: a FLUX.2-shaped model small enough to train and run on a 2-core CPU, on the bundled photos.

    python -m experiments.dpo                          # the main job, with the shipped tiny VAE and Flux2SR
    python -m experiments.dpo --retrain                # the same after training the VAE and Flux2SR from scratch
    python -m experiments.vae && python -m experiments.sft --vae runs/foa/vae/weights   # the two by hand

Nothing pretrained exists at this size, so the VAE is trained as an autoencoder and Flux2SR trains every transformer
weight (`mode="full"`); both keep FLUX.2's layout (8x VAE, 2x2 patchify, reference tokens at T = 10). The metrics
are the ones that run offline: PSNR, SSIM, LPIPS and DISTS for R_F, NIQE and PIQE for R_A (one metric alone would
make every Aesthetic gap about 1). 256-px crops give FLUX.2's token grid (16 x 16) and are large enough for NIQE.
"""

import dataclasses

from experiments.configs import schema
from foa_jax import lora as lora_lib
from foa_jax import losses, rewards, train
from foa_jax.data.dataset import DataConfig

TINY_REWARD = rewards.RewardConfig(faithful_metrics=("psnr", "ssim", "lpips", "dists"),
                                   aesthetic_metrics=("niqe", "piqe"))
OFFLINE_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "piqe")
HELD_OUT = schema.HeldOut(size=256, crops=8)  # 32 crops of the 4 held-out photos


def get_config() -> schema.Config:
    tiny_data = DataConfig(gt_size=256, hflip=True)
    return schema.Config(
        preset="tiny", transformer="tiny", vae_model="tiny",
        vae=schema.VAEStageConfig(model="tiny", steps=12_000, checkpoint_every=1000, held_out=HELD_OUT),
        # Trained on 128-px crops (4x cheaper than 256; attention is relative, so it samples 256-px crops alike).
        sft=schema.SFTConfig(
            mode="full", bf16=False, remat="none", batch=8, samples=2048, steps=7000, checkpoint_every=500,
            data=dataclasses.replace(tiny_data, gt_size=128), held_out=HELD_OUT,
            optim=train.OptimConfig(lr=1e-3, warmup=100, weight_decay=0.0, schedule_kind="cosine", final_lr=1e-5),
            loss=losses.SFTLossConfig(lambda_pix=1.0, lambda_lpips=1.0, lpips_net="alex", lpips_start=0,
                                      lpips_end=1000, pixel_samples=2)),
        mine=schema.MineConfig(data=dataclasses.replace(tiny_data, hflip=False, seed=schema.MINING_DATA_SEED),
                               inputs=16, batch=4, reward=TINY_REWARD),
        # A rank-16 LoRA on the full-weight tiny Flux2SR; a few dozen pairs at 256 px, so a short run at a larger rate.
        dpo=schema.DPOStageConfig(lora=lora_lib.LoRAConfig(rank=16), bf16=False, remat="none", batch=4, steps=60,
                                  checkpoint_every=30, optim=train.OptimConfig(lr=1e-3, warmup=5, weight_decay=0.0)),
        eval=schema.EvalConfig(metrics=OFFLINE_METRICS, batch=8, crop_size=256, crop_images=4, held_out=HELD_OUT),
        # LucidNFT on 128-px crops (NIQE needs 96 px): a rank-16 LoRA, 2 LRs x K = 4 rollouts of 8 Euler steps.
        nft=schema.NFTStageConfig(
            lora=lora_lib.LoRAConfig(rank=16), bf16=False, remat="none", group_size=4, groups=2, inputs=16,
            sample_steps=8, steps=30, checkpoint_every=10, eval_every=5, eval_inputs=8,
            data=dataclasses.replace(tiny_data, gt_size=128, hflip=False, seed=schema.NFT_DATA_SEED),
            held_out=schema.HeldOut(size=128, crops=2), optim=train.OptimConfig(lr=1e-3, warmup=0, weight_decay=0.0)),
    )
