"""experiments.pipeline (the main job) end to end on a random tiny model at 64 px: every stage runs in order, writes
what the next reads and the report, and a rerun of the same command reuses every finished stage."""

import json

import pytest

from experiments import pipeline

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

SMALL = ["mine.data.gt_size=64", "mine.inputs=3", "mine.pool_size=2", "mine.nested_pool_sizes=(2,)",
         "mine.sample_steps=2", "mine.batch=3", "mine.reward.faithful_metrics=(psnr, ssim)",
         "mine.reward.aesthetic_metrics=(piqe,)", "mine.reward.gap_threshold=1e-6", "mine.grid_inputs=1",
         "dpo.steps=2", "dpo.batch=1", "dpo.checkpoint_every=2", "dpo.lora.rank=2", "dpo.optim.warmup=1",
         "eval.metrics=(psnr, ssim, piqe)", "eval.sample_steps=2", "eval.held_out.size=64", "eval.held_out.crops=1",
         "eval.crop_size=32", "eval.crop_images=2", "eval.batch=4"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    return out, pipeline.main(["--out", str(out), "--random-init", *SMALL])


def test_every_stage_writes_its_output_and_the_report_names_them(job):
    out, report = job
    assert report == out / "report" / "report.md"
    text = report.read_text()
    assert "RANDOM" in text
    for profile in ("faithful", "aesthetic", "hybrid"):
        assert (out / "mine" / f"pairs_{profile}.npz").is_file()
        assert (out / "dpo" / profile / "metrics.jsonl").is_file()
    methods = json.loads((out / "eval" / "metrics.json").read_text())["methods"]
    assert list(methods) == ["bicubic", "flux2sr", "faithful", "aesthetic", "hybrid"]


def test_rerun_reuses_every_stage(job, capsys):
    out, report = job
    before = {p: p.stat().st_mtime_ns for p in (out / "mine").glob("pairs_*.npz")}
    pipeline.main(["--out", str(out), "--random-init", *SMALL])
    printed = capsys.readouterr().out
    for stage in ("mine", "dpo faithful", "dpo aesthetic", "dpo hybrid"):
        assert f"== {stage}: reusing" in printed, printed
    assert before == {p: p.stat().st_mtime_ns for p in (out / "mine").glob("pairs_*.npz")}


def test_unknown_stage_override_is_an_error_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--out", str(tmp_path / "x"), "--random-init", "mine.inptus=3"])
    assert "mine.inptus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
