"""The README: its two opening commands are the ones CI and users run (keep them and `.ci/run` in step), and every
```python block in it runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert len(_python_blocks()) >= 5


@pytest.mark.parametrize("index", range(len(_python_blocks())), ids=lambda i: f"block{i + 1}")
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    """Each block in a fresh namespace, from an empty folder, as a reader would paste it."""
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    exec(compile(code, f"README.md, python block {index + 1}", "exec"), {"__name__": "__readme__"})
