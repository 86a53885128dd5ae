"""experiments.sft: an interrupted and resumed run reproduces the uninterrupted loss curve and weights exactly; the
weights folder holds what was trained; the reference diagnostic trains towards the reference itself."""

import json

import jax
import numpy as np
import pytest

from experiments import configs, sft
from foa_jax import sr, train
from foa_jax.data import cache as cache_lib
from foa_jax.data.dataset import DataConfig, Dataset
from foa_jax.models import vae
from ports import convert, weights

# 64-px crops, 6 cached samples, 2 per step, the whole objective with LPIPS-Alex from step 0, no held-out sampling:
# a run in seconds.
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
    sft.main(["--out", str(out), "--vae", str(tiny_vae), "--steps", str(steps), *extra, *TINY_RUN])
    return out


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
    a, b = weights.load(straight / "weights").transformer, weights.load(interrupted / "weights").transformer
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(FileExistsError, match="--resume"):  # a second run into the same folder
        _run(straight, tiny_vae, 4)


def test_lora_mode_trains_only_the_adapter_and_exports_it(tiny_vae, tmp_path):
    out = _run(tmp_path / "lora", tiny_vae, 2, "mode=lora", "lora.rank=4", "bf16=false", "remat=none")
    assert (out / "weights" / "lora.safetensors").exists()
    assert not (out / "weights" / "transformer").exists()
    assert weights.verify(out / "weights")["provenance"]["stage"] == "sft"
    records = _losses(out)
    assert len(records) == 2 and all(np.isfinite(r[1]) for r in records)


def test_unknown_override_is_an_error_naming_the_fields(capsys):
    with pytest.raises(SystemExit):
        sft.main(["lora.rnak=4"])
    assert "unknown config field 'lora.rnak'" in capsys.readouterr().err


def test_the_reference_diagnostic_targets_the_reference(tmp_path):
    """With target=reference a batch's target tokens are its condition tokens and its target images the bicubic
    upsampling of its LR: the model learns to reproduce its reference."""
    config = configs.override(configs.get("tiny"), ["sft.target=reference", "sft.batch=2"]).sft
    v_config = vae.VAEConfig.preset("tiny")
    v_params = vae.init(v_config, jax.random.PRNGKey(0))
    data = DataConfig(gt_size=64, crops_per_image=2)
    photos = {"a": np.random.default_rng(0).integers(0, 256, (80, 96, 3), np.uint8)}
    encode = jax.jit(lambda x: vae.encode_tokens(v_params, v_config, sr.to_model_range(x)))
    cache = cache_lib.build(tmp_path / "cache", Dataset(data, photos, report=lambda m: None), 3, encode, "test",
                            report=lambda m: None)
    batch = sft.training_batch(cache, 0, 0, config)
    np.testing.assert_array_equal(batch["z"], batch["cond"])
    raw = cache.batch(train.batch_indices(0, 0, len(cache), 2))
    np.testing.assert_allclose(batch["hr"][0], sr.upsample_lr(raw["lr"], (64, 64)), atol=1e-6)
    plain = sft.training_batch(cache, 0, 0, configs.override(configs.get("tiny"), ["sft.batch=2"]).sft)
    np.testing.assert_array_equal(plain["cond"], batch["cond"])
    assert not np.array_equal(plain["z"], batch["z"])
