"""ports.text_encoder against diffusers' FLUX.2 prompt encoding, on a tiny random Mistral3 and a home-made tokenizer.

The tiny encoder has 32 decoder layers so that FLUX.2's own settings (layers 10/20/30, 512 tokens) run unchanged.
Its processor is a real `PixtralProcessor` around a word-level tokenizer trained here on the system message, with a
Mistral-style chat template: nothing is downloaded.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
)

from ports import text_encoder as te

HIDDEN = 32
DEPTH = 32
SHORT = "a red cat sits on a mat"
# Longer than the 40-token test length once the system message is in front: exercises truncation.
LONG = "a [IMG]cat with a red hat sits on a mat near a dog and " * 6
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


def make_processor() -> PixtralProcessor:
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(
        [te.SYSTEM_MESSAGE, SHORT, LONG], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, patch_size=4
    )


def make_model(vocab_size: int, image_token: int) -> Mistral3ForConditionalGeneration:
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": DEPTH,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": vocab_size,
            "max_position_embeddings": 1024,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "patch_size": 4,
            "image_size": 32,
        },
        image_token_index=image_token,
    )
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine the thread pool spins (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def model(processor):
    return make_model(len(processor.tokenizer), processor.tokenizer.convert_tokens_to_ids("[IMG]"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model, processor):
    """The tiny encoder and processor as FLUX.2-dev lays them out: text_encoder/ and tokenizer/."""
    root = tmp_path_factory.mktemp("flux2")
    model.save_pretrained(root / "text_encoder")
    processor.save_pretrained(root / "tokenizer")
    return root / "text_encoder", root / "tokenizer"


def hidden_states_by_hooks(model, processor, prompts, config) -> dict[int, torch.Tensor]:
    """Residual stream after k decoder layers, read with forward hooks instead of `output_hidden_states`."""
    inputs = processor.apply_chat_template(
        [te.chat_for(p, config.system_message) for p in prompts],
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=config.max_length,
    )
    language_model = model.model.language_model
    seen = {}
    handles = [language_model.embed_tokens.register_forward_hook(lambda m, i, o: seen.__setitem__(0, o))]
    for index, layer in enumerate(language_model.layers):
        handles.append(layer.register_forward_hook(lambda m, i, o, k=index + 1: seen.__setitem__(k, o)))
    try:
        with torch.inference_mode():
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def cast(model, dtype):
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


CONFIGS = [
    pytest.param(te.PromptEncodingConfig(), id="flux2-defaults"),
    pytest.param(te.PromptEncodingConfig(max_length=40, layers=(7, 0, 3)), id="len40-layers7,0,3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_diffusers_pipeline(model, processor, config, dtype):
    encoder = cast(model, dtype)
    ours = te.encode_prompts(encoder, processor, [SHORT, LONG], config)
    with torch.inference_mode():
        theirs = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            encoder,
            processor,
            [SHORT, LONG],
            max_sequence_length=config.max_length,
            hidden_states_layers=config.layers,
        )
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"\n{config.max_length=} {config.layers=} {dtype}: max abs diff vs diffusers {diff}")
    assert ours.shape == (2, config.max_length, len(config.layers) * HIDDEN)
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_test_prompts_exercise_padding_and_truncation(processor):
    """Guards the test inputs: at 40 tokens the short prompt is padded and the long one truncated."""
    mask = processor.apply_chat_template(
        [te.chat_for(p, te.SYSTEM_MESSAGE) for p in (SHORT, LONG)],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=40,
    )["attention_mask"]
    full_long = processor.apply_chat_template([te.chat_for(LONG, te.SYSTEM_MESSAGE)], tokenize=True)
    assert mask[0].sum() < 40 and mask[1].sum() == 40
    assert len(np.asarray(full_long).reshape(-1)) > 40


@pytest.mark.parametrize("config", CONFIGS)
def test_channel_layout_is_layer_major(model, processor, config):
    embedding = te.encode_prompts(model, processor, [SHORT, LONG], config)
    hidden = hidden_states_by_hooks(model, processor, [SHORT, LONG], config)
    for position, layer in enumerate(config.layers):
        assert torch.equal(embedding[..., position * HIDDEN : (position + 1) * HIDDEN], hidden[layer]), layer


def test_img_marker_is_removed(model, processor):
    config = te.PromptEncodingConfig(max_length=40, layers=(1, 2))
    with_marker = te.encode_prompts(model, processor, ["a red [IMG]cat[IMG]"], config)
    without = te.encode_prompts(model, processor, ["a red cat"], config)
    assert torch.equal(with_marker, without)


def test_last_hidden_state_is_normed(model, processor):
    """Why truncation keeps one layer beyond the deepest index: transformers' last hidden state is post-norm."""
    config = te.PromptEncodingConfig(max_length=40, layers=(DEPTH,))
    last = te.encode_prompts(model, processor, [SHORT], config)
    raw = hidden_states_by_hooks(model, processor, [SHORT], config)[DEPTH]
    assert not torch.allclose(last, raw)
    assert torch.allclose(last, model.model.language_model.norm(raw), atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [te.PromptEncodingConfig(), te.PromptEncodingConfig(max_length=40, layers=(2, 5, 4))],
    ids=["flux2-defaults", "len40-layers2,5,4"],
)
def test_truncated_load_gives_identical_embedding(model, processor, folders, config):
    truncated, loaded_processor = te.load_text_encoder(*folders, layers=config.layers, dtype=torch.float32)
    assert len(truncated.model.language_model.layers) == max(config.layers) + 1 < DEPTH
    expected = te.encode_prompts(model, processor, [SHORT, LONG], config)
    got = te.encode_prompts(truncated, loaded_processor, [SHORT, LONG], config)
    print(f"\ntruncated to {max(config.layers) + 1}/{DEPTH} layers: max abs diff {(got - expected).abs().max().item()}")
    assert torch.equal(got, expected)


