"""experiments.evaluate on a random tiny model at 64 px, checked against independent recomputations.

- PSNR: skimage.metrics on the BT.601 Y channel of the saved PNGs (as tests/test_iqa.py computes it); SSIM: NumPy on
  the same rounded Y, MATLAB's ssim.m with pyiqa's clamp of the contrast-structure term.
- PIQE: a fresh ports.iqa Scorer on the saved PNGs.
- bicubic: torch's bicubic interpolation of the saved LR image.
- the centre crop of pairs whose HR sides are not whole tokens: hand-computed offsets into the original files.
"""

import csv
import json
import re

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import correlate2d
from skimage import data
from skimage import metrics as skm

from experiments import configs
from experiments import evaluate as E
from foa_jax import lora, sr
from foa_jax.models import flux2
from ports import iqa, lora_io

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

METRICS = ("psnr", "ssim", "piqe")
OVERRIDES = [f"metrics={METRICS}", "sample_steps=2", "batch=4", "crop_size=32"]
# HR sizes (one shape after fitting, so the sampler compiles once): 72x88 and 68x84 are not whole 16-px tokens and
# are centre-cropped to 64x80, at (4, 4) and at (0, 0) (the offset 2 rounded down to whole LR pixels); 64x80 is kept.
HR_SIZES = {"cat": (72, 88), "coffee": (64, 80), "rocket": (68, 84)}
PHOTOS = {"cat": data.chelsea, "coffee": data.coffee, "rocket": data.rocket}


def _luma(x: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16/255, 235/255] of uint8 RGB, float64."""
    return (x.astype(np.float64) / 255.0 @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0


def _ssim_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """SSIM of the rounded Y channels as MATLAB's ssim.m (11x11 Gaussian, sigma 1.5, valid region), except that the
    contrast-structure term is clamped at 0 as pyiqa does (`F.relu(cs_map)`): skimage does not clamp, which changes
    the value of dissimilar images (0.123 vs 0.166 on a random model's output here)."""
    x, y = np.round(_luma(sr) * 255), np.round(_luma(hr) * 255)
    r = np.arange(-5, 6)
    g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a):
        return correlate2d(a, g, mode="valid")

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = np.maximum((2 * cxy + c2) / (vx + vy + c2), 0)
    return float(np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs))


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """LR/HR folders: HR = a photo crop, LR = its 4x box downscale (PIL), with `_LR4` suffixes on the LR side."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "lr").mkdir()
    (root / "hr").mkdir()
    for name, (h, w) in HR_SIZES.items():
        hr = PHOTOS[name]()[100:100 + h, 150:150 + w]
        Image.fromarray(hr).save(root / "hr" / f"{name}.png")
        Image.fromarray(hr).resize((w // 4, h // 4), Image.BOX).save(root / "lr" / f"{name}_LR4.png")
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A zero-B adapter (must reproduce Flux2SR exactly) and one with random B, as LoRA safetensors files."""
    root = tmp_path_factory.mktemp("adapters")
    template = jax.eval_shape(lambda: flux2.init(flux2.preset("tiny"), jax.random.key(0)))
    config = lora.LoRAConfig(rank=4, alpha=8.0)
    zero = lora.init(template, config, jax.random.key(1))
    randomised = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(jax.random.key(2), x.shape) if "lora_B" in jax.tree_util.keystr(path)
        else x, zero)
    return {"zero": lora_io.export_lora(root / "zero.safetensors", zero, config),
            "lora": lora_io.export_lora(root / "lora.safetensors", randomised, config)}


