"""`python -m moca_kernels.info` tells the truth about this machine."""
import os
import subprocess
import sys

import pytest
import torch


def _info(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOCA_KERNELS_BACKEND")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "moca_kernels.info"], capture_output=True, text=True, env=env,
                          check=True).stdout


def test_info_lists_every_backend_with_reasons():
    out = _info({})
    assert "varlen_attention:" in out
    assert "info_nce:\n" in out and "mae_loss:\n" in out
    assert "torch   available" in out
    assert "cuda    not implemented for this op" in out
    if torch.cuda.is_available():
        assert "triton  available" in out
    else:
        # every op with a Triton backend says why it cannot run here
        assert out.count("triton  not usable: no CUDA device") == out.count("\n  triton  ") >= 3
        assert "CUDA device: none" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter note is for machines without CUDA")
def test_info_under_interpreter():
    out = _info({"TRITON_INTERPRET": "1"})
    assert "triton  available on CPU tensors through the Triton interpreter (never picked automatically)" in out
