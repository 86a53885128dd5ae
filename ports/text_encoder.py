"""FLUX.2 prompt embeddings from the Mistral3 text encoder, and the file that caches them.

The embedding is computed exactly as diffusers' `Flux2Pipeline._get_mistral_3_small_prompt_embeds` does: the
prompt, with `[IMG]` removed, goes into a [system, user] chat, is tokenised by the chat template padded *and*
truncated to `max_length` tokens, and the encoder's hidden states at `layers` (default 10, 20, 30) are concatenated
along channels, so channel = layer_position·hidden + d. Pad tokens stay in: the DiT sees all `max_length` positions
without a mask, as in diffusers and BFL.

The 24B encoder runs once; the trainers and the sampler only read the cached file (`save_prompt_embedding` /
`load_prompt_embedding`, safetensors with string metadata, no pickle). Text position ids `(0, 0, 0, l)` belong to the
pure-JAX floor (`foa_jax.sampling.text_ids`), not here.

Command line (FLUX.2-dev's diffusers layout keeps the encoder and the processor in sibling folders):

    python -m ports.text_encoder --model FLUX.2-dev/text_encoder --processor FLUX.2-dev/tokenizer \\
        --prompt "a high-resolution photograph" --out prompt.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from transformers import AutoProcessor, Mistral3Config, Mistral3ForConditionalGeneration

DEFAULT_LAYERS = (10, 20, 30)
DEFAULT_MAX_LENGTH = 512

# Identifies our cache files, so that another safetensors file fails with a message instead of a shape error.
FILE_KIND = "foa-jax prompt embedding v1"
TENSOR_KEY = "prompt_embedding"
# Metadata the caller supplies; `dtype` and `shape` are read off the array when saving.
CALLER_META_KEYS = ("prompts", "max_length", "layers", "encoder", "encoder_config_sha256")

WHAT_TO_PUT_IN_MODEL_DIR = (
    "a Mistral3ForConditionalGeneration checkpoint (config.json and *.safetensors), e.g. the text_encoder/ folder "
    "of black-forest-labs/FLUX.2-dev or mistralai/Mistral-Small-3.2-24B-Instruct-2506, downloaded beforehand (nothing is fetched from the hub)"
)
WHAT_TO_PUT_IN_PROCESSOR_DIR = (
    "the Mistral-Small processor files (tokenizer.json, tokenizer_config.json, processor_config.json, chat template), "
    "e.g. the tokenizer/ folder of black-forest-labs/FLUX.2-dev, downloaded beforehand (nothing is fetched from the hub)"
)


@dataclass(frozen=True)
class PromptEncodingConfig:
    """How a prompt becomes an embedding; the defaults are FLUX.2-dev's.

    `layers` are indices into the encoder's hidden states, where 0 is the token embedding and k the residual stream
    after k decoder layers. Their order is the channel order of the embedding.
    """

    max_length: int = DEFAULT_MAX_LENGTH
    layers: tuple[int, ...] = DEFAULT_LAYERS
    system_message: str = SYSTEM_MESSAGE

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"PromptEncodingConfig.max_length: expected >= 1, got {self.max_length}")
        layers = tuple(self.layers)
        if not layers or any(not isinstance(k, int) or k < 0 for k in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"PromptEncodingConfig.layers: expected distinct non-negative ints, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)


def chat_for(prompt: str, system_message: str) -> list[dict]:
    """The [system, user] conversation of one prompt.

    `[IMG]` is removed because the Pixtral processor counts image tokens and fails when truncation changes the count.
    """
    text = prompt.replace("[IMG]", "")
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "text", "text": text}]},
    ]


def encode_prompts(
    model: Mistral3ForConditionalGeneration,
    processor,
    prompts: Sequence[str],
    config: PromptEncodingConfig = PromptEncodingConfig(),
) -> torch.Tensor:
    """The FLUX.2 prompt embedding, (B, max_length, len(layers)·hidden), in the model's dtype.

    `processor` is what diffusers calls the tokenizer: a Pixtral processor (or a tokenizer) with a chat template.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts: prompts must be a sequence of strings, got a single str")
    inputs = processor.apply_chat_template(
        [chat_for(p, config.system_message) for p in prompts],
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=config.max_length,
    )
    with torch.inference_mode():
        out = model(
            input_ids=inputs["input_ids"].to(model.device),
            attention_mask=inputs["attention_mask"].to(model.device),
            output_hidden_states=True,
            use_cache=False,
        )
    hidden = out.hidden_states
    if max(config.layers) >= len(hidden):
        raise ValueError(
            f"layers {config.layers}: the encoder has only {len(hidden)} hidden states (indices 0..{len(hidden) - 1})"
        )
    return torch.cat([hidden[k] for k in config.layers], dim=-1)


