"""``python -m moca_kernels.check``: as a user runs it (a process without conftest's environment,
nothing set: it turns the interpreter on itself without a GPU), every op passes at the quick shapes
and the JSON report holds every row; and a kernel whose numbers are wrong makes it fail, named in
the table, with exit status 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from moca_kernels import check

SET_BY_CONFTEST = ("MOCA_KERNELS_AUTOTUNE", "TRITON_INTERPRET")


def test_the_quick_check_passes_as_users_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SET_BY_CONFTEST}
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "moca_kernels.check", "--quick", "--json", str(report)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    dtypes = ("float32", "float16") if not torch.cuda.is_available() else ("bfloat16",)
    assert {r["op"] for r in rows} == set(check.OPS)
    assert {r["shape"].split()[-1] for r in rows} == set(dtypes)
    assert all(r["check"]["ok"] for r in rows)
    designs = {r["variant"] for r in rows if r["op"] == "varlen_attention"}
    assert {"triton fwd=wide bwd=split", "triton fwd=short bwd=atomic", "triton fwd=wide bwd=fused"} <= designs
    assert {"triton dense", "triton tiled"} <= {r["variant"] for r in rows if r["op"] == "linear_cross_entropy"}
    assert f"{len(rows)} of {len(rows)} checks passed" in done.stdout


def test_a_wrong_kernel_fails_the_check(monkeypatch, capsys):
    # (the kernels' first-use check would serve it with PyTorch; the check looks at the kernel itself)
    from moca_kernels.pointwise import triton_kernels
    real = triton_kernels.swiglu_backward
    monkeypatch.setattr(triton_kernels, "swiglu_backward", lambda *a: tuple(g * 1.01 for g in real(*a)))
    assert check.main(["--quick", "--ops", "swiglu", "--no-speed"]) == 1
    out = capsys.readouterr().out
    assert "| swiglu | triton | quick float32 | FAIL |" in out
    assert "FAIL swiglu triton quick float32: triton: grad0 error" in out


def test_the_speed_table_times_each_provider_and_reports_those_that_cannot_run(monkeypatch):
    # CPU stand-in for the GPU timer (each provider's forward+backward runs once; times are given):
    # moca, eager and compiled PyTorch are timed, a peer that is not installed is a row saying why.
    import triton.testing
    speed = {}

    def bench(fn, return_mode):
        fn()
        speed[len(speed)] = 2.0 if not speed else 3.0
        return speed[len(speed) - 1]
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    (case,) = [c for c in check.cases(True, torch.device("cpu"), ["rms_norm"]) if c.shape == "quick float32"]
    case.peers = {"missing peer": lambda x, w: __import__("no_such_peer_module")}
    times = check.time_case(case)
    assert times["moca"] == {"ms": 2.0, "ratio": 1.0}
    assert times["torch eager"] == {"ms": 3.0, "ratio": 1.5} and times["torch compiled"]["ratio"] == 1.5
    assert times["missing peer"] == {"error": "ModuleNotFoundError: No module named 'no_such_peer_module'"}
    assert "| rms_norm | triton | quick float32 | torch eager | 3.000 | 1.50 |" in check._speed_table(
        [{"op": case.op, "variant": case.variant, "shape": case.shape, "speed": times}])
