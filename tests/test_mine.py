"""experiments.mine on a random tiny Flux2SR at 64 px (3 inputs x 3 candidates, PSNR/SSIM vs PIQE): files, latents
that decode to the saved images, pairs against a NumPy recomputation of Eq. 3–7 from the saved scores, a resume that
regenerates and rescores only the missing or damaged input, and the errors for bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import artifacts, common, configs, mine
from foa_jax import sr
from foa_jax.data.dataset import Dataset, FolderPhotos
from foa_jax.models import flux2, vae
from ports import iqa, photos

SEED = 3
FAITHFUL, AESTHETIC = ("psnr", "ssim"), ("piqe",)
DIRECTION = {"psnr": 1.0, "ssim": 1.0, "piqe": -1.0}  # pyiqa: PIQE is lower-is-better
FINGERPRINT = "test-random-model"
OVERRIDES = ["data.gt_size=64", "inputs=3", "pool_size=3", "nested_pool_sizes=(2, 3)", "sample_steps=2", "batch=2",
             f"reward.faithful_metrics={FAITHFUL}", f"reward.aesthetic_metrics={AESTHETIC}", "grid_inputs=2"]


@pytest.fixture(scope="module")
def models():
    """A random tiny Flux2SR with one double and one single block (the same sampling path). The transformer is drawn
    as `flux2.init` draws it (LeCun-normal kernels, unit scales) but with NumPy: eager jax compiles one program per
    parameter shape, which costs most of this file's runtime."""
    t_config = flux2.preset("tiny", num_layers=1, num_single_layers=1)
    v_config = vae.VAEConfig.preset("tiny")
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return np.ones(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])).astype(np.float32)

    shapes = jax.eval_shape(lambda: flux2.init(t_config, jax.random.key(0)))
    transformer = jax.tree_util.tree_map_with_path(draw, shapes)
    return sr.Models(transformer, vae.init(v_config, jax.random.key(1)), common.tiny_prompt(t_config, 0), t_config,
                     v_config)


def mine_config():
    return configs.override(configs.get("tiny").mine, OVERRIDES)


def run(out, models, hr, *extra, patch=None):
    """`mine.main` on the `hr` photo folder, with the model loader replaced by `models` (marked random, as
    `load_flux2sr` marks a --random-init model)."""
    def load(args, config, folder, announce=print):
        return common.Flux2SR(models, None, None, "RANDOM test model", FINGERPRINT, random=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "load_flux2sr", load)
        if patch:
            patch(mp)
        return mine.main(["--out", str(out), "--sft", "no-sft", "--hr", str(hr), "--seed", str(SEED), *extra,
                          *OVERRIDES])


