"""Weight conversion: diffusers and BFL checkpoints -> orbax -> load -> parity with the torch models; strictness."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from foa_jax import params as P
from foa_jax import sampling
from foa_jax.models import flux2, vae
from ports import convert, torch_models
from tests import torch_reference

T_CONFIG = flux2.Flux2Config(**torch_reference.SMALL_TRANSFORMER)
V_CONFIG = vae.VAEConfig(**torch_reference.SMALL_VAE)


@pytest.fixture(scope="module")
def models():
    return torch_models.seeded_transformer(T_CONFIG, seed=3), torch_models.seeded_vae(V_CONFIG, seed=4)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, models):
    """A diffusers-style pipeline folder; the transformer is sharded into many files with an index json."""
    root = tmp_path_factory.mktemp("pipe")
    models[0].save_pretrained(root / "transformer", max_shard_size="40KB")
    models[1].save_pretrained(root / "vae")
    return root


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_trees_equal(a, b):
    fa, fb = P.flatten(a), P.flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key], np.float32), np.asarray(fb[key], np.float32), err_msg=key)


def _transformer_parity(params, config, model):
    rng = np.random.default_rng(0)
    img_ids, txt_ids = sampling.image_ids((2, 3), [(2, 3)]), sampling.text_ids(5)
    x = rng.standard_normal((2, len(img_ids), config.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, config.joint_attention_dim)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    ours = flux2.apply(params, config, x, ctx, t, img_ids, txt_ids, guidance=np.full(2, 2.5, np.float32))
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                    timestep=torch.from_numpy(t), img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                    guidance=torch.full((2,), 2.5)).sample.numpy()
    return float(np.max(np.abs(np.asarray(ours) - ref)))


def _vae_parity(params, config, model):
    images = np.random.default_rng(1).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    ours = vae.decode(params, config, vae.encode(params, config, images))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        ref = model.decode(model.encode(x).latent_dist.mode()).sample.permute(0, 2, 3, 1).numpy()
    return float(np.max(np.abs(np.asarray(ours) - ref)))


def test_cli_converts_a_sharded_pipeline_and_loads_with_parity(tmp_path, pipeline_dir, models):
    shards = list((pipeline_dir / "transformer").glob("*.safetensors"))
    assert len(shards) > 3, "the fixture must exercise a multi-shard checkpoint"
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "ports.convert", str(pipeline_dir), "--out", str(out),
                             "--dtype", "float32"], capture_output=True, text=True, check=True)
    assert "peak host memory" in result.stdout
    assert f"transformer: {flux2.param_count(T_CONFIG):,} parameters" in result.stdout
    params, config = convert.load_transformer(out)
    assert config == T_CONFIG
    assert _transformer_parity(params, config, models[0]) <= 1e-5
    vparams, vconfig = convert.load_vae(out)
    assert vconfig == V_CONFIG
    assert _vae_parity(vparams, vconfig, models[1]) <= 1e-5
    # the folder can also be loaded without converting first, with the same numbers
    direct, _ = convert.load_transformer(pipeline_dir)
    _assert_trees_equal(direct, params)


def test_bf16_output_is_the_rounded_checkpoint(tmp_path, pipeline_dir, models):
    params, _, _ = convert.convert(pipeline_dir / "transformer", dtype="bfloat16")
    expected = convert.from_state_dict(jax.eval_shape(lambda: flux2.init(T_CONFIG, jax.random.key(0))),
                                       _state(models[0]), flux2.STACKS)
    for path, leaf in P.flatten(params).items():
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(leaf, np.asarray(P.flatten(expected)[path]).astype(jnp.bfloat16))


@pytest.mark.parametrize("prefixed", [True, False])
def test_bfl_transformer_through_the_inverse_mapping(tmp_path, models, prefixed):
    state = _state(models[0])
    bfl = convert.diffusers_to_bfl(state, "transformer")
    assert "single_stream_modulation.lin.weight" in bfl and "double_blocks.1.img_attn.qkv.weight" in bfl
    assert len(bfl) == len(state) - 2 * 3 * T_CONFIG.num_layers + 2 * T_CONFIG.num_layers  # qkv fused per stream
    prefix = convert.BFL_PREFIX if prefixed else ""
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in bfl.items()}, tmp_path / "flux2-dev.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(T_CONFIG.to_diffusers()))
    params, config, _ = convert.convert(tmp_path / "flux2-dev.safetensors", config_path=tmp_path / "config.json")
    direct = convert.from_state_dict(jax.eval_shape(lambda: flux2.init(T_CONFIG, jax.random.key(0))), state,
                                     flux2.STACKS)
    _assert_trees_equal(params, direct)
    assert _transformer_parity(params, config, models[0]) <= 1e-5


def test_bfl_vae_through_the_inverse_mapping(tmp_path, models):
    state = _state(models[1])
    bfl = convert.diffusers_to_bfl(state, "vae", up_blocks=len(V_CONFIG.block_out_channels))
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4  # BFL keeps 1x1 convs
    assert "decoder.up.1.upsample.conv.weight" in bfl  # up-block indices are reversed
    save_file({k: np.ascontiguousarray(v) for k, v in bfl.items()}, tmp_path / "ae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(V_CONFIG.to_diffusers()))
    params, config, _ = convert.convert(tmp_path / "ae.safetensors", config_path=tmp_path / "config.json")
    _assert_trees_equal(params, convert.from_state_dict(jax.eval_shape(lambda: vae.init(V_CONFIG, jax.random.key(0))),
                                                        state))
    assert _vae_parity(params, config, models[1]) <= 1e-5


def _single_file(tmp_path, state, name="model.safetensors"):
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps(T_CONFIG.to_diffusers()))
    return tmp_path / name, tmp_path / "config.json"


def test_missing_extra_and_misshaped_keys_are_all_named(tmp_path, models):
    state = _state(models[0])
    del state["transformer_blocks.1.attn.norm_added_k.weight"]
    state["transformer_blocks.7.attn.to_q.weight"] = np.zeros((32, 32), np.float32)
    state["proj_out.weight"] = state["proj_out.weight"][:, :-1]
    path, config = _single_file(tmp_path, state)
    with pytest.raises(convert.CheckpointMismatch) as err:
        convert.convert(path, config_path=config)
    message = str(err.value)
    assert "1 missing:\n    transformer_blocks.1.attn.norm_added_k.weight" in message
    assert "1 unexpected:\n    transformer_blocks.7.attn.to_q.weight" in message
    assert "proj_out.weight: checkpoint (8, 31), model expects (8, 32)" in message


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_each_kind_of_mismatch_fails_alone(tmp_path, models, damage):
    state = _state(models[0])
    key = "single_transformer_blocks.0.attn.to_out.weight"
    if damage == "missing":
        del state[key]
    elif damage == "extra":
        state["made_up.weight"] = np.ones(3, np.float32)
    else:
        state[key] = np.zeros((4, 4), np.float32)
    path, config = _single_file(tmp_path, state)
    with pytest.raises(convert.CheckpointMismatch, match=re.escape(key if damage != "extra" else "made_up.weight")):
        convert.convert(path, config_path=config)


def test_single_file_preset_is_detected_or_refused(tmp_path):
    tiny = flux2.preset("tiny")
    model = torch_models.seeded_transformer(tiny, seed=1)
    path, _ = _single_file(tmp_path, _state(model), "tiny.safetensors")
    params, config, _ = convert.convert(path)
    assert config == tiny
    assert P.count(params) == flux2.param_count(tiny)
    path, _ = _single_file(tmp_path, {k: v.detach().numpy() for k, v in torch_models.seeded_transformer(
        T_CONFIG).state_dict().items()}, "custom.safetensors")
    with pytest.raises(convert.CheckpointMismatch, match="matches no transformer preset"):
        convert.convert(path)


def test_truncated_file_is_named(tmp_path, models):
    path, config = _single_file(tmp_path, _state(models[0]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(convert.CheckpointMismatch, match="truncated or inconsistent"):
        convert.convert(path, config_path=config)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(convert.CheckpointMismatch, match="not a readable safetensors file"):
        convert.convert(path, config_path=config)


def test_converted_checkpoint_of_another_shape_is_refused(tmp_path, pipeline_dir):
    params, config, model = convert.convert(pipeline_dir / "transformer")
    out = convert.save(tmp_path / "ckpt", params, config, model, "test")
    meta = json.loads((out / convert.FOA_CONFIG).read_text())
    meta["config"]["num_single_layers"] = 3
    (out / convert.FOA_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(convert.CheckpointMismatch, match=r"checkpoint \(2, .*\), config expects \(3, "):
        convert.load_transformer(out)
    with pytest.raises(convert.CheckpointMismatch, match="holds a 'transformer' checkpoint, expected 'vae'"):
        convert.load_vae(out)


def test_a_saved_checkpoint_loads_through_a_relative_path(tmp_path, monkeypatch):
    config = vae.VAEConfig.preset("tiny")
    params = vae.init(config, jax.random.PRNGKey(0))
    convert.save(tmp_path / "weights" / "vae", params, config, convert.KINDS["vae"], "test")
    monkeypatch.chdir(tmp_path)
    loaded, loaded_config = convert.load_vae("weights/vae")
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------------------- CLI


def _run_cli(capsys, *argv):
    """`python -m ports.convert` in this process: (exit status, stdout, stderr)."""
    status = convert.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m ports.convert: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_states_the_output_dtype(capsys):
    with pytest.raises(SystemExit) as exit_:
        convert.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: bfloat16, the dtype FLUX.2's weights are released in" in text
    assert "--force" in text


def test_cli_prints_the_dtype_a_progress_bar_and_its_peak_memory(tmp_path, pipeline_dir, capsys):
    status, out, err = _run_cli(capsys, pipeline_dir / "transformer", "--out", tmp_path / "t")
    assert status == 0
    assert out.splitlines()[0].startswith("writing bfloat16 parameters (the default;")
    tensors = len(convert.plan(jax.eval_shape(lambda: flux2.init(T_CONFIG, jax.random.key(0))), flux2.STACKS))
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("transformer: 100%") and f"{tensors}/{tensors} tensors" in final, err
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", final)  # elapsed < time left
    assert re.search(r"peak host memory \d+ MiB above the \d+ MiB at start: [\d.]+x the \d+ MiB written", out)
    params, config = convert.load_transformer(tmp_path / "t")
    assert config == T_CONFIG and {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_user_errors_are_one_line_and_exit_status_2(tmp_path, pipeline_dir, models, capsys):
    state = _state(models[0])
    del state["transformer_blocks.1.attn.norm_added_k.weight"]
    missing, config = _single_file(tmp_path, state, "missing.safetensors")
    state = {**_state(models[0]), "made_up.weight": np.ones(3, np.float32)}
    unexpected, _ = _single_file(tmp_path, state, "unexpected.safetensors")
    cases = {
        "missing key": ([missing, "--config", config], "1 missing (transformer_blocks.1.attn.norm_added_k.weight)"),
        "unexpected key": ([unexpected, "--config", config], "1 unexpected (made_up.weight)"),
        "wrong kind": ([pipeline_dir / "transformer", "--kind", "vae"],
                       "holds a transformer checkpoint (its config's _class_name is Flux2Transformer2DModel), not a "
                       "vae: pass --kind transformer or --kind auto"),
        "missing source": ([tmp_path / "nowhere"], f"{tmp_path / 'nowhere'} does not exist"),
    }
    for name, (argv, expected) in cases.items():
        status, _, err = _run_cli(capsys, *argv, "--out", tmp_path / "out" / name)
        assert status == 2, name
        assert expected in _one_line_error(err), name
        assert not (tmp_path / "out" / name / convert.FOA_CONFIG).exists()


def test_user_error_exit_status_from_the_shell(tmp_path, pipeline_dir):
    result = subprocess.run([sys.executable, "-m", "ports.convert", str(pipeline_dir / "vae"), "--kind", "transformer",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "holds a vae checkpoint (its config's _class_name is AutoencoderKLFlux2), not a transformer" in \
        _one_line_error(result.stderr)


def test_existing_output_needs_force(tmp_path, pipeline_dir, capsys):
    out = tmp_path / "out"
    assert _run_cli(capsys, pipeline_dir / "vae", "--out", out, "--dtype", "float32")[0] == 0
    (out / "notes.txt").write_text("kept")
    status, _, err = _run_cli(capsys, pipeline_dir / "vae", "--out", out)
    assert status == 2 and "exists and is not empty: pass --force" in _one_line_error(err)
    assert json.loads((out / convert.FOA_CONFIG).read_text())["dtype"] == "float32"  # untouched
    assert _run_cli(capsys, pipeline_dir / "vae", "--out", out, "--force")[0] == 0
    assert json.loads((out / convert.FOA_CONFIG).read_text())["dtype"] == "bfloat16"
    assert (out / "notes.txt").read_text() == "kept"
    params, config = convert.load_vae(out)
    assert config == V_CONFIG and jax.tree.leaves(params)[0].dtype == jnp.bfloat16


def test_an_interrupted_write_leaves_nothing_that_loads_and_is_cleared(tmp_path):
    config = vae.VAEConfig.preset("tiny")
    params = vae.init(config, jax.random.PRNGKey(0))
    stale = tmp_path / "vae" / "params.writing.partial_save"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from an interrupted save")
    convert.save(tmp_path / "vae", params, config, convert.KINDS["vae"], "test")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [convert.FOA_CONFIG, "params"]
    _assert_trees_equal(convert.load_vae(tmp_path / "vae")[0], params)


def test_a_folder_written_by_the_standard_checkpointer_still_loads(tmp_path):
    import orbax.checkpoint as ocp

    config = vae.VAEConfig.preset("tiny")
    params = vae.init(config, jax.random.PRNGKey(0))
    convert.save(tmp_path / "new", params, config, convert.KINDS["vae"], "test")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / convert.FOA_CONFIG).write_text((tmp_path / "new" / convert.FOA_CONFIG).read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "old" / "params").absolute(), params)
    _assert_trees_equal(convert.load_vae(tmp_path / "old")[0], params)


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is read from Linux's /proc")


@LINUX_ONLY
def test_peak_memory_counts_a_spike_that_is_gone_by_the_end():
    code = ("import numpy as np; from ports.convert import PeakMemory\n"
            "with PeakMemory() as memory:\n    spike = np.ones(200 * 2**20, np.uint8)\n    del spike\n"
            "print(memory.peak_mib)")
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 195 <= peak <= 215


@LINUX_ONLY
def test_conversion_streams_its_output_instead_of_holding_it(tmp_path):
    """A few-hundred-MB checkpoint's conversion peaks at about its largest leaf (the output is saved a group of
    leaves at a time) plus one source tensor and orbax's buffers: well under the whole output, which a conversion
    that builds the tree before saving it holds about three times over."""
    config = flux2.Flux2Config(in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=128,
                               num_attention_heads=6, joint_attention_dim=768, axes_dims_rope=(32, 32, 32, 32))
    template = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    convert.save_diffusers(tmp_path / "src", jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), template),
                           config, "transformer")
    result = subprocess.run([sys.executable, "-m", "ports.convert", str(tmp_path / "src"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, check=True)
    peak = float(re.search(r"peak host memory (\d+) MiB above", result.stdout)[1])
    mib, bf16 = 2**20, 2
    output = P.count(template) * bf16 / mib
    leaf = max(int(np.prod(x.shape)) for x in P.flatten(template).values()) * bf16 / mib
    tensor = max(int(np.prod(s.torch_shape)) for s in convert.plan(template, flux2.STACKS).values()) * 4 / mib
    assert output > 150 and leaf < 0.4 * output
    print(result.stdout)
    assert peak <= 1.5 * leaf + tensor + 32


# ------------------------------------------------------------------------------------------------ diffusers folders

# (preset, init, parity, float32 tolerance): the tiny transformer's outputs reach |x| ~ 4 from a random init, so its
# float32 difference is a few 1e-5 where the small, perturbed models' above stay under 1e-5.
TINY = {"transformer": (flux2.preset, flux2.init, _transformer_parity, 1e-4),
        "vae": (vae.VAEConfig.preset, vae.init, _vae_parity, 1e-5)}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_save_diffusers_round_trips_and_loads_in_diffusers(tmp_path, kind):
    import diffusers

    preset, init, parity, tolerance = TINY[kind]
    config = preset("tiny")
    params = init(config, jax.random.key(7))
    folder = convert.save_diffusers(tmp_path / kind, params, config, kind)
    loaded, loaded_config = convert.load(folder, kind)
    assert loaded_config.to_diffusers() == config.to_diffusers()
    _assert_trees_equal(loaded, params)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.float32)}
    model = getattr(diffusers, convert.KINDS[kind].diffusers_class).from_pretrained(folder).eval()
    assert parity(params, config, model) <= tolerance
