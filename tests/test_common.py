"""Experiment plumbing: JSONL metrics, checkpoints that refuse another run's state, model loading that never makes a
model up, the heap reserve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from experiments import common, configs, host
from ports import weights


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
        common.prepare_out(tmp_path / "run", resume=False, config=configs.get("tiny").sft)
    assert common.prepare_out(tmp_path / "run", resume=True, config=configs.get("tiny").sft) == tmp_path / "run"


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


def _flags(**changes):
    import argparse

    flags = {"transformer": None, "vae": None, "prompt_embedding": None, "random_init": False, "seed": 0}
    return argparse.Namespace(**{**flags, **changes})


def test_no_model_is_made_up_without_asking(tmp_path):
    """A missing Flux2SR is an error naming --sft; --random-init gives a random tiny model that says so."""
    tiny, dev = configs.get("tiny"), configs.get("flux2-dev")
    with pytest.raises(FileNotFoundError, match="--sft"):
        common.load_flux2sr(_flags(), tiny, None)
    with pytest.raises(FileNotFoundError, match="--sft"):
        common.load_flux2sr(_flags(random_init=True), dev, None)
    announced = []
    flux2sr = common.load_flux2sr(_flags(random_init=True), tiny, None, announce=announced.append)
    assert flux2sr.random and "RANDOM" in flux2sr.source and "RANDOM" in announced[0]
    with pytest.raises(FileNotFoundError, match="--transformer is required"):
        common.load_models(_flags(), dev)
    with pytest.raises(weights.CorruptWeights, match="no manifest.json"):
        common.load_flux2sr(_flags(), tiny, tmp_path)


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