def test_missing_folders_raise_naming_them(tmp_path, folders):
    model_dir, processor_dir = folders
    missing = tmp_path / "nowhere" / "text_encoder"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*Mistral3ForConditionalGeneration"):
        te.load_text_encoder(missing, processor_dir)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*tokenizer.json"):
        te.load_text_encoder(model_dir, missing)
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        te.load_text_encoder(tmp_path, processor_dir)
    with pytest.raises(ValueError, match=r"has 32 decoder layers"):
        te.load_text_encoder(model_dir, processor_dir, layers=(DEPTH + 1,))


def meta_for(embedding, config):
    return {
        "prompts": [SHORT, LONG][: embedding.shape[0]],
        "max_length": config.max_length,
        "layers": list(config.layers),
        "encoder": "tiny",
        "encoder_config_sha256": "0" * 64,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, model, processor, dtype):
    config = te.PromptEncodingConfig(max_length=40, layers=(7, 0, 3))
    embedding = te.tensor_to_numpy(te.encode_prompts(cast(model, dtype), processor, [SHORT, LONG], config))
    meta = meta_for(embedding, config)
    path = te.save_prompt_embedding(tmp_path / "prompt.safetensors", embedding, meta)
    loaded, loaded_meta = te.load_prompt_embedding(path, channels=3 * HIDDEN)
    assert loaded.dtype == embedding.dtype and loaded.shape == (2, 40, 3 * HIDDEN)
    assert loaded.tobytes() == embedding.tobytes()
    assert loaded_meta == {**meta, "dtype": embedding.dtype.name, "shape": [2, 40, 3 * HIDDEN]}


def test_save_rejects_inconsistent_input(tmp_path):
    config = te.PromptEncodingConfig(max_length=8, layers=(1, 2))
    embedding = np.zeros((1, 8, 6), np.float32)
    with pytest.raises(ValueError, match=r"meta keys expected"):
        te.save_prompt_embedding(tmp_path / "a.safetensors", embedding, {"prompts": [SHORT]})
    with pytest.raises(ValueError, match=r"length \(max_length\) expected 8, got 7"):
        te.save_prompt_embedding(tmp_path / "a.safetensors", embedding[:, :7], meta_for(embedding, config))
    with pytest.raises(ValueError, match=r"channels 5 are not a multiple of the 2 layers"):
        te.save_prompt_embedding(tmp_path / "a.safetensors", embedding[..., :5], meta_for(embedding, config))


def test_load_errors_name_the_file(tmp_path):
    config = te.PromptEncodingConfig(max_length=8, layers=(1, 2))
    good = te.save_prompt_embedding(
        tmp_path / "good.safetensors", np.ones((1, 8, 6), np.float32), meta_for(np.ones((1, 8, 6)), config)
    )

    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors does not exist.*ports\.text_encoder"):
        te.load_prompt_embedding(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match=r"garbage\.safetensors is corrupt"):
        te.load_prompt_embedding(garbage)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut\.safetensors is corrupt"):
        te.load_prompt_embedding(cut)

    with safe_open(str(good), framework="numpy") as f:
        metadata = f.metadata()
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({te.TENSOR_KEY: np.ones((1, 7, 6), np.float32)}, str(wrong_shape), metadata=metadata)
    with pytest.raises(ValueError, match=r"wrong_shape\.safetensors: shape expected \(1, 8, 6\), got \(1, 7, 6\)"):
        te.load_prompt_embedding(wrong_shape)

    rank2 = tmp_path / "rank2.safetensors"
    save_file({te.TENSOR_KEY: np.ones((8, 6), np.float32)}, str(rank2), metadata=metadata)
    with pytest.raises(ValueError, match=r"rank2\.safetensors: expected a rank-3 \(B, L, C\) embedding, got shape"):
        te.load_prompt_embedding(rank2)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors is not a prompt-embedding file"):
        te.load_prompt_embedding(foreign)

    with pytest.raises(ValueError, match=r"good\.safetensors: channels expected 15360, got 6"):
        te.load_prompt_embedding(good, channels=15360)


def test_command_line_writes_the_embedding(tmp_path, folders, model, processor, capsys):
    model_dir, processor_dir = folders
    out = tmp_path / "cli" / "prompt.safetensors"
    te.main(
        [
            "--model",
            str(model_dir),
            "--processor",
            str(processor_dir),
            "--prompt",
            SHORT,
            "--out",
            str(out),
            "--max-length",
            "40",
            "--layers",
            "2",
            "5",
            "4",
            "--dtype",
            "float32",
        ]
    )
    printed = capsys.readouterr().out
    assert "(1, 40, 96)" in printed and str(out.resolve()) in printed
    loaded, meta = te.load_prompt_embedding(out)
    config = te.PromptEncodingConfig(max_length=40, layers=(2, 5, 4))
    expected = te.encode_prompts(model, processor, [SHORT], config).numpy()
    assert loaded.tobytes() == expected.tobytes()
    assert meta["prompts"] == [SHORT] and meta["layers"] == [2, 5, 4] and meta["encoder"] == "text_encoder"
    assert meta["encoder_config_sha256"] == te.encoder_identity(model_dir)["encoder_config_sha256"]
