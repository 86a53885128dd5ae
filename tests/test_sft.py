"""experiments.sft: an interrupted and resumed run reproduces the uninterrupted loss curve and weights exactly."""

import json

import jax
import numpy as np
import pytest

from experiments import sft
from foa_jax.models import vae
from ports import convert

# 64-px crops, 6 cached samples, 2 per step, the whole objective (the tiny preset itself trains with flow matching
# only) with LPIPS-Alex from step 0, no held-out sampling: a run in seconds.
TINY_RUN = ["samples=6", "batch=2", "data.gt_size=64", "loss.lambda_pix=1", "loss.lambda_lpips=0.5",
            "loss.pixel_samples=0", "loss.lpips_net=alex", "loss.lpips_start=0",
            "loss.lpips_end=2", "checkpoint_every=2", "validate=false", "optim.warmup=1"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random tiny VAE on disk (the VAE stage itself takes minutes)."""
    config = vae.VAEConfig.preset("tiny")
    path = tmp_path_factory.mktemp("vae") / "vae"
    convert.save(path, vae.init(config, jax.random.PRNGKey(0)), config, convert.KINDS["vae"], "test")
    return path


def _run(out, tiny_vae, steps, *extra):
    return sft.main(["--out", str(out), "--vae", str(tiny_vae), "--steps", str(steps), *extra, *TINY_RUN])


def _losses(out):
    return [(r["step"], r["loss"], r["fm"], r["pix"], r["lpips"], r["grad_norm"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_vae, tmp_path):
    straight = _run(tmp_path / "straight", tiny_vae, 4)

    # "killed" after step 3 was logged but before its checkpoint: only the step-2 checkpoint survives
    interrupted = _run(tmp_path / "interrupted", tiny_vae, 3)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    import shutil

    shutil.rmtree(interrupted / "checkpoints" / "3")
    _run(interrupted, tiny_vae, 4, "--resume")

    want, got = _losses(straight), _losses(interrupted)
    assert [s for s, *_ in want] == [0, 1, 2, 3]
    assert got == want  # bit-identical: same batches, keys and compiled step
    assert want[0][1] != want[-1][1]
    a, _ = convert.load_transformer(straight / "weights" / "transformer")
    b, _ = convert.load_transformer(interrupted / "weights" / "transformer")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(FileExistsError, match="--resume"):  # a second run into the same folder
        _run(straight, tiny_vae, 4)


def test_lora_mode_trains_only_the_adapter_and_exports_it(tiny_vae, tmp_path):
    out = _run(tmp_path / "lora", tiny_vae, 2, "mode=lora", "lora.rank=4", "bf16=false", "remat=none")
    assert (out / "weights" / "lora.safetensors").exists()
    assert not (out / "weights" / "transformer").exists()
    records = _losses(out)
    assert len(records) == 2 and all(np.isfinite(r[1]) for r in records)


def test_unknown_override_is_an_error_naming_the_fields():
    with pytest.raises(ValueError, match="unknown config field 'lora.rnak'"):
        sft.config_for("tiny", ["lora.rnak=4"])
