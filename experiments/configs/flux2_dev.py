"""FLUX.2-dev (32B): the paper's setting, on converted weights.

    python -m ports.convert FLUX.2-dev/ --out weights/flux2-dev
    python -m ports.text_encoder --model FLUX.2-dev/text_encoder --prompt "..." --out weights/prompt.safetensors
    python -m experiments.dpo --preset flux2-dev --transformer weights/flux2-dev/transformer \\
        --vae weights/flux2-dev/vae --prompt-embedding weights/prompt.safetensors --hr LSDIR/ --iqa-weights IQA/

Flux2SR: LoRA rank 64 on `attn+add` of the frozen bf16 base, remat "full", batch 1, 200 warm-up steps, 50K steps;
DPO: rank 64, batch 1 x accumulation 8, 500 steps; 512-px HR crops; the paper's metric sets.
"""

from experiments.configs import schema


def get_config() -> schema.Config:
    return schema.Config(preset="flux2-dev", transformer="flux2-dev", vae_model="flux2", sft=schema.SFTConfig(),
                         mine=schema.MineConfig(), dpo=schema.DPOStageConfig(), eval=schema.EvalConfig())
