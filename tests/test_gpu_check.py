"""experiments.gpu_check on a CPU-only host: the small parts run (kernel parity, attention against the chunked
kernel), the accelerator-only rows say they were skipped, and the table is written as JSON."""

import json

import jax
import pytest

from experiments import gpu_check


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="on an accelerator the check runs in full, by hand")
def test_cpu_run_checks_the_small_parts(tmp_path, capsys):
    table = gpu_check.main(["--out", str(tmp_path / "check.json"), "--steps", "1"])
    printed = capsys.readouterr().out
    assert "no accelerator: only the small parts ran" in printed
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(table))
    rows = {row["check"]: row for row in table["rows"]}
    parity = [row for name, row in rows.items() if name.startswith("parity")]
    assert len(parity) == 2 and all(row["value"] < 1e-5 for row in parity)
    assert rows["attention xla (float32) vs chunked"]["value"] < 1e-5
    assert rows["attention cudnn (bfloat16) vs chunked"]["note"] == "skipped: no accelerator"
    assert rows["SFT LoRA step at FLUX.2-dev width"]["note"] == "skipped: no accelerator"
