"""LoRA files: our exports load in diffusers with the same outputs, PEFT/diffusers-saved adapters import with the same
outputs, export -> import is bit-exact, and damaged files fail naming the keys."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from foa_jax import lora, sampling
from foa_jax.models import flux2
from ports import convert, lora_io, torch_models
from tests import torch_reference

CONFIG = flux2.Flux2Config(**torch_reference.SMALL_TRANSFORMER)
RANK = 4
TIMESTEPS = np.array([0.2, 0.7], np.float32)
APPLY = jax.jit(flux2.apply, static_argnums=1)
# PEFT target lists as a user would write them for FLUX.2; the single blocks' `attn.to_out` is named per layer because
# the short name would also hit the double blocks' `attn.to_out` ModuleList.
SINGLE_TO_OUT = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(CONFIG.num_single_layers)]
PEFT_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", *SINGLE_TO_OUT],
    "attn+add": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "to_qkv_mlp_proj", *SINGLE_TO_OUT],
    "attn+ffn": ["to_q", "to_k", "to_v", "to_out.0", "linear_in", "linear_out", "to_qkv_mlp_proj", *SINGLE_TO_OUT],
}


def _inputs():
    rng = np.random.default_rng(0)
    img_ids, txt_ids = sampling.image_ids((2, 3), [(2, 2)]), sampling.text_ids(5)
    x = rng.standard_normal((len(TIMESTEPS), len(img_ids), CONFIG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((len(TIMESTEPS), 5, CONFIG.joint_attention_dim)).astype(np.float32)
    return x, ctx, img_ids, txt_ids


def _jax_forward(params, adapter=None, scale=1.0):
    x, ctx, img_ids, txt_ids = _inputs()
    return np.asarray(APPLY(params, CONFIG, x, ctx, TIMESTEPS, img_ids, txt_ids, lora=adapter, lora_scale=scale))


def _torch_forward(model):
    x, ctx, img_ids, txt_ids = (torch.from_numpy(np.asarray(a)) for a in _inputs())
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.from_numpy(TIMESTEPS),
                     img_ids=img_ids, txt_ids=txt_ids).sample.numpy()


def _base():
    """A seeded tiny diffusers transformer and its foa-jax parameters (converted before any adapter is added)."""
    model = torch_models.seeded_transformer(CONFIG, seed=0)
    params = torch_models.jax_params(model, lambda: flux2.init(CONFIG, jax.random.key(0)), flux2.STACKS)
    return model, params


def _trained_adapter(params, config, seed=1):
    """lora.init with every factor moved off its init (B off zero), as after some training."""
    leaves, tree = jax.tree.flatten(lora.init(params, config, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _assert_matches(expected, got, base, what):
    diff = float(np.max(np.abs(got - expected)))
    effect = float(np.max(np.abs(expected - base)))
    print(f"{what}: max abs diff {diff:.2e} (adapter effect {effect:.2e})")
    assert effect > 1e-2, "the adapter must change the output, or the comparison proves nothing"
    assert diff <= 1e-5


def _load_via_pipeline_mixin(model, file):
    """What `Flux2Pipeline.load_lora_weights` does, without building a pipeline (text encoder, VAE)."""
    state_dict, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    Flux2LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)


# ------------------------------------------------------------------------------------- our export -> diffusers load


@pytest.mark.parametrize("targets", sorted(lora.TARGET_SETS))
@pytest.mark.parametrize("alpha", [None, 10.0])
def test_export_loads_in_diffusers_with_the_same_outputs(tmp_path, targets, alpha):
    model, params = _base()
    base_out = _torch_forward(model)
    config = lora.LoRAConfig(rank=RANK, alpha=alpha, targets=targets)
    adapter = _trained_adapter(params, config)
    expected = _jax_forward(params, adapter, config.scale)
    file = lora_io.export_lora(tmp_path, adapter, config)
    assert file == tmp_path / "pytorch_lora_weights.safetensors"

    model.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    assert model.peft_config["default_0"].lora_alpha == (alpha or RANK)
    assert model.peft_config["default_0"].r == RANK
    _assert_matches(expected, _torch_forward(model), base_out, f"{targets} alpha={alpha} load_lora_adapter")

    other = torch_models.seeded_transformer(CONFIG, seed=0)
    _load_via_pipeline_mixin(other, file)
    _assert_matches(expected, _torch_forward(other), base_out, f"{targets} alpha={alpha} pipeline loader")


def test_export_key_format_and_metadata(tmp_path):
    params = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    config = lora.LoRAConfig(rank=RANK, alpha=2.0, targets="attn")
    adapter = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                           jax.eval_shape(lambda: lora.init(params, config, jax.random.key(0))))
    file = lora_io.export_lora(tmp_path / "a.safetensors", adapter, config, metadata={"foa_step": "123"})
    d, f = CONFIG.inner_dim, CONFIG.mlp_hidden_dim
    with safe_open(str(file), framework="numpy") as handle:
        header = handle.metadata()
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (no __iter__)
    double = [f"transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")]
    single = [f"single_transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_qkv_mlp_proj", "to_out")]
    expected = {}
    for module in double:
        expected[f"transformer.{module}.lora_A.weight"] = (RANK, d)
        expected[f"transformer.{module}.lora_B.weight"] = (d, RANK)
    for i in range(2):
        stem = f"transformer.single_transformer_blocks.{i}.attn"
        expected[f"{stem}.to_qkv_mlp_proj.lora_A.weight"] = (RANK, d)
        expected[f"{stem}.to_qkv_mlp_proj.lora_B.weight"] = (3 * d + 2 * f, RANK)
        expected[f"{stem}.to_out.lora_A.weight"] = (RANK, d + f)
        expected[f"{stem}.to_out.lora_B.weight"] = (d, RANK)
    assert shapes == expected
    assert header["format"] == "pt" and header["foa_step"] == "123"
    assert json.loads(header["lora_adapter_metadata"]) == {
        "transformer.r": RANK, "transformer.lora_alpha": 2.0, "transformer.target_modules": sorted(double + single)}


# ------------------------------------------------------------------------------ PEFT / diffusers saves -> our import


def _peft_adapted(how, targets, alpha, seed=3):
    """(model, params, base output): the tiny model with a PEFT LoRA (added the diffusers way, or wrapped in a
    PeftModel) and its lora_B randomised (PEFT inits B = 0); params and the output are from before the adapter."""
    model, params = _base()
    base_out = _torch_forward(model)
    peft_config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=PEFT_TARGETS[targets])
    if how == "peft_model":
        model = get_peft_model(model, peft_config)
    else:
        model.add_adapter(peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
    return model, params, base_out


def _save(model, folder, how):
    if how == "save_lora_adapter":  # pytorch_lora_weights.safetensors, bare keys, LoraConfig JSON in the header
        model.save_lora_adapter(str(folder))
    elif how == "save_lora_weights":  # the pipeline's file: `transformer.` keys and prefixed metadata
        Flux2Pipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    else:  # PeftModel: adapter_model.safetensors (`base_model.model.` keys) + adapter_config.json
        model.save_pretrained(str(folder))


@pytest.mark.parametrize("how,targets,alpha", [
    ("save_lora_adapter", "attn+add", 10), ("save_lora_weights", "attn+ffn", RANK), ("peft_model", "attn", 2)])
def test_peft_saved_adapter_imports_with_the_same_outputs(tmp_path, how, targets, alpha):
    model, params, base_out = _peft_adapted(how, targets, alpha)
    expected = _torch_forward(model)
    _save(model, tmp_path, how)
    adapter, config = lora_io.import_lora(tmp_path, CONFIG)
    assert config == lora.LoRAConfig(rank=RANK, alpha=None if alpha == RANK else float(alpha), targets=targets)
    _assert_matches(expected, _jax_forward(params, adapter, config.scale), base_out, f"{how} {targets}")
    # a parameter tree works as the template as well as a config
    from_tree, _ = lora_io.import_lora(tmp_path, params)
    jax.tree.map(np.testing.assert_array_equal, from_tree, adapter)


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("targets,alpha", [("attn+add", None), ("attn+ffn", 12.5), ("attn", 1.0)])
def test_export_import_round_trip_is_bit_exact(tmp_path, dtype, targets, alpha):
    params = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    config = lora.LoRAConfig(rank=RANK, alpha=alpha, targets=targets)
    adapter = jax.tree.map(lambda a: a.astype(dtype), _trained_adapter(params, config))
    file = lora_io.export_lora(tmp_path / "x.safetensors", adapter, config, dtype=dtype)
    back, back_config = lora_io.import_lora(file, CONFIG, dtype=jnp.dtype(dtype))
    assert back_config == config
    assert jax.tree.structure(back) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(back)):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path):
    params = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    config = lora.LoRAConfig(rank=RANK, alpha=8.0, targets="attn+add")
    file = lora_io.export_lora(tmp_path / "good.safetensors", _trained_adapter(params, config), config)
    with safe_open(str(file), framework="numpy") as handle:
        header = handle.metadata()
    return load_file(str(file)), header, tmp_path


def _write(folder, tensors, header):
    save_file(tensors, str(folder / "bad.safetensors"), metadata=header)
    return folder / "bad.safetensors"


def test_missing_layer_is_named(exported):
    tensors, header, folder = exported
    del tensors["transformer.transformer_blocks.1.attn.add_k_proj.lora_B.weight"]
    with pytest.raises(convert.CheckpointMismatch, match=r"1 missing:\n\s+transformer_blocks\.1\.attn\.add_k_proj"
                                                         r"\.lora_B\.weight"):
        lora_io.import_lora(_write(folder, tensors, header), CONFIG)


def test_wrong_rank_is_named(exported):
    tensors, header, folder = exported
    key = "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight"
    fan_in = CONFIG.inner_dim + CONFIG.mlp_hidden_dim
    tensors[key] = np.zeros((RANK + 1, fan_in), np.float32)
    with pytest.raises(convert.CheckpointMismatch, match=r"single_transformer_blocks\.0\.attn\.to_out\.lora_A\.weight: "
                                                         rf"checkpoint \({RANK + 1}, {fan_in}\), model expects "
                                                         rf"\({RANK}, {fan_in}\)"):
        lora_io.import_lora(_write(folder, tensors, header), CONFIG)


@pytest.mark.parametrize("module", ["x_embedder", "transformer_blocks.0.attn.to_z"])
def test_unknown_module_is_named(exported, module):
    tensors, header, folder = exported
    tensors[f"transformer.{module}.lora_A.weight"] = np.zeros((RANK, 8), np.float32)
    tensors[f"transformer.{module}.lora_B.weight"] = np.zeros((32, RANK), np.float32)
    stacked = re.escape(module.replace(".0.", "."))
    with pytest.raises(ValueError, match=rf"no foa-jax LoRA target set(.|\n)*'attn\+add': adapted but not in it "
                                         rf"\['{stacked}'\], in it but not adapted \[\]"):
        lora_io.import_lora(_write(folder, tensors, header), CONFIG)


def test_modules_that_are_no_target_set_are_listed(exported):
    tensors, header, folder = exported
    tensors = {k: v for k, v in tensors.items() if ".add_v_proj." not in k}
    with pytest.raises(ValueError, match=r"'attn\+add': adapted but not in it \[\], "
                                         r"in it but not adapted \['transformer_blocks\.attn\.add_v_proj'\]"):
        lora_io.import_lora(_write(folder, tensors, header), CONFIG)


def test_non_lora_keys_and_unrepresentable_options_fail(exported):
    tensors, header, folder = exported
    with pytest.raises(convert.CheckpointMismatch, match=r"not LoRA lora_A/lora_B weights.*lora_magnitude_vector"):
        lora_io.import_lora(_write(folder, {**tensors, "transformer.transformer_blocks.0.attn.to_q."
                                                       "lora_magnitude_vector": np.ones(32, np.float32)}, header),
                            CONFIG)
    meta = {**json.loads(header["lora_adapter_metadata"]), "transformer.use_rslora": True}
    with pytest.raises(ValueError, match=r"cannot represent.*use_rslora=true"):
        lora_io.import_lora(_write(folder, tensors, {**header, "lora_adapter_metadata": json.dumps(meta)}), CONFIG)


def test_export_checks_its_config(tmp_path):
    params = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    adapter = lora.init(params, lora.LoRAConfig(rank=RANK, targets="attn+ffn"), jax.random.key(0))
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.ff\.linear_in: not in target set 'attn'"):
        lora_io.export_lora(tmp_path, adapter, lora.LoRAConfig(rank=RANK, targets="attn"))
    with pytest.raises(ValueError, match=r"do not have rank 8"):
        lora_io.export_lora(tmp_path, adapter, lora.LoRAConfig(rank=8, targets="attn+ffn"))
    with pytest.raises(ValueError, match="may not set"):
        lora_io.export_lora(tmp_path, adapter, lora.LoRAConfig(rank=RANK, targets="attn+ffn"),
                            metadata={"format": "np"})
    assert not list(tmp_path.iterdir()), "a refused export writes nothing"


def test_file_without_metadata_follows_the_diffusers_convention_alpha_equals_rank(exported):
    tensors, _, folder = exported
    _, config = lora_io.import_lora(_write(folder, tensors, {"format": "pt"}), CONFIG)
    assert config == lora.LoRAConfig(rank=RANK, alpha=None, targets="attn+add")
