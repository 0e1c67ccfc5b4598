"""Lint as part of the tests, so CI enforces it: ruff with the rules in pyproject.toml (pyflakes,
pycodestyle, isort, pyupgrade, bugbear). Code that only runs on a GPU is not executed by the CPU
tests; pyflakes' rules at least prove that every name it uses exists."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
