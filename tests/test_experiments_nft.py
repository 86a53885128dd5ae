"""experiments.nft end to end at 64 px with a random tiny Flux2SR and a random consistency head: the files, a LoRA
that moved, a resume that reproduces the uninterrupted run, and every bad input refused before any rollout."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from experiments import configs, nft
from experiments.configs.schema import NFTStageConfig

# 64-px HR (16-px LR), 1 LR x K = 2 rollouts of 2 Euler steps, 2 iterations, one held-out crop pair
TINY = ["--random-init", "--random-head", "data.gt_size=64", "held_out.size=64", "held_out.crops=1", "eval_inputs=2",
        "rewards=(consistency, piqe)", "group_size=2", "groups=1", "inputs=2", "sample_steps=2", "steps=2",
        "checkpoint_every=1", "eval_every=2", "lora.rank=2"]
TIMING_KEYS = {"time", "rollout_s", "iteration_s"}


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("nft") / "run"
    nft.main([*TINY, "--out", str(out)])
    return out


def test_run_writes_metrics_plot_report_and_a_trained_lora(uninterrupted):
    records = _records(uninterrupted)
    train = [r for r in records if r["split"] == "train"]
    held = [r for r in records if r["split"] == "held_out"]
    assert [r["step"] for r in train] == [0, 1]
    assert [r["iteration"] for r in held] == [0, 2]
    for record in train:
        assert set(record["rewards"]) == {"consistency", "piqe"}
        assert np.asarray(record["reward_table"]).shape == (1, 2, 2)
        assert np.isfinite(record["loss"])
        assert set(record["separability"]) == {"decoupled", "scalarised", "sign_disagreement"}
    assert (uninterrupted / "rewards.png").stat().st_size > 0
    report = (uninterrupted / "report.md").read_text()
    assert "RANDOM" in report
    assert "| Flux2SR | LucidNFT-decoupled |" in report
    for row in ("| decoupled |", "| scalarised |", "| consistency |", "| piqe |", "| psnr |", "| lpips |"):
        assert row in report
    lora = load_file(str(uninterrupted / nft.ADAPTER))
    assert max(float(np.abs(v).max()) for k, v in lora.items() if "lora_B" in k) > 0  # B starts at exactly zero


def test_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")  # as if killed after the first iteration's checkpoint
    (resumed / nft.ADAPTER).unlink()
    nft.main([*TINY, "--out", str(resumed), "--resume", "--compare", str(uninterrupted)])
    assert _without_timings(_records(resumed)) == _without_timings(_records(uninterrupted))
    assert "| LucidNFT-decoupled (run) |" in (resumed / "report.md").read_text().replace(" | Δ (95% interval)", "")
    a, b = load_file(str(uninterrupted / nft.ADAPTER)), load_file(str(resumed / nft.ADAPTER))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("fields, message", [
    ({"rewards": ("consistency", "no_such_metric")}, "unknown reward 'no_such_metric'"),
    ({"rewards": ("consistency", "psnr")}, "needs an HR reference"),
    ({"group_size": 1}, "K rollouts per LR must be an int >= 2"),
    ({"rewards": ("consistency", "piqe"), "weights": (1.0, -1.0)}, "sum to zero"),
    ({"rewards": ("piqe",), "weights": (1.0, 2.0)}, "2 weights"),
    ({"advantages": "mixed"}, "advantages: expected one of"),
])
def test_bad_config_is_a_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        NFTStageConfig(**fields)


def test_bad_override_stops_the_command_before_any_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        nft.main([*TINY, "--out", str(tmp_path / "run"), "group_size=1"])
    assert "group_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_lr_smaller_than_the_token_factor_is_refused(tmp_path):
    folder = tmp_path / "lr"
    folder.mkdir()
    Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(folder / "tiny.png")
    with pytest.raises(ValueError, match="token factor 16"):
        nft.main([*TINY, "--out", str(tmp_path / "run"), "--lr", str(folder)])
    fake = SimpleNamespace(models=SimpleNamespace(vae_config=SimpleNamespace(token_factor=16)))
    with pytest.raises(ValueError, match="token factor 16"):
        nft.run(configs.get("tiny").nft, fake, np.zeros((2, 2, 2, 3), np.uint8), None, tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_lr_folder_is_cropped_to_whole_tokens(tmp_path):
    folder = tmp_path / "lr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a", (23, 30, 3)), ("b", (40, 18, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{name}.png")
    lrs = nft.folder_lrs(folder, scale=4, token_factor=16, max_hr=256)
    assert lrs.shape == (2, 16, 16, 3) and lrs.dtype == np.uint8  # 18 px * 4 = 72 -> 64 px HR, 16 px LR


def test_missing_head_names_the_flag_and_the_command(tmp_path):
    config = configs.get("tiny").nft
    with pytest.raises(FileNotFoundError, match=r"--consistency-head.*python -m experiments\.consistency"):
        nft.build_rewards(config, tmp_path / "absent.safetensors", False, None, 0)
