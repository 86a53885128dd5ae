"""experiments.configs: every preset builds and validates; overrides are checked for field and type before any work,
wherever they stand on the command line; `common.parse` turns their errors into usage errors."""

import dataclasses

import pytest

from experiments import common, configs
from experiments.configs import schema


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_every_preset_builds_a_whole_config(name):
    config = configs.get(name)
    assert isinstance(config, schema.Config) and config.preset == name
    assert isinstance(config.sft, schema.SFTConfig) and isinstance(config.eval, schema.EvalConfig)
    assert (config.vae is not None) == (name == "tiny")


def test_an_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; valid presets: \['flux2-dev', 'klein-4b'"):
        configs.get("huge")


def test_overrides_parse_by_field_type():
    config = configs.override(configs.get("tiny"), [
        "sft.optim.lr=3e-4", "mine.nested_pool_sizes=(2, 3)", "sft.validate=false", "sft.remat=none",
        "mine.reward.faithful_metrics=(psnr, ssim)", "eval.nr_metric=none", "sft.loss.lambda_pix=2"])
    assert config.sft.optim.lr == 3e-4 and config.mine.nested_pool_sizes == (2, 3)
    assert config.sft.validate is False and config.sft.remat == "none"  # a string field takes the text as written
    assert config.mine.reward.faithful_metrics == ("psnr", "ssim") and config.eval.nr_metric is None
    assert config.sft.loss.lambda_pix == 2.0 and isinstance(config.sft.loss.lambda_pix, float)


@pytest.mark.parametrize("item,message", [
    ("sft.optim.lr=abc", "expected a number"),
    ("sft.batch=2.5", "expected an integer"),
    ("mine.pool_size=2.5", "expected an integer"),
    ("sft.validate=maybe", "expected true or false"),
    ("sft.batch=true", "expected an integer"),
    ("mine.nested_pool_sizes=(2, x)", "expected an integer"),
    ("sft.speed=1", r"unknown config field 'sft.speed': SFTConfig has \['mode'"),
    ("sft.optim=1", "is a section"),
    ("sft.batch.x=1", "batch is a value, not a section"),
    ("sft.batch", "not of the form"),
    ("sft.loss.lpips_net=squeeze", "lpips_net must be"),  # the dataclass's own validation
])
def test_bad_overrides_name_what_is_valid(item, message):
    with pytest.raises(ValueError, match=message):
        configs.override(configs.get("tiny"), [item])


def test_overrides_stand_anywhere_on_a_command_line():
    config = configs.get("tiny").sft
    rest, overrides = configs.split_overrides(["--hr", "a", "b", "optim.lr=1e-3", "--adapter", "faithful=x.st",
                                              "batch=2"], config)
    assert overrides == ["optim.lr=1e-3", "batch=2"]
    assert rest == ["--hr", "a", "b", "--adapter", "faithful=x.st"]  # a flag's value that is no field stays


def test_parse_reports_bad_words_as_usage_errors(capsys):
    p = common.parser("test", "runs/x")
    p.add_argument("--hr", nargs="+")
    args, config = common.parse(p, ["--hr", "a", "b", "optim.lr=1e-3", "--steps", "7"], "sft")
    assert args.hr == ["a", "b"] and config.sft.optim.lr == 1e-3 and config.sft.steps == 7
    for argv, message in ((["optim.lr=abc"], "expected a number"), (["--steps", "0"], "positive"),
                          (["--steps", "-5"], "positive"), (["speed=3"], "unknown config field 'speed'"),
                          (["stray"], "unrecognized arguments: stray"), (["--preset", "huge"], "valid presets")):
        with pytest.raises(SystemExit) as exit_info:
            common.parse(p, argv, "sft")
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.parse(p, ["--steps", "3"], "eval")  # evaluation has no steps
    assert "does not apply" in capsys.readouterr().err


def test_real_presets_share_the_full_scale_recipe():
    dev, klein = configs.get("flux2-dev"), configs.get("klein-4b")
    assert dataclasses.replace(klein, preset="flux2-dev", transformer="flux2-dev") == dev
    assert dev.sft.lora.rank == 64 and dev.sft.lora.targets == "attn+add" and dev.dpo.optim.grad_accum == 8
