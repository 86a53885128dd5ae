"""ports.weights: a weights folder round-trips bit for bit, and a missing, truncated, zeroed or edited file, a folder
without manifest and an existing folder are errors naming the thing before any tensor is used."""

import json

import jax
import numpy as np
import pytest

from foa_jax import lora as lora_lib
from foa_jax import params as P
from foa_jax.models import flux2, vae
from ports import weights

PROMPT_META = {"prompts": ["a test"], "max_length": 4, "layers": [0], "encoder": "test: random",
               "encoder_config_sha256": ""}


@pytest.fixture(scope="module")
def models():
    t_config = flux2.preset("tiny")
    v_config = vae.VAEConfig.preset("tiny")
    t_params = jax.jit(flux2.init, static_argnums=0)(t_config, jax.random.key(0))
    v_params = vae.init(v_config, jax.random.key(1))
    v_params["bn"]["running_mean"] = v_params["bn"]["running_mean"] + 0.25  # statistics round-trip too
    prompt = np.asarray(jax.random.normal(jax.random.key(2), (1, 4, t_config.joint_attention_dim)), np.float32)
    return t_params, t_config, v_params, v_config, prompt


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    t_params, t_config, v_params, v_config, prompt = models
    return weights.save(tmp_path_factory.mktemp("w") / "weights", vae_params=v_params, vae_config=v_config,
                        prompt=prompt, prompt_meta=PROMPT_META, provenance={"command": "test", "data": "none"},
                        transformer=(t_params, t_config))


def _equal(a, b):
    fa, fb = P.flatten(a), P.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_round_trip_is_exact(models, folder):
    t_params, t_config, v_params, v_config, prompt = models
    loaded = weights.load(folder)
    _equal(loaded.transformer, t_params)
    _equal(loaded.vae, v_params)
    np.testing.assert_array_equal(loaded.prompt, prompt)
    assert loaded.transformer_config.to_diffusers() == t_config.to_diffusers()
    assert loaded.vae_config.to_diffusers() == v_config.to_diffusers()
    assert loaded.lora is None and loaded.prompt_meta["encoder"] == "test: random"
    vae_only = weights.load(weights.save(folder.parent / "vae_only", vae_params=v_params, vae_config=v_config,
                                         provenance={}))
    assert vae_only.prompt is None and vae_only.transformer is None
    _equal(vae_only.vae, v_params)
    manifest = json.loads((folder / weights.MANIFEST).read_text())
    assert manifest["provenance"] == {"command": "test", "data": "none"}
    assert set(manifest["files"]) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                                      "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                                      "prompt_embedding.safetensors"}
    assert not list(folder.parent.glob(".*tmp*"))


def test_fingerprint_is_stable_and_names_the_content(models, folder, tmp_path):
    t_params, t_config, v_params, v_config, prompt = models
    assert weights.fingerprint(folder) == weights.fingerprint(folder)
    other = weights.save(tmp_path / "other", vae_params=v_params, vae_config=v_config, prompt=prompt + 1,
                         prompt_meta=PROMPT_META, provenance={"command": "test", "data": "none"},
                         transformer=(t_params, t_config))
    assert weights.fingerprint(other) != weights.fingerprint(folder)


@pytest.mark.parametrize("damage", ["zero", "truncate", "flip", "delete"])
def test_a_damaged_file_is_named(folder, tmp_path, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    target = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "zero":
        data[len(data) // 2:len(data) // 2 + 255] = bytes(255)
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    elif damage == "flip":
        data[-5] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(weights.CorruptWeights, match="transformer/diffusion_pytorch_model.safetensors"):
        weights.load(copy)


def test_folders_without_manifest_or_in_the_way_are_refused(models, folder, tmp_path):
    t_params, t_config, v_params, v_config, prompt = models
    with pytest.raises(weights.CorruptWeights, match="no manifest.json"):
        weights.load(tmp_path)
    with pytest.raises(FileExistsError, match="exists"):
        weights.save(folder, vae_params=v_params, vae_config=v_config, prompt=prompt, prompt_meta=PROMPT_META,
                     provenance={})
    with pytest.raises(ValueError, match="not both"):
        weights.save(tmp_path / "x", vae_params=v_params, vae_config=v_config, prompt=prompt, prompt_meta=PROMPT_META,
                     provenance={}, transformer=(t_params, t_config), lora=({}, lora_lib.LoRAConfig()))


def test_lora_folder_needs_its_base(models, tmp_path):
    t_params, t_config, v_params, v_config, prompt = models
    config = lora_lib.LoRAConfig(rank=2)
    adapter = lora_lib.init(t_params, config, jax.random.key(3))
    adapter = jax.tree.map(lambda a: a + 0.5, adapter)  # B is zero at init: make the round trip see values
    folder = weights.save(tmp_path / "lora", vae_params=v_params, vae_config=v_config, prompt=prompt,
                          prompt_meta=PROMPT_META, provenance={}, lora=(adapter, config))
    with pytest.raises(ValueError, match="lora_base"):
        weights.load(folder)
    loaded = weights.load(folder, lora_base=t_params)
    _equal(loaded.lora, adapter)
    assert (loaded.lora_config.rank, loaded.lora_config.scale) == (config.rank, config.scale)
    assert loaded.transformer is None


def test_each_model_subfolder_carries_its_own_manifest(folder):
    """`vae/` and `transformer/` say what made them and hash their files, exactly as the folder's manifest does."""
    import json

    root = weights.verify(folder)
    for part in (weights.VAE, weights.TRANSFORMER):
        record = json.loads((folder / part / weights.MANIFEST).read_text())
        assert record["part_of"] == "../manifest.json"
        assert record["provenance"]["command"] == root["provenance"].get("command")
        listed = {f"{part}/{name}": entry for name, entry in record["files"].items()}
        assert listed == {k: v for k, v in root["files"].items() if k.startswith(f"{part}/")} and listed
        for name, entry in record["files"].items():
            assert weights.file_sha256(folder / part / name) == entry["sha256"]
