"""Qwen3-VL-Embedding as a LucidConsistency backbone: images -> the last valid token's final hidden state.

The embedding follows the model card's embedder: each image is the user turn of a [system, user] chat whose system
message is the instruction "Represent the user's input.", rendered by the processor's chat template with the
generation prompt appended, tokenised with right padding, run through the frozen `Qwen3VLModel` (no LM head), and
pooled at the last position the attention mask keeps (for right padding, the end of each row's own text). The raw
pooled vector is returned, not normalised: LucidConsistency's head takes it as is and normalises after.

Images are resized by the processor into [4·32², 1800·32²] pixels at multiples of 32 (patch 16, merge 2), the
embedder's own bounds; a 256-px crop stays as it is. Float images in [0, 1] go in unrounded (`do_rescale=False`).

Everything is read from a local folder (config.json, the safetensors weights, the processor files): nothing is
downloaded. Both layouts of the weights load: a bare `Qwen3VLModel` and one saved under a wrapper's `model.` prefix,
as the released embedding checkpoints are.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLModel

INSTRUCTION = "Represent the user's input."
IMAGE_FACTOR = 32  # patch 16 x spatial merge 2: pixels per visual token along a side
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR

WHAT_TO_PUT_IN_MODEL_DIR = (
    "a Qwen3-VL-Embedding checkpoint (config.json with model_type qwen3_vl, *.safetensors and the processor files: "
    "tokenizer.json, tokenizer_config.json, preprocessor_config.json, chat template), e.g. Qwen/Qwen3-VL-Embedding-2B "
    "or -8B, downloaded beforehand (nothing is fetched from the hub)"
)


def _with_final_punctuation(instruction: str) -> str:
    """The embedder ends an instruction with '.' unless it already ends with punctuation."""
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("QwenEmbeddingConfig.instruction must not be empty")
    return instruction if unicodedata.category(instruction[-1]).startswith("P") else instruction + "."


@dataclass(frozen=True)
class QwenEmbeddingConfig:
    """The instruction, the processor's pixel bounds and how many images go through the model at once."""

    instruction: str = INSTRUCTION
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    batch: int = 4

    def __post_init__(self):
        object.__setattr__(self, "instruction", _with_final_punctuation(self.instruction))
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"QwenEmbeddingConfig: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and "
                             f"{self.max_pixels}")
        if self.batch < 1:
            raise ValueError(f"QwenEmbeddingConfig.batch must be >= 1, got {self.batch}")


def conversation(instruction: str) -> list[dict]:
    """The [system, user] chat of one image: the instruction as the system turn, the image alone as the user turn."""
    return [
        {"role": "system", "content": [{"type": "text", "text": instruction}]},
        {"role": "user", "content": [{"type": "image"}]},
    ]


def last_valid_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B, L, D)` hidden states -> `(B, D)` at each row's last position whose mask is 1 (left or right padding)."""
    if attention_mask.ndim != 2 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"last_valid_token: mask {tuple(attention_mask.shape)} does not match hidden states "
                         f"{tuple(hidden.shape)}")
    if not bool((attention_mask.sum(dim=1) > 0).all()):
        raise ValueError("last_valid_token: a row of the attention mask keeps no token")
    last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Qwen embedding: image {index} must be HWC RGB (H, W, 3), got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"Qwen embedding: image {index} must be float in [0, 1], got dtype {image.dtype}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"Qwen embedding: image {index} must lie in [0, 1], got [{image.min()}, {image.max()}]")
    return image.astype(np.float32)


def embed_images(model: Qwen3VLModel, processor, images: np.ndarray | Sequence[np.ndarray],
                 config: QwenEmbeddingConfig = QwenEmbeddingConfig()) -> np.ndarray:
    """Float images in [0, 1] (a `(B, H, W, 3)` array, or HWC arrays of any sizes) -> `(B, hidden)` float32 raw
    embeddings, `config.batch` images per forward; images of different sizes in one batch are padded on the right."""
    images = [_check_image(image, i) for i, image in enumerate(images)]
    processor.tokenizer.padding_side = "right"
    text = processor.apply_chat_template(conversation(config.instruction), add_generation_prompt=True,
                                         tokenize=False)
    size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
    out = []
    for start in range(0, len(images), config.batch):
        chunk = images[start:start + config.batch]
        inputs = processor(text=[text] * len(chunk), images=chunk, padding=True, return_tensors="pt",
                           do_rescale=False, size=size)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        with torch.inference_mode():
            hidden = model(**inputs, use_cache=False).last_hidden_state
        out.append(last_valid_token(hidden, inputs["attention_mask"]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.text_config.hidden_size), np.float32)


def load_qwen_embedding(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | None = None) -> tuple[Qwen3VLModel, object]:
    """Model and processor from a local folder, never the hub; the model frozen in eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Qwen3-VL-Embedding folder {model_dir} does not exist; it must hold "
                                f"{WHAT_TO_PUT_IN_MODEL_DIR}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} is missing; the folder must hold "
                                f"{WHAT_TO_PUT_IN_MODEL_DIR}")
    config = Qwen3VLConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != "qwen3_vl":
        raise ValueError(f"{model_dir / 'config.json'}: expected model_type 'qwen3_vl', got {config.model_type!r}")
    model = Qwen3VLModel.from_pretrained(model_dir, config=config, dtype=dtype, local_files_only=True)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


class QwenBackbone:
    """`foa_jax.consistency.Backbone` over Qwen3-VL-Embedding: a frozen callable images -> `(B, hidden)`."""

    def __init__(self, model_dir: str | Path, config: QwenEmbeddingConfig = QwenEmbeddingConfig(),
                 dtype: torch.dtype = torch.bfloat16, device: str | None = None):
        self.model, self.processor = load_qwen_embedding(model_dir, dtype, device)
        self.config = config
        self.dim = int(self.model.config.text_config.hidden_size)

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        return embed_images(self.model, self.processor, images, self.config)
