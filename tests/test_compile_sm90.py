"""Every Triton kernel variant the launchers can produce compiles for Hopper (sm_90a) with Hopper
tensor-core instructions only (at the hot head dims), no more MMA work than the tile needs, and
within its shared memory, checked on this machine without a GPU."""
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from moca_kernels import compile_check


def test_mma_work_counts():
    # The check's arithmetic on hand-made listings: a 64x64 product over K = 128 takes 8
    # HGMMA.64x64x16; with 8 warps both warpgroups compute it whole (2x the work), with 4 one does;
    # mma.sync counts once per warp.
    ttir = ("%5 = tt.dot %3, %4, %c, inputPrecision = tf32 : tensor<64x128xbf16> * tensor<128x64xbf16> "
            "-> tensor<64x64xf32>")
    assert compile_check.useful_mma_work(ttir) == 64 * 64 * 128
    sass = "\n".join(["        /*0100*/   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;"] * 8)
    found = compile_check.mma_instructions(sass)
    assert found == Counter({"HGMMA.64x64x16.F32.BF16": 8})
    assert compile_check.executed_mma_work(found, num_warps=8) == 2 * 64 * 64 * 128
    assert compile_check.executed_mma_work(found, num_warps=4) == 64 * 64 * 128
    hmma = compile_check.mma_instructions("HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n" * 2)
    assert compile_check.executed_mma_work(hmma, num_warps=8) == 2 * 16 * 8 * 16 * 8


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "moca_kernels.compile_check", "--quick"], capture_output=True,
                            text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    total = int(lines[0].split()[1])
    assert total >= 60 and f"{total} of {total} variants compile for sm_90a" in lines[-1]
    attention = [line for line in lines if "_varlen_attention_" in line and "preprocess" not in line]
    designs = {re.search(r"\[(\w+)", line).group(1) for line in attention}
    assert designs == {"wide", "short", "atomic", "split", "fused"}
    hot = [line for line in attention if re.search(r"HEAD_DIM=(64|80|128) ", line)]
    for line in hot:
        ratio = float(re.search(r"executed/useful MMA ([0-9.]+)", line).group(1))
        assert ratio <= compile_check.MAX_MMA_RATIO and "HMMA" not in line, line
        assert " 0 B spilled" in line, line
    # The TMA dQ path of the atomic backward is compiled at every hot head dim (and, by the exit
    # status, reached cp.reduce.async.bulk.tensor in each).
    tma_dq = {re.search(r"HEAD_DIM=(\d+)", line).group(1) for line in hot if "DQ_TMA=True" in line}
    assert tma_dq == {"64", "80", "128"}
    pointwise = [line for line in lines if re.match(r"_(rms_norm|rotary|swiglu)_", line)]
    assert len(pointwise) == 8 and all(" 0 B spilled" in line for line in pointwise), pointwise