@pytest.fixture(scope="module")
def run(folders, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    E.main(["--out", str(out), "--random-init", "--lr", str(folders / "lr"), "--hr",
            str(folders / "hr"), "--lr-suffix", "_LR4", "--adapter", f"zero={adapters['zero']}",
            "--adapter", f"lora={adapters['lora']}", *OVERRIDES])
    return out


METHODS = ("bicubic", "flux2sr", "zero", "lora")


def test_report_files_agree_and_hold_one_row_per_image_and_method(run):
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["methods"]) == list(METHODS)
    assert report["plot_metric"] == "piqe"
    rows = report["rows"]
    assert len(rows) == len(HR_SIZES) * len(METHODS)
    assert {(r["image"], r["method"]) for r in rows} == {(i, m) for i in HR_SIZES for m in METHODS}
    with open(run / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["image"], r["method"]) for r in csv_rows] == [(r["image"], r["method"]) for r in rows]
    for c, j in zip(csv_rows, rows):
        assert all(float(c[m]) == j[m] for m in METRICS)
    for method in METHODS:
        for metric in METRICS:
            values = [r[metric] for r in rows if r["method"] == method]
            assert report["means"][method][metric] == pytest.approx(np.mean(values), rel=1e-12)

    markdown = (run / "metrics.md").read_text()
    table = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 + len(METRICS) and cells[0] in HR_SIZES:
            table[(cells[0], cells[1])] = [float(c) for c in cells[2:]]
    assert len(table) == len(rows)
    for r in rows:
        assert table[(r["image"], r["method"])] == pytest.approx([r[m] for m in METRICS], abs=5e-5)
    header = next(line for line in markdown.splitlines() if line.startswith("| metric | "))
    assert header == "| metric | " + " | ".join(METHODS) + " |"
    for metric in METRICS:
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {metric} "))
        means = [float(c) for c in line.strip("|").split("|")[1:]]
        assert means == pytest.approx([report["means"][m][metric] for m in METHODS], abs=5e-5)
    assert iqa.registry_table(METRICS) in markdown  # the pinned settings, printed with the table
    assert report["metric_settings"] == iqa.registry_table(METRICS)


def test_metrics_match_skimage_and_a_fresh_scorer_on_the_saved_images(run):
    rows = {(r["image"], r["method"]): r for r in json.loads((run / "metrics.json").read_text())["rows"]}
    scorer = iqa.Scorer(("piqe",))
    for method in METHODS:
        for image in HR_SIZES:
            sr, hr = _read(run / "images" / method / f"{image}.png"), _read(run / "images" / "HR" / f"{image}.png")
            row = rows[(image, method)]
            # pyiqa's Y is float32: its PSNR is off by ~2e-5 relative (8.5e-4 dB measured at 43 dB)
            assert row["psnr"] == pytest.approx(skm.peak_signal_noise_ratio(_luma(hr), _luma(sr), data_range=1.0),
                                                rel=5e-5)
            # pyiqa rounds a float32 Y: the few pixels within ~1e-3 of a .5 tie round the other way (2.5e-5 measured)
            assert row["ssim"] == pytest.approx(_ssim_y(sr, hr), abs=1e-4)
            piqe = scorer.score(sr[None].astype(np.float32) / 255, hr[None].astype(np.float32) / 255)["piqe"][0]
            assert row["piqe"] == pytest.approx(piqe, abs=1e-6)


def test_pairs_off_the_token_grid_are_centre_cropped_together(run, folders):
    hr, lr = _read(folders / "hr" / "cat.png"), _read(folders / "lr" / "cat_LR4.png")
    np.testing.assert_array_equal(_read(run / "images" / "HR" / "cat.png"), hr[4:68, 4:84])
    np.testing.assert_array_equal(_read(run / "images" / "LR" / "cat.png"), lr[1:17, 1:21])
    hr, lr = _read(folders / "hr" / "rocket.png"), _read(folders / "lr" / "rocket_LR4.png")
    np.testing.assert_array_equal(_read(run / "images" / "HR" / "rocket.png"), hr[0:64, 0:80])
    np.testing.assert_array_equal(_read(run / "images" / "LR" / "rocket.png"), lr[0:16, 0:20])
    np.testing.assert_array_equal(_read(run / "images" / "HR" / "coffee.png"), _read(folders / "hr" / "coffee.png"))
    notes = json.loads((run / "metrics.json").read_text())["notes"]
    assert [n for n in notes if "centre-cropped" in n] == [
        "cat: HR 72x88 centre-cropped to 64x80 at (4, 4), LR likewise at 1/4",
        "rocket: HR 68x84 centre-cropped to 64x80 at (0, 0), LR likewise at 1/4"]


