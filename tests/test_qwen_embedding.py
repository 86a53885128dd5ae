"""ports.qwen_embedding on a tiny random Qwen3-VL and a home-made processor: loading from a folder (both weight
layouts), the chat the embedder builds, last-valid-token pooling under right padding, and the errors.

The processor is a real `Qwen3VLProcessor` around a word-level tokenizer trained here on the instruction, with a
Qwen-style chat template: nothing is downloaded.
"""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from ports import qwen_embedding as qe

HIDDEN = 32
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen's template reduced to what one [system, user-image] chat uses.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_processor() -> Qwen3VLProcessor:
    words = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([qe.INSTRUCTION, "system user assistant"],
                              trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
                            tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(), chat_template=TEMPLATE)


def make_config(tokenizer) -> Qwen3VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    return Qwen3VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": HIDDEN, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine the thread pool spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    return Qwen3VLModel(make_config(processor.tokenizer)).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, processor):
    """The tiny model saved bare (`Qwen3VLModel` keys) with its processor files."""
    root = tmp_path_factory.mktemp("qwen") / "bare"
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


def _images(seed, *sizes):
    rng = np.random.default_rng(seed)
    return [rng.uniform(size=(h, w, 3)).astype(np.float32) for h, w in sizes]


def _reference(model, processor, image):
    """One image alone (no padding anywhere), pooled at the very last position."""
    text = processor.apply_chat_template(qe.conversation(qe.INSTRUCTION), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt", do_rescale=False)
    with torch.inference_mode():
        return model(**inputs).last_hidden_state[0, -1].numpy()


def test_the_chat_is_the_instruction_then_the_image(processor):
    text = processor.apply_chat_template(qe.conversation(qe.INSTRUCTION), add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")


def test_padded_batch_pools_the_last_valid_token(model, processor):
    """64x64 (4 visual tokens) and 96x64 (6) in one batch: the first row is right-padded by 2 tokens."""
    images = _images(0, (64, 64), (96, 64), (64, 128))
    got = qe.embed_images(model, processor, images, qe.QwenEmbeddingConfig(batch=3))
    want = np.stack([_reference(model, processor, image) for image in images])
    assert got.shape == (3, HIDDEN) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # different images, different embeddings


def test_last_valid_token_reads_the_mask_either_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert qe.last_valid_token(hidden, right).tolist() == [hidden[0, 1].tolist(), hidden[1, 3].tolist()]
    assert qe.last_valid_token(hidden, left).tolist() == [hidden[0, 3].tolist(), hidden[1, 3].tolist()]
    with pytest.raises(ValueError, match=r"keeps no token"):
        qe.last_valid_token(hidden, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_loaded_folder_gives_the_same_embeddings(folder, model, processor):
    backbone = qe.QwenBackbone(folder, qe.QwenEmbeddingConfig(batch=2), dtype=torch.float32, device="cpu")
    images = np.stack(_images(1, (64, 64), (64, 64), (64, 64)))
    assert backbone.dim == HIDDEN
    np.testing.assert_allclose(backbone(images), qe.embed_images(model, processor, images), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_wrapped_checkpoint_layout_loads(tmp_path, model, processor):
    """Weights saved under a wrapper's `model.` prefix (as an embedding or generation checkpoint is) load too."""
    wrapper = Qwen3VLForConditionalGeneration(model.config)
    wrapper.model.load_state_dict(model.state_dict())
    wrapper.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert any(key.startswith("model.language_model.") for key in f.keys())
    loaded, loaded_processor = qe.load_qwen_embedding(tmp_path, dtype=torch.float32, device="cpu")
    image = _images(2, (64, 96))
    np.testing.assert_allclose(qe.embed_images(loaded, loaded_processor, image),
                               qe.embed_images(model, processor, image), rtol=1e-5, atol=1e-6)


def test_missing_folder_and_bad_input_are_clear_errors(tmp_path, model, processor):
    with pytest.raises(FileNotFoundError, match=r"nowhere/qwen does not exist.*Qwen3-VL-Embedding"):
        qe.load_qwen_embedding(tmp_path / "nowhere" / "qwen")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        qe.QwenBackbone(tmp_path)
    with pytest.raises(ValueError, match=r"image 1 must lie in \[0, 1\]"):
        qe.embed_images(model, processor, [np.zeros((64, 64, 3), np.float32), np.full((64, 64, 3), 2.0, np.float32)])
    with pytest.raises(ValueError, match=r"image 0 must be float"):
        qe.embed_images(model, processor, [np.zeros((64, 64, 3), np.uint8)])
    assert qe.QwenEmbeddingConfig(instruction="Represent the image").instruction == "Represent the image."
    with pytest.raises(ValueError, match=r"instruction must not be empty"):
        qe.QwenEmbeddingConfig(instruction=" ")
