"""Every Triton kernel variant the launchers can produce compiles for Hopper (sm_90a) with Hopper
tensor-core instructions and within its shared memory, checked on this machine without a GPU."""
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "moca_kernels.compile_check", "--quick"], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    total = int(lines[0].split()[1])
    assert total >= 40 and f"{total} of {total} variants compile for sm_90a" in lines[-1]