def test_bicubic_is_torch_bicubic_of_the_lr_image(run):
    for image in HR_SIZES:
        lr = _read(run / "images" / "LR" / f"{image}.png")
        h, w = lr.shape[0] * 4, lr.shape[1] * 4
        up = torch.nn.functional.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None].double() / 255, (h, w),
                                             mode="bicubic", align_corners=False)
        expected = np.round(up[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255)
        got = _read(run / "images" / "bicubic" / f"{image}.png").astype(np.float64)
        assert np.abs(got - expected).max() <= 1


def test_zero_adapter_equals_flux2sr_and_a_trained_one_differs(run):
    rows = {(r["image"], r["method"]): r for r in json.loads((run / "metrics.json").read_text())["rows"]}
    differs = False
    for image in HR_SIZES:
        flux2sr = _read(run / "images" / "flux2sr" / f"{image}.png")
        np.testing.assert_array_equal(_read(run / "images" / "zero" / f"{image}.png"), flux2sr)
        assert rows[(image, "zero")] == {**rows[(image, "flux2sr")], "method": "zero"}
        differs |= not np.array_equal(_read(run / "images" / "lora" / f"{image}.png"), flux2sr)
    assert differs


def test_plot_and_crops_are_written(run):
    plot = Image.open(run / "perception_distortion.png")
    assert plot.size[0] > 300 and plot.size[1] > 300
    crops = _read(run / "crops.png")
    side, pad, label, columns = 32, 2, 14, 2 + len(METHODS)  # LR, methods, HR
    assert crops.shape == (label + len(HR_SIZES) * (side + pad) + pad, columns * (side + pad) + pad, 3)
    # the HR column of the first row is the centre 32x32 of the first image by name (cat, after its token crop)
    hr = _read(run / "images" / "HR" / "cat.png")
    top, left = label + pad, (columns - 1) * (side + pad) + pad
    np.testing.assert_array_equal(crops[top:top + side, left:left + side], hr[16:48, 24:56])


def test_sr_output_does_not_depend_on_its_batch(run):
    """Every input starts from the same noise, so an image's output is the same alone or in a batch."""
    import types

    from experiments import common, configs

    args = types.SimpleNamespace(preset="tiny", random_init=True, seed=0)
    models = common.load_flux2sr(args, configs.get("tiny"), None, announce=lambda _: None).models
    # the run sampled all three images in one batch; here the second one runs alone
    alone = sr.super_resolve(models, _read(run / "images" / "LR" / "coffee.png")[None], (64, 80), seed=0, steps=2,
                            guidance=1.0)
    in_batch = _read(run / "images" / "flux2sr" / "coffee.png").astype(np.float64) / 255
    assert np.abs(alone[0] - in_batch).max() <= 0.5 / 255 + 1e-5  # equal up to the 8-bit rounding of the saved image
    assert np.abs(in_batch - _read(run / "images" / "flux2sr" / "cat.png") / 255).max() > 0.1


def test_unmatched_folders_raise_before_any_work(folders, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the folders were checked")

    monkeypatch.setattr(E.common, "load_flux2sr", forbidden)
    monkeypatch.setattr(E, "make_scorer", forbidden)
    hr = tmp_path / "hr"
    hr.mkdir()
    for name in ("cat", "dog"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(hr / f"{name}.png")
    with pytest.raises(ValueError, match=re.escape("only in LR") + r".*'coffee'.*'rocket'.*only in HR.*'dog'"):
        E.main(["--out", str(tmp_path / "out"), "--lr", str(folders / "lr"), "--hr", str(hr), "--lr-suffix", "_LR4"])


def test_config_errors_name_the_known_values(capsys):
    with pytest.raises(ValueError, match=r"unknown metric 'psnrr'; known metrics: psnr, ssim, lpips"):
        E.EvalConfig(metrics=("psnrr", "ssim"))
    with pytest.raises(ValueError, match=r"nr_metric: expected one of the no-reference metrics in metrics \['piqe'\]"):
        E.EvalConfig(metrics=("psnr", "ssim", "piqe"), nr_metric="ssim")
    with pytest.raises(ValueError, match=r"no-reference metrics in metrics \[\]"):
        E.EvalConfig(metrics=("psnr", "ssim"))
    assert E.EvalConfig(metrics=("psnr", "piqe", "niqe")).plot_metric == "piqe"
    assert configs.get("tiny").eval.plot_metric == "niqe" and configs.get("flux2-dev").eval.plot_metric == "clipiqa"
    with pytest.raises(ValueError, match="psnr is required"):
        E.EvalConfig(metrics=("ssim", "piqe"), nr_metric="piqe")
    with pytest.raises(SystemExit):
        E.main(["metric=('psnr',)"])
    assert "unknown config field 'metric'" in capsys.readouterr().err
    assert configs.get("tiny").eval.metrics == E.OFFLINE_METRICS
    assert configs.get("flux2-dev").eval.metrics == E.PAPER_METRICS
    with pytest.raises(ValueError, match=r"'HR'"):
        E.check_methods({"HR": E.BICUBIC})
    with pytest.raises(ValueError, match=r"method 'x': expected 'bicubic', None or \(adapter tree, LoRAConfig\)"):
        E.check_methods({"x": {"some": "tree"}})
