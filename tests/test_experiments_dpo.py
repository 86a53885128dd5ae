"""experiments.dpo --profile: on pairs mined from a random tiny Flux2SR, the first logged loss is log 2 (policy =
reference), the adapter exports and imports, a resumed run continues the same curve, and pairs from another
checkpoint are refused before any training."""

import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import artifacts, common, dpo, mine
from foa_jax.models import flux2, vae
from ports import lora_io, photos, weights

MINE = ["data.gt_size=64", "inputs=4", "pool_size=3", "nested_pool_sizes=(2, 3)", "sample_steps=2", "batch=3",
        "reward.faithful_metrics=(psnr, ssim)", "reward.aesthetic_metrics=(piqe,)", "reward.gap_threshold=0.01",
        "grid_inputs=1"]
DPO = ["batch=2", "checkpoint_every=2", "lora.rank=4", "optim.warmup=1"]


def _flux2sr(folder, seed):
    """A random tiny Flux2SR (1 double + 1 single block) as a weights folder, as experiments.sft writes it."""
    t_config = flux2.preset("tiny", num_layers=1, num_single_layers=1)
    v_config = vae.VAEConfig.preset("tiny")
    prompt = common.tiny_prompt(t_config)
    return weights.save(folder, vae_params=vae.init(v_config, jax.random.key(1)), vae_config=v_config,
                        prompt=np.asarray(prompt), prompt_meta=common.prompt_meta(_no_prompt(), prompt),
                        transformer=(jax.jit(flux2.init, static_argnums=0)(t_config, jax.random.key(seed)), t_config),
                        provenance={"command": "test"})


def _no_prompt():
    import argparse

    return argparse.Namespace(prompt_embedding=None)


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    hr = root / "hr"
    hr.mkdir()
    for name in ("camera", "coins"):
        Image.fromarray(photos.skimage_photo(name)[:160, :200]).save(hr / f"{name}.png")
    sft_weights = _flux2sr(root / "sft" / "weights", seed=0)
    mine.main([*MINE, "--out", str(root / "mine"), "--sft", str(sft_weights), "--hr", str(hr)])
    return root


def _train(root, out, steps, *extra):
    return dpo.main(["--profile", "faithful", "--pairs", str(root / "mine"), "--sft", str(root / "sft" / "weights"),
                     "--out", str(out), "--steps", str(steps), *extra, *DPO])


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_stage_starts_at_log2_exports_and_resumes_exactly(mined, tmp_path):
    assert len(artifacts.load(artifacts.pairs_path(mined / "mine", "faithful"))[0]["gap"]) >= 1
    straight = tmp_path / "straight"
    file = _train(mined, straight, 3)
    records = _records(straight)
    assert [r["step"] for r in records] == [0, 1, 2]
    # the policy starts as the reference: Δ is zero up to the rounding of two differently fused programs
    assert abs(records[0]["delta"]) < 1e-6
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.25 * 1000 * 1e-6)  # softplus slope β/4

    adapter, config = lora_io.import_lora(file, weights.load(mined / "sft" / "weights").transformer)
    assert config.rank == 4
    assert any(float(np.abs(leaf).max()) > 0 for name, leaf in jax.tree_util.tree_leaves_with_path(adapter)
               if "lora_B" in jax.tree_util.keystr(name))

    resumed = tmp_path / "resumed"
    _train(mined, resumed, 2)
    _train(mined, resumed, 3, "--resume")
    assert [(r["step"], r["loss"], r["accuracy"]) for r in _records(resumed)] == \
        [(r["step"], r["loss"], r["accuracy"]) for r in records]


def test_pairs_of_another_checkpoint_are_refused_before_training(mined, tmp_path):
    other = _flux2sr(tmp_path / "other" / "weights", seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        dpo.main(["--profile", "faithful", "--pairs", str(mined / "mine"), "--sft", str(other),
                  "--out", str(tmp_path / "run"), "--steps", "1", *DPO])
    assert not (tmp_path / "run").exists()


def test_unknown_profile_is_an_error():
    with pytest.raises(SystemExit):
        dpo.main(["--profile", "artistic"])
