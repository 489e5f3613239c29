"""benchmarks/device_checks.sh: the one-run GPU checks stay runnable where no GPU is.

Its real run needs a GPU (and minutes); here: the shell parses it, every `surgery` option it passes
exists in the CLI, and a run whose budget is spent skips every step, says so, fails, and still
writes what a loaned machine hands back.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_checks.sh"
STEPS = ["build", "backends", "tests", "kernels", "e2e", "profile"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_surgery_option_it_passes_exists():
    """A renamed or removed CLI option would only fail on the GPU machine, in its short loan."""
    calls = re.findall(r'"\$\{surgery\[@\]\}" (.+)', SCRIPT.read_text())
    assert len(calls) == 4  # backends, bench kernels, bench e2e, profile
    parser = build_parser()
    for call in calls:
        words = [w for w in call.split() if not w.startswith(('"$', "$"))]  # drop shell variables
        command = [w for w in words if not w.startswith("-")][:2]
        command = command if command[0] == "bench" else command[:1]
        options = [w for w in words if w.startswith("--")]
        help_text = _help(parser, command)
        for option in options:
            assert re.search(rf"{re.escape(option)}\b", help_text), f"{' '.join(command)}: no option {option}"


def _help(parser, command: list[str]) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        parser.parse_args([*command, "--help"])
    return printed.getvalue()


def test_a_spent_budget_skips_every_step_and_fails(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "BUDGET": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    log = (tmp_path / "out" / "log.txt").read_text()
    for step in STEPS:
        assert f"== {step}: skipped, no time left in the budget" in log
    assert f"failed steps: {' '.join(STEPS)}" in log
    assert (tmp_path / "out" / "results.tar.gz").exists() and (tmp_path / "out" / "tests.txt").exists()
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what a loaned machine hands back
