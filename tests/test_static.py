"""Code that only runs on a GPU is not executed by the CPU tests: pyflakes at least proves that
every name it uses exists (an undefined name slipped into a CUDA-only branch once)."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_no_undefined_names():
    result = subprocess.run([sys.executable, "-m", "pyflakes", "moca_kernels", "moca", "benchmarks", "tests"],
                            capture_output=True, text=True, cwd=ROOT)
    problems = [line for line in result.stdout.splitlines()
                if "undefined name" in line or "redefinition of unused" in line or "syntax" in line.lower()]
    assert not problems, "\n".join(problems)