def tokens(models):
    return models.vae_config.token_channels


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    """Two small photos as an `--hr` folder (faster than decoding the bundled videos)."""
    folder = tmp_path_factory.mktemp("photos") / "hr"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(photos.skimage_photo(name)[100:260, 100:300]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def mined(tmp_path_factory, models, hr_folder):
    return run(tmp_path_factory.mktemp("mine") / "run", models, hr_folder)


def stored(out, index):
    return artifacts.load_candidates(out, index)


def numpy_rewards(scores, names, eps=1e-8):
    """Eq. 3–5 directly: align, min–max over the candidates of each pool, mean over each profile's metrics."""
    aligned = scores * np.array([DIRECTION[n] for n in names])
    low, high = aligned.min(axis=1, keepdims=True), aligned.max(axis=1, keepdims=True)
    normalised = (aligned - low) / (high - low + eps)
    faithful = normalised[..., [names.index(m) for m in FAITHFUL]].mean(-1)
    aesthetic = normalised[..., [names.index(m) for m in AESTHETIC]].mean(-1)
    return {"faithful": faithful, "aesthetic": aesthetic, "hybrid": (faithful + aesthetic) / 2}


def test_files_and_report(mined, models):
    config = mine_config()
    assert config.metric_names == ("psnr", "ssim", "piqe") and config.candidates == 3
    c = tokens(models)
    for index in range(3):
        f = stored(mined, index)
        assert f["latents"].shape == (3, 16, c) and f["latents"].dtype == np.float32
        assert f["cond"].shape == (16, c) and f["images"].shape == (3, 64, 64, 3) and f["images"].dtype == np.uint8
        assert f["lr"].shape == (16, 16, 3) and f["hr"].shape == (64, 64, 3) and f["scores"].shape == (3, 3)
        assert tuple(f["metric_names"]) == config.metric_names
        for k in range(3):
            png = Image.open(mined / "images" / f"{index:05d}" / f"candidate_{k}.png")
            np.testing.assert_array_equal(np.asarray(png), f["images"][k])
    report = (mined / "report.md").read_text()
    assert "| winner_disagreement |" in report and "[55.2%]" in report and "RANDOM initialisation" in report
    assert report.startswith("# FoA-SR preference mining (RANDOM model)")
    assert "| winner_disagreement if R_F, R_A were independent (1 − 1/k) | 50.0% | 66.7% |" in report
    assert mine.rewards.PAPER_MINING_STATS_SOURCE in report and "| psnr | psnr | FR | higher |" in report
    assert sorted(p.name for p in (mined / "grids").iterdir()) == ["input_00000.png", "input_00001.png"]
    stats = json.loads((mined / "stats.json").read_text())
    assert set(stats["statistics"]) == {"2", "3"} and stats["session"]["inputs_done"] == 3


def test_candidates_are_the_inputs_lr_and_seeded_noise(mined, models, hr_folder):
    """LR/HR are the mining dataset's pairs, cond encodes the upsampled LR, candidates differ only in their seed
    (each regenerated alone from `candidate_seed` matches), and the latents decode to the saved images."""
    config = mine_config()
    dataset = Dataset(config.data, FolderPhotos([hr_folder]), report=lambda _: None)
    for index in range(3):
        f = stored(mined, index)
        lr, hr = dataset.pair(index)
        np.testing.assert_array_equal(f["lr"], lr)
        np.testing.assert_array_equal(f["hr"], hr)
        np.testing.assert_allclose(f["cond"], sr.condition(models, sr.upsample_lr(lr[None], (64, 64)))[0], atol=1e-6)
        seeds = [mine.candidate_seed(SEED, index, k) for k in range(3)]
        np.testing.assert_array_equal(f["seeds"], seeds)
        assert len(set(seeds)) == 3
        # the run drew (c0, c1) and (c2, padding): regrouped as (c2, c0), each candidate still comes out the same
        noise = np.concatenate([sr.candidate_noise(seeds[k], (1, 16, tokens(models))) for k in (2, 0)])
        regrouped = sr.generate(models, np.broadcast_to(f["cond"], noise.shape), noise, 2, (4, 4))
        np.testing.assert_allclose(regrouped, f["latents"][[2, 0]], atol=1e-5)
        for chunk in (slice(0, 2), slice(1, 3)):  # batches of 2, the shape already compiled
            decoded = np.asarray(sr.decode(models, f["latents"][chunk], 64, 64))
            np.testing.assert_array_equal(np.clip(np.round(decoded * 255), 0, 255).astype(np.uint8),
                                          f["images"][chunk])


def test_pairs_match_a_numpy_recomputation(mined, models):
    names = ["psnr", "ssim", "piqe"]
    scores = np.stack([stored(mined, i)["scores"] for i in range(3)])
    np.testing.assert_array_equal(artifacts.load(mined / "scores.npz")[0]["scores"], scores)
    expected_rewards = numpy_rewards(scores, names)
    for profile, reward in expected_rewards.items():
        gap = reward.max(1) - reward.min(1)
        keep = np.flatnonzero(gap >= 0.1)
        pairs = artifacts.load_pairs(artifacts.pairs_path(mined, profile), FINGERPRINT, "tiny")
        np.testing.assert_array_equal(pairs["input_index"], keep)
        np.testing.assert_array_equal(pairs["winner"], reward.argmax(1)[keep])
        np.testing.assert_array_equal(pairs["loser"], reward.argmin(1)[keep])
        np.testing.assert_allclose(pairs["gap"], gap[keep], rtol=1e-12)
        for p, (i, w, l) in enumerate(zip(keep, pairs["winner"], pairs["loser"])):
            f = stored(mined, i)
            np.testing.assert_array_equal(pairs["z_w"][p], f["latents"][w])
            np.testing.assert_array_equal(pairs["z_l"][p], f["latents"][l])
            np.testing.assert_array_equal(pairs["cond"][p], f["cond"])
            assert (pairs["seed_w"][p], pairs["seed_l"][p]) == (f["seeds"][w], f["seeds"][l])
        meta = pairs["meta"]
        assert (meta["profile"], meta["pool_size"], meta["grid"], meta["image_size"]) == (profile, 3, [4, 4], [64, 64])
        assert meta["faithful_metrics"] == list(FAITHFUL) and meta["random_init"] is True
    stats = json.loads((mined / "stats.json").read_text())["statistics"]
    for k in (2, 3):
        r = numpy_rewards(scores[:, :k], names)
        f_win, a_win = r["faithful"].argmax(1), r["aesthetic"].argmax(1)
        assert stats[str(k)]["winner_disagreement"] == pytest.approx(np.mean(f_win != a_win))
        assert stats[str(k)]["mean_faithful_gap"] == pytest.approx(np.mean(np.ptp(r["faithful"], 1)), rel=1e-12)


@pytest.mark.parametrize("damage", ["missing", "truncated", "zeroed"])
def test_resume_redoes_only_the_missing_or_damaged_input(mined, models, hr_folder, tmp_path, damage):
    out = tmp_path / "resumed"
    shutil.copytree(mined, out)
    path = artifacts.candidate_path(out, 2)
    data = bytearray(path.read_bytes())
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2: len(data) // 2 + 255] = bytes(255)
        path.write_bytes(bytes(data))
    calls = {"generate": 0, "score": 0}
    generate, score = sr.generate, iqa.Scorer.score

    def patch(mp):
        def counted_generate(*args, **kwargs):
            calls["generate"] += 1
            return generate(*args, **kwargs)

        def counted_score(self, *args, **kwargs):
            calls["score"] += 1
            return score(self, *args, **kwargs)

        mp.setattr(sr, "generate", counted_generate)
        mp.setattr(iqa.Scorer, "score", counted_score)

    run(out, models, hr_folder, "--resume", patch=patch)
    assert calls == {"generate": 2, "score": 1}  # one input: 3 candidates in 2 padded batches, scored in one call
    for index in range(3):
        for key, value in stored(mined, index).items():
            np.testing.assert_array_equal(stored(out, index)[key], value, err_msg=f"input {index}, {key}")
    for profile in mine.rewards.PROFILES:
        a, b = (artifacts.load(artifacts.pairs_path(folder, profile))[0] for folder in (mined, out))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{profile} {key}")
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(out, models, hr_folder)
    with pytest.raises(ValueError, match=r"--resume: .* other settings.*'seed': \(3, 4\)"):
        run(out, models, hr_folder, "--resume", "--seed", "4")


def test_bad_input_fails_before_any_work(tmp_path, models, capsys):
    def no_models(mp):
        mp.setattr(common, "load_flux2sr", lambda *a, **k: pytest.fail("models were loaded before the check"))

    def attempt(*overrides):
        with pytest.MonkeyPatch.context() as mp:
            no_models(mp)
            with pytest.raises(SystemExit) as exit_info:
                mine.main(["--out", str(tmp_path / "bad"), *overrides])
        assert exit_info.value.code == 2

    for overrides, message in (
            (["pool_size=1"], "pool_size: a pool needs at least 2 candidates"),
            (["nested_pool_sizes=(1, 4)"], "nested_pool_sizes: every pool needs at least 2"),
            (["reward.aesthetic_metrics=('sharpness',)"], "unknown metric 'sharpness'"),
            # known to foa_jax.rewards (a direction) but not to the scorer: the scorer's known names are listed
            (["reward.faithful_metrics=('psnry',)"], "unknown metric 'psnry'; known metrics: psnr, ssim, lpips"),
            (["inputs=2.5"], "inputs='2.5': expected an integer"),
            (["--steps", "3"], "--steps")):
        attempt(*overrides)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_load_pairs_refuses_another_model_preset_or_a_damaged_file(mined, tmp_path):
    path = artifacts.pairs_path(mined, "faithful")
    with pytest.raises(ValueError, match=f"fingerprint {FINGERPRINT}.*has other"):
        artifacts.load_pairs(path, "other", "tiny")
    with pytest.raises(ValueError, match="preset 'tiny', expected 'flux2-dev'"):
        artifacts.load_pairs(path, FINGERPRINT, "flux2-dev")
    with pytest.raises(FileNotFoundError, match="run `python -m experiments.mine`"):
        artifacts.load_pairs(mined / "pairs_missing.npz", FINGERPRINT, "tiny")
    damaged = tmp_path / "pairs_faithful.npz"
    data = bytearray(path.read_bytes())
    data[-300] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(artifacts.CorruptArtifact, match=str(damaged)):
        artifacts.load_pairs(damaged, FINGERPRINT, "tiny")
