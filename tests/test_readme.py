"""The README's two opening commands are the ones CI and users run: keep them and `.ci/run` in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:12] if line.startswith("    ")]


def test_readme_opens_with_the_main_job_and_the_tests():
    main_job, tests = _commands()[:2]
    assert main_job.endswith("python -m experiments.dpo")
    assert tests.endswith("python -m pytest -q")
    assert main_job.split("&&")[:2] == tests.split("&&")[:2], "both commands set up the same environment"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == _commands()[1]
