"""experiments.consistency at 64 px and a few steps: the files it writes, the held-out table recomputed with NumPy from
the saved head and freshly computed embeddings, and its refusals."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from experiments import common, configs
from experiments import consistency as E
from foa_jax import consistency as C
from ports import photos

TINY = ["crop=64", "batch=4", "eval_crops=2", "backbone_batch=16"]
STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("consistency")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = E.main(["--out", str(out), "--steps", str(STEPS), *TINY])
    return out, report, printed.getvalue()


def np_head(tensors, x):
    h = x @ tensors["0.weight"].T.astype(np.float64) + tensors["0.bias"]
    return (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ tensors["2.weight"].T.astype(np.float64) + tensors["2.bias"]


def np_cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_run_writes_head_report_and_metrics(run):
    out, report, _ = run
    params, backbone = E.load_head(out / "head.safetensors")
    assert backbone == {"name": "vgg16-lpips", "pooling": "stages", "batch": 16, "dim": 1472}
    assert C.head_dim(params) == 1472
    saved = json.loads((out / "consistency.json").read_text())
    assert saved["held_out"]["table"] == report["held_out"]["table"]
    assert saved["config"]["head"]["steps"] == STEPS and saved["reference"]["matched"] == [0.759, 0.890]
    records = common.Metrics(out / "metrics.jsonl").read()
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(np.isfinite(r["loss"]) for r in records)


def test_held_out_table_matches_a_numpy_recomputation(run):
    """Same crops and degradations rebuilt here, embedded again, scored with the saved head in NumPy float64."""
    out, report, _ = run
    config = configs.override(E.ConsistencyConfig(), TINY)
    _, held = photos.split(min_side=config.crop)
    hr, sources, seeds = E.crops(held, config, config.eval_crops, seed=0)
    lr = np.stack([E.lr_view(h, s) for h, s in zip(hr, seeds)])
    backbone = E.load_backbone(report["backbone"])
    lr_emb = backbone(lr).astype(np.float64)
    hr_emb = backbone(np.stack([h / 255.0 for h in hr]).astype(np.float32)).astype(np.float64)
    tensors = C.state_dict(E.load_head(out / "head.safetensors")[0])
    different = np.asarray(sources)[:, None] != np.asarray(sources)[None, :]
    table = report["held_out"]["table"]
    assert table["raw"]["matched"]["count"] == len(hr) == 4 * config.eval_crops
    assert table["raw"]["mismatched"]["count"] == int(different.sum()) == 8 * 6
    for name, (a, b) in {"raw": (lr_emb, hr_emb), "head": (np_head(tensors, lr_emb), np_head(tensors, hr_emb))}.items():
        cos = np_cosines(a, b)
        assert table[name]["matched"]["mean"] == pytest.approx(np.diag(cos).mean(), abs=1e-4)
        assert table[name]["matched"]["std"] == pytest.approx(np.diag(cos).std(), abs=1e-4)
        assert table[name]["mismatched"]["mean"] == pytest.approx(cos[different].mean(), abs=1e-4)
        separation = np.mean(np.diag(cos)[:, None] > cos[different][None, :])
        assert table[name]["separation"] == pytest.approx(separation, abs=1e-2)


def test_printed_table_carries_the_reference_figures(run):
    printed = run[2]
    assert "matched LR–HR" in printed and "0.759 → 0.890 (LSDIR-Val)" in printed
    assert "mismatched LR–HR" in printed and "0.144 → 0.100" in printed
    assert "P(matched > mismatched)" in printed


def test_bad_config_and_foreign_head_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ConsistencyConfig.batch: InfoNCE needs negatives"):
        E.ConsistencyConfig(batch=1)
    with pytest.raises(ValueError, match=r"ConsistencyConfig.crop: expected a multiple of 16"):
        E.ConsistencyConfig(crop=100)
    with pytest.raises(ValueError, match=r"ConsistencyConfig.pooling"):
        E.ConsistencyConfig(pooling="max")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors does not exist.*experiments\.consistency"):
        E.load_head(tmp_path / "nowhere.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors is not a consistency head"):
        E.load_head(foreign)
    with pytest.raises(ValueError, match=r"unknown consistency backbone 'clip'"):
        E.load_backbone({"name": "clip", "dim": 3})


@pytest.mark.parametrize("override, message", [("head.lr=fast", "head.lr='fast': expected a number"),
                                               ("heads.steps=3", "unknown config field 'heads.steps'"),
                                               ("crop=100", "ConsistencyConfig.crop: expected a multiple of 16")])
def test_bad_overrides_stop_before_any_work(override, message, capsys):
    with pytest.raises(SystemExit):
        E.main(["--steps", "2", override])
    assert message in capsys.readouterr().err
    config = configs.override(E.ConsistencyConfig(), ["head.steps=7", "pooling=last", "head.lr=3e-4"])
    assert (config.head.steps, config.pooling, config.head.lr) == (7, "last", 3e-4)
