"""Experiment plumbing: dotted overrides, JSONL metrics, checkpoints that refuse another run's state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from experiments import common, host
from foa_jax import lora, losses


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    sizes: tuple = (1, 2)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "a"
    inner: Inner = Inner()
    flag: bool = False


def test_dotted_overrides_parse_and_validate():
    out = common.apply_overrides(Outer(), ["inner.rate=3e-4", "inner.sizes=[4, 5]", "flag=true", "name=b"])
    assert out == Outer(name="b", inner=Inner(rate=3e-4, sizes=(4, 5)), flag=True)
    with pytest.raises(ValueError, match=r"unknown config field 'inner.speed': Inner has \['rate', 'sizes'\]"):
        common.apply_overrides(Outer(), ["inner.speed=1"])
    with pytest.raises(ValueError, match="not of the form section.field=value"):
        common.apply_overrides(Outer(), ["inner.rate"])
    with pytest.raises(ValueError, match="name is a value, not a section"):
        common.apply_overrides(Outer(), ["name.x=1"])


def test_overrides_reach_library_configs_and_their_validation():
    config = common.apply_overrides(lora.LoRAConfig(), ["rank=8", "alpha=4"])
    assert config.scale == 0.5
    with pytest.raises(ValueError, match="lpips_net must be"):
        common.apply_overrides(losses.SFTLossConfig(), ["lpips_net=squeeze"])


def test_metrics_append_and_truncate(tmp_path):
    metrics = common.Metrics(tmp_path / "m.jsonl")
    for step in range(5):
        metrics.write(step=step, loss=np.float32(step) / 2, vec=jnp.arange(2))
    assert [r["loss"] for r in metrics.read()] == [0, 0.5, 1.0, 1.5, 2.0]
    metrics.truncate_after(2)
    assert [r["step"] for r in metrics.read()] == [0, 1, 2]


def test_checkpoints_round_trip_and_refuse_a_different_state(tmp_path):
    state = {"step": jnp.int32(3), "params": {"w": jnp.ones((2, 3))}, "opt": (jnp.zeros(2), {"m": jnp.ones(3)})}
    checkpoints = common.Checkpoints(tmp_path / "ck")
    checkpoints.save(3, state)
    restored, step = checkpoints.restore_latest(state)
    assert step == 3
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    other = {**state, "params": {"w": jnp.ones((2, 4))}}
    with pytest.raises(ValueError, match="does not match this run's state"):
        checkpoints.restore_latest(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        common.Checkpoints(tmp_path / "empty").restore_latest(state)


def test_prepare_out_refuses_to_overwrite_checkpoints(tmp_path):
    (tmp_path / "run" / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        common.prepare_out(tmp_path / "run", resume=False, config=Outer())
    assert common.prepare_out(tmp_path / "run", resume=True, config=Outer()) == tmp_path / "run"


def test_a_fresh_process_restores_an_optimizer_state(tmp_path):
    """Orbax keys namedtuple optimizer states by field name and empty states by None: both must match the template."""
    import jax

    from foa_jax import train

    optim = train.OptimConfig()
    state = train.init_state({"w": jnp.arange(3.0)}, optim, jax.random.PRNGKey(0))
    common.Checkpoints(tmp_path / "ck").save(5, state)
    restored, step = common.Checkpoints(tmp_path / "ck").restore_latest(state)  # a new manager, as after a restart
    assert step == 5
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = train.init_state({"w": jnp.arange(4.0)}, optim, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"opt_state\.1\.0\.mu\.w"):
        common.Checkpoints(tmp_path / "ck").restore_latest(other)


def test_string_fields_take_the_text_as_written():
    @dataclasses.dataclass(frozen=True)
    class Policy:
        remat: str = "full"
        alpha: float | None = 1.0

    assert common.apply_overrides(Policy(), ["remat=none", "alpha=none"]) == Policy(remat="none", alpha=None)
    assert common.apply_overrides(Inner(), ["sizes=(psnr, ssim,lpips)"]).sizes == ("psnr", "ssim", "lpips")


def test_cached_fingerprint_is_computed_once_per_file_state(tmp_path, monkeypatch):
    """The expensive content hash runs once for unchanged files, again when one is rewritten, always without sources."""
    import os

    monkeypatch.setenv("FOA_FINGERPRINT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    (weights / "transformer").mkdir(parents=True)
    shard = weights / "transformer" / "shard.bin"
    shard.write_bytes(b"a" * 64)
    calls = []

    def compute():
        calls.append(1)
        return f"hash{len(calls)}"

    assert common.cached_fingerprint([weights], compute) == "hash1"
    assert common.cached_fingerprint([weights], compute) == "hash1"
    assert len(calls) == 1
    shard.write_bytes(b"b" * 64)  # same size: the modification time tells them apart
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert common.cached_fingerprint([weights], compute) == "hash2"
    assert common.cached_fingerprint(None, compute) == "hash3"
    assert common.cached_fingerprint(None, compute) == "hash4"


def test_model_sources_name_every_file_a_stage_loads(tmp_path):
    import argparse

    weights = tmp_path / "weights"
    (weights / "transformer").mkdir(parents=True)
    (weights / "vae").mkdir()
    args = argparse.Namespace(transformer=None, vae=None, prompt_embedding=None)
    assert common.model_sources(args, weights) is None  # no prompt embedding: a random one would be drawn
    (weights / "prompt_embedding.safetensors").write_bytes(b"")
    assert common.model_sources(args, weights) == [weights / "transformer", weights / "vae",
                                                   weights / "prompt_embedding.safetensors"]
    (weights / "lora.safetensors").write_bytes(b"")
    args.vae = tmp_path / "converted_vae"
    assert common.model_sources(args, weights) == [weights / "transformer", tmp_path / "converted_vae",
                                                   weights / "prompt_embedding.safetensors",
                                                   weights / "lora.safetensors"]


def test_reserve_step_heap_reserves_three_times_the_temporaries(monkeypatch):
    """`train_loop`'s reserve follows XLA's plan for the compiled step; none without the tuned allocator."""
    reserved = []
    monkeypatch.setattr(host, "reserve_heap", lambda nbytes: reserved.append(nbytes) or nbytes)
    x = jnp.ones((256, 256))
    compiled = jax.jit(lambda a: jnp.tanh(a @ a) @ jnp.sin(a @ a.T)).lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    monkeypatch.setattr(experiments, "ALLOCATOR_TUNED", True)
    assert temp > 0 and common.reserve_step_heap(compiled) == common.HEAP_RESERVE_TEMPS * temp == reserved[0]
    monkeypatch.setattr(experiments, "ALLOCATOR_TUNED", False)
    assert common.reserve_step_heap(compiled) == 0 and len(reserved) == 1