def decoder_layers_needed(layers: Sequence[int]) -> int:
    """How many decoder layers give bit-identical hidden states at `layers`.

    Hidden state k depends only on layers 0..k-1, but transformers replaces the *last* hidden state by the final
    RMSNorm's output, so one layer beyond the deepest index is kept to leave that one raw.
    """
    return max(layers) + 1


def _require_dir(path: Path, what_to_put: str, flag: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} folder {path} does not exist; it must hold {what_to_put}")


def load_text_encoder(
    model_dir: str | Path,
    processor_dir: str | Path | None = None,
    *,
    layers: Sequence[int] = DEFAULT_LAYERS,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Mistral3ForConditionalGeneration, object]:
    """Model and processor from local folders only (never the hub), the model cut after the layers `layers` need.

    Truncation: only `decoder_layers_needed(layers)` decoder layers are built and read (31 of FLUX.2's 40), which
    saves about a fifth of the 24B encoder (9 layers of 0.56B parameters, 10 GB in bfloat16); transformers reports
    the skipped weights as UNEXPECTED keys and never loads them. The embedding is identical to the full model's.
    `processor_dir` defaults to `model_dir` (the transformers layout of Mistral-Small; FLUX.2-dev keeps it in a sibling `tokenizer/`).
    """
    model_dir = Path(model_dir)
    processor_dir = model_dir if processor_dir is None else Path(processor_dir)
    _require_dir(model_dir, WHAT_TO_PUT_IN_MODEL_DIR, "model")
    _require_dir(processor_dir, WHAT_TO_PUT_IN_PROCESSOR_DIR, "processor")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'config.json'} is missing; the folder must hold {WHAT_TO_PUT_IN_MODEL_DIR}"
        )

    config = Mistral3Config.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != "mistral3":
        raise ValueError(f"{model_dir / 'config.json'}: expected model_type 'mistral3', got {config.model_type!r}")
    depth = config.text_config.num_hidden_layers
    if max(layers) > depth:
        raise ValueError(f"layers {tuple(layers)}: {model_dir} has {depth} decoder layers, so indices 0..{depth}")
    config.text_config.num_hidden_layers = min(decoder_layers_needed(layers), depth)
    model = Mistral3ForConditionalGeneration.from_pretrained(
        model_dir, config=config, dtype=dtype, local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
    return model, processor


def encoder_identity(model_dir: str | Path) -> dict[str, str]:
    """Folder name and SHA-256 of the config.json bytes on disk (before any truncation), for the cache metadata."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; the folder must hold {WHAT_TO_PUT_IN_MODEL_DIR}")
    return {
        "encoder": Path(model_dir).resolve().name,
        "encoder_config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest(),
    }


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """NumPy copy keeping the dtype; bfloat16 becomes ml_dtypes.bfloat16 (exactly, through float32)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()


def _check_embedding(embedding: np.ndarray, meta: Mapping, source: str) -> None:
    """Raise ValueError (naming `source`, expected vs actual) unless `embedding` agrees with `meta`."""
    if embedding.ndim != 3:
        raise ValueError(f"{source}: expected a rank-3 (B, L, C) embedding, got shape {embedding.shape}")
    batch, length, channels = embedding.shape
    expected = {
        "shape": (tuple(meta["shape"]), embedding.shape),
        "dtype": (meta["dtype"], embedding.dtype.name),
        "batch (number of prompts)": (len(meta["prompts"]), batch),
        "length (max_length)": (meta["max_length"], length),
    }
    for name, (want, got) in expected.items():
        if want != got:
            raise ValueError(f"{source}: {name} expected {want}, got {got}")
    if channels % len(meta["layers"]):
        raise ValueError(
            f"{source}: channels {channels} are not a multiple of the {len(meta['layers'])} layers {meta['layers']}"
        )


def save_prompt_embedding(path: str | Path, embedding: np.ndarray, meta: Mapping) -> Path:
    """Write `embedding` (B, L, C) and `meta` to a safetensors file; meta needs exactly CALLER_META_KEYS.

    `prompts` is the list of prompt texts (one per batch row), `layers` the stacked hidden-state indices,
    `encoder` / `encoder_config_sha256` as from `encoder_identity`. dtype and shape are recorded from the array.
    """
    path = Path(path)
    if set(meta) != set(CALLER_META_KEYS):
        raise ValueError(
            f"save_prompt_embedding({path}): meta keys expected {sorted(CALLER_META_KEYS)}, got {sorted(meta)}"
        )
    embedding = np.ascontiguousarray(embedding)
    full = {
        "prompts": list(meta["prompts"]),
        "max_length": int(meta["max_length"]),
        "layers": [int(k) for k in meta["layers"]],
        "encoder": str(meta["encoder"]),
        "encoder_config_sha256": str(meta["encoder_config_sha256"]),
        "dtype": embedding.dtype.name,
        "shape": list(embedding.shape),
    }
    _check_embedding(embedding, full, f"save_prompt_embedding({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": FILE_KIND, **{k: json.dumps(v) for k, v in full.items()}}
    save_file({TENSOR_KEY: embedding}, str(path), metadata=metadata)
    return path


def load_prompt_embedding(path: str | Path, *, channels: int | None = None) -> tuple[np.ndarray, dict]:
    """`(embedding (B, L, C), meta)` from a file written by `save_prompt_embedding`, validated against its metadata.

    `channels`, when given (the transformer's joint_attention_dim), must equal C.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt embedding {path} does not exist: create it with "
            f"`python -m ports.text_encoder --model DIR --prompt TEXT --out {path}`"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            embedding = f.get_tensor(TENSOR_KEY) if TENSOR_KEY in keys else None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"prompt embedding {path} is corrupt or not a safetensors file: {err}") from err
    if metadata.get("kind") != FILE_KIND or embedding is None:
        raise ValueError(
            f"{path} is not a prompt-embedding file: expected kind {FILE_KIND!r} and tensor {TENSOR_KEY!r}, "
            f"got kind {metadata.get('kind')!r} and tensors {keys}"
        )
    missing = [k for k in (*CALLER_META_KEYS, "dtype", "shape") if k not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata is missing {missing}")
    try:
        meta = {k: json.loads(metadata[k]) for k in (*CALLER_META_KEYS, "dtype", "shape")}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata is not valid JSON: {err}") from err
    _check_embedding(embedding, meta, str(path))
    if channels is not None and embedding.shape[-1] != channels:
        raise ValueError(f"{path}: channels expected {channels}, got {embedding.shape[-1]}")
    return embedding, meta


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ports.text_encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local folder of the Mistral3 text encoder")
    parser.add_argument("--processor", help="local folder of the processor/tokenizer (default: --model)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)

    config = PromptEncodingConfig(max_length=args.max_length, layers=tuple(args.layers))
    model, processor = load_text_encoder(
        args.model, args.processor, layers=config.layers, dtype=getattr(torch, args.dtype)
    )
    embedding = tensor_to_numpy(encode_prompts(model, processor, [args.prompt], config))
    meta = {
        "prompts": [args.prompt],
        "max_length": config.max_length,
        "layers": list(config.layers),
        **encoder_identity(args.model),
    }
    out = save_prompt_embedding(args.out, embedding, meta)
    print(f"prompt embedding {embedding.shape} {embedding.dtype.name} written to {out.resolve()}")
    return out


if __name__ == "__main__":
    main()
