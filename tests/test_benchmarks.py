"""The parts of the benchmarks that need no GPU: argument parsing, provider discovery, and that the
providers which also run on CPU compute the same attention as our reference on a tiny case."""
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCH)
import bench_attention  # noqa: E402

from moca_kernels import varlen_attention  # noqa: E402


def _bench(*args):
    return subprocess.run([sys.executable, os.path.join(BENCH, "bench_attention.py"), *args],
                          capture_output=True, text=True)


def test_list_shows_cases_and_providers():
    result = _bench("--list")
    assert result.returncode == 0, result.stderr
    for name in list(bench_attention.CASES) + list(bench_attention.PROVIDERS):
        assert name in result.stdout
    assert "case moca-64k: {'docs': " in result.stdout and "'tokens': 65536" in result.stdout


def test_unknown_case_is_refused():
    result = _bench("--cases", "no-such-case")
    assert result.returncode != 0 and "unknown case(s) ['no-such-case']" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_run_without_gpu_says_why():
    result = _bench("--cases", "moca-16k", "--providers", "sdpa-padded")
    assert result.returncode != 0 and "no CUDA device here" in result.stderr


@pytest.mark.parametrize("provider", ["moca", "moca-tma", "sdpa-padded", "sdpa-njt"])
def test_provider_computes_the_same_attention(provider, device):
    spec = dict(lengths=("random", 150, 5, 70), hq=4, hkv=2, dim=64)
    case = bench_attention.make_case("tiny", torch.float32, str(device), spec)
    x = case.inputs()
    expected = varlen_attention(x["q"], x["k"], x["v"], x["cu"], backend="torch")
    forward, leaves = bench_attention.PROVIDERS[provider].setup(x)
    out = forward()
    if provider == "sdpa-padded":  # (B, H, S, D) -> packed rows
        lengths = torch.tensor(x["lengths"], device=out.device)
        out = out.transpose(1, 2)[torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert case.fwd_flops == 4 * sum(n * n for n in x["lengths"]) * 4 * 64
