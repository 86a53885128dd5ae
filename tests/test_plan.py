"""experiments.plan: the on-paper plan compiles the library's steps for abstract inputs (tiny preset here; the
flux2-dev table is the command's output), its depth extrapolation agrees with a full compile, and its MFU figures
follow from the analytic FLOPs and the paper's times."""

import contextlib
import io
import json

import pytest

from experiments import configs, plan
from foa_jax import flops
from foa_jax import lora as lora_lib
from foa_jax.models import flux2, vae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's plan through the command line at 64 px and 16 text tokens: (table, printed, JSON file). The
    tests below reuse its compiled programs' figures rather than compiling the same programs again."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        table = plan.main(["--preset", "tiny", "--sizes", "64", "--text-tokens", "16", "--out", str(out)])
    return table, printed.getvalue(), out


def test_tiny_plan_prints_every_step_and_writes_json(tiny):
    table, printed, out = tiny
    assert json.loads(out.read_text()) == json.loads(json.dumps(table))
    assert table["parameters"] == flux2.param_count(flux2.preset("tiny"))
    storage = "bfloat16" if configs.get("tiny").sft.bf16 else "float32"  # unquantised: the stage's own dtype
    assert table["base_storage"] == storage and f"base stored as {storage}" in printed
    assert [row["step"] for row in table["steps"]] == list(plan.STEPS)
    for row in table["steps"]:
        mem = row["memory"]
        assert mem["arguments"] > table["base_bytes"] and mem["temporaries"] > 0 and row["model_flops"] > 0
        assert f"| {row['step']} | 64² |" in printed
        assert "paper_seconds" not in row  # the paper's times are for 512² HR


def test_int8_base_shrinks_the_stored_base_and_the_arguments_alike(tiny):
    """The 8-bit base is half a bf16 one, and a step's arguments shrink by exactly the bytes it saves on the base
    the stage holds unquantised (float32 where the stage computes in float32)."""
    unquantised = tiny[0]
    int8 = plan.plan_table("tiny", [64], "int8", ["sample"], None, 16)
    assert int8["base_storage"] == "int8" and int8["base_bytes"] < 0.55 * int8["bf16_base_bytes"]
    assert int8["base_bytes"] < 0.55 * unquantised["base_bytes"]
    saved = unquantised["base_bytes"] - int8["base_bytes"]
    sample = next(row for row in unquantised["steps"] if row["step"] == "sample")
    assert int8["steps"][0]["memory"]["arguments"] == pytest.approx(sample["memory"]["arguments"] - saved, rel=1e-3)


def test_depth_extrapolation_matches_the_full_compile(tiny):
    """Arguments extrapolate exactly (weights are linear in depth); the peak to within a few percent."""
    settings = plan.stage_settings("tiny")
    config = flux2.preset(settings[2])
    target = plan.Plan(settings[2], settings[3], 64, 16)
    full = next(row for row in tiny[0]["steps"] if row["step"] == "sample")["memory"]  # this plan, compiled whole
    guess = plan.extrapolated_memory("sample", target, settings, 1, (config.num_layers, config.num_single_layers))
    assert guess["arguments"] == full["arguments"]
    assert guess["peak"] == pytest.approx(full["peak"], rel=0.05)


def test_paper_mfu_of_flux2_dev():
    """The MFU the paper's SFT step and DPO micro-step times (`plan.PAPER_SECONDS`) imply on one H200 at 512² HR."""
    config, v_config, lora = flux2.preset("flux2-dev"), vae.VAEConfig.preset("flux2"), lora_lib.LoRAConfig()
    sft = flops.sft_step(config, v_config, lora, (32, 32), 512, "vgg").total
    dpo = flops.dpo_micro_step(config, lora, (32, 32), 512).total
    sft_mfu = sft / (plan.PAPER_SECONDS["sft"] * plan.PEAK_FLOPS)
    dpo_mfu = dpo / (plan.PAPER_SECONDS["dpo"] * plan.PEAK_FLOPS)
    print(f"SFT {sft:.3e} FLOPs: MFU {sft_mfu:.1%}, 45% -> {sft / (0.45 * plan.PEAK_FLOPS):.2f} s; "
          f"DPO micro-step {dpo:.3e}: MFU {dpo_mfu:.1%}, 45% -> {dpo / (0.45 * plan.PEAK_FLOPS):.2f} s")
    assert 0.25 < sft_mfu < 0.40 and 0.2 < dpo_mfu < 0.3
