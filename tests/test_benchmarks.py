"""The parts of the benchmarks that need no GPU: argument parsing, provider discovery, and that the
providers which also run on CPU compute the same attention (or loss) as our reference on a tiny case."""
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCH)
import bench_attention  # noqa: E402
import bench_infonce  # noqa: E402
import bench_linear_ce  # noqa: E402
import bench_mae  # noqa: E402

from moca_kernels import info_nce, linear_cross_entropy, mae_loss, varlen_attention  # noqa: E402


def _bench(*args, script="bench_attention.py"):
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True)


def _listed(module) -> str:
    """What ``--list`` of the benchmark script ``module`` prints, checked to name every case and provider."""
    result = _bench("--list", script=os.path.basename(module.__file__))
    assert result.returncode == 0, result.stderr
    for name in list(module.CASES) + list(module.PROVIDERS):
        assert name in result.stdout
    return result.stdout


def test_list_shows_cases_and_providers():
    stdout = _listed(bench_attention)
    assert "case moca-64k: {'docs': " in stdout and "'tokens': 65536" in stdout


def _device_step(name: str) -> list[str]:
    """The command of one step of benchmarks/device_check.sh, as words (continuation lines joined)."""
    import shlex
    script = open(os.path.join(BENCH, "device_check.sh")).read().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if line.startswith(f"step {name} "))
    return shlex.split(line.replace('"$OUT', '"/tmp/out'))[3:]


def test_device_script_parses_and_its_attention_step_lists():
    # The device run cannot happen here: the script must at least parse, and the benchmark
    # command of its attention step must name cases and providers that exist (--list runs it
    # without a GPU).
    result = subprocess.run(["bash", "-n", os.path.join(BENCH, "device_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    words = _device_step("attention_designs")
    assert words[:2] == ["python", "benchmarks/bench_attention.py"] and "--graph" in words and "--check" in words
    result = _bench(*words[2:], "--list")
    assert result.returncode == 0, result.stderr
    for case in ("moca-16k", "docs400-16k", "long-8k", "vision-windows"):
        assert f"case {case}:" in result.stdout
    for provider in ("moca-fwd-wide", "moca-fwd-short", "moca-bwd-atomic", "moca-bwd-split", "moca-bwd-fused",
                     "moca-bwd-atomic-tma", "varlen-attn", "flex"):
        assert f"provider {provider} " in result.stdout


def test_unknown_case_is_refused():
    result = _bench("--cases", "no-such-case")
    assert result.returncode != 0 and "unknown case(s) ['no-such-case']" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_run_without_gpu_says_why():
    result = _bench("--cases", "moca-16k", "--providers", "sdpa-padded")
    assert result.returncode != 0 and "no CUDA device here" in result.stderr


ATTENTION_ON_CPU = ["moca", "moca-fwd-wide", "moca-fwd-short", "moca-bwd-atomic", "moca-bwd-split", "moca-bwd-fused",
                    "moca-tma", "moca-bwd-atomic-tma", "sdpa-padded", "sdpa-njt"]


@pytest.mark.parametrize("provider", ATTENTION_ON_CPU)
def test_provider_computes_the_same_attention(provider, device):
    # Each provider in its own environment (a forced design, TMA on), forward and backward, and
    # the benchmark's error check against a float32 computation.
    import harness
    spec = dict(lengths=("random", 150, 5, 70), hq=4, hkv=2, dim=64)
    dtype = torch.float16 if provider.endswith("tma") else torch.float32  # float32 never takes TMA
    case = bench_attention.make_case("tiny", dtype, str(device), spec)
    x = case.inputs()
    expected = varlen_attention(x["q"], x["k"], x["v"], x["cu"], backend="torch")
    chosen = bench_attention.PROVIDERS[provider]
    with harness.environment_set(chosen.env):
        forward, leaves, *notes = chosen.setup(x)
        out = forward()
        out.sum().backward()
    errors = bench_attention.error_check(x, out.detach())
    if provider == "sdpa-padded":  # (B, H, S, D) -> packed rows
        assert errors == {}
        lengths = torch.tensor(x["lengths"], device=out.device)
        out = out.transpose(1, 2)[torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]]
    else:
        assert set(errors) == ({"err_vs_fp32", "err_vs_fa2"} if device.type == "cuda" else {"err_vs_fp32"})
        assert errors["err_vs_fp32"] < (2e-3 if dtype == torch.float16 else 1e-5)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert case.fwd_flops == 4 * sum(n * n for n in x["lengths"]) * 4 * 64


def test_design_providers_force_their_design(device, monkeypatch):
    # moca-fwd-short really runs the short forward, moca-bwd-split the split backward.
    import harness

    from moca_kernels.varlen_attention import triton_kernels
    seen = []
    for name in ("_forward", "_backward"):
        original = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, lambda design, *a, _f=original: seen.append(design) or _f(design, *a))
    case = bench_attention.make_case("tiny", torch.float32, str(device), dict(lengths=("random", 90, 5, 40), hq=2,
                                                                              hkv=1, dim=32))
    x = case.inputs()
    for provider, expected in (("moca-fwd-short", "short"), ("moca-bwd-split", "split"), ("moca-bwd-fused", "fused")):
        chosen = bench_attention.PROVIDERS[provider]
        seen.clear()
        with harness.environment_set(chosen.env):
            forward, _ = chosen.setup(x)
            forward().sum().backward()
        assert expected in seen
    assert triton_kernels.DESIGN_ENV["fwd"] not in os.environ and triton_kernels.DESIGN_ENV["bwd"] not in os.environ


def test_infonce_list_shows_cases_and_providers():
    stdout = _listed(bench_infonce)
    # B = M = 65,536, d = 2,048: 8 * B * M * d FLOPs forward and backward, 512 MiB of bf16 inputs
    assert "case b64k-d2048: {'batch': 65536, 'dim': 2048, 'hard': 0, 'symmetric': False}, fwd+bwd 70.4 TFLOP, " \
        "inputs 512 MiB" in stdout


@pytest.mark.parametrize("spec", [dict(batch=37, dim=24, hard=0, symmetric=False),
                                  dict(batch=37, dim=24, hard=2, symmetric=True)])
@pytest.mark.parametrize("provider", ["moca", "dense"])
def test_infonce_provider_computes_the_same_loss(provider, spec, device):
    case = bench_infonce.make_case("tiny", torch.float32, str(device), spec)
    x = case.inputs()
    expected = info_nce(x["query"], x["docs"], labels=x["labels"], hard_negatives=x["hard"],
                        symmetric=spec["symmetric"], temperature=bench_infonce.TEMPERATURE, backend="torch")
    forward, leaves = bench_infonce.PROVIDERS[provider].setup(x)
    out = forward()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    out.backward()
    assert len(leaves) == 2 + bool(spec["hard"]) and all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert case.fwd_flops == 2 * 37 * (37 + spec["hard"]) * 24 and case.bwd_flop_factor == 3
    assert case.input_bytes == 4 * 37 * (2 + spec["hard"]) * 24


def test_mae_list_shows_cases_and_providers():
    stdout = _listed(bench_mae)
    # 16,384 rows of 4,704: bf16 pred read and gradient written, float32 target read
    assert "case n16k: {'rows': 16384, 'masked': False, 'norm_pix': False}, forward moves 588 MiB" in stdout


@pytest.mark.parametrize("spec", [dict(rows=37, masked=False, norm_pix=False),
                                  dict(rows=37, masked=True, norm_pix=True)])
@pytest.mark.parametrize("provider", ["triton", "eager"])
def test_mae_provider_computes_the_same_loss(provider, spec, device):
    case = bench_mae.make_case("tiny", str(device), spec, p=40)
    x = case.inputs()
    x["pred"] = x["pred"].float()  # the interpreter's products are not involved, but keep it exact
    expected = mae_loss(x["pred"], x["target"], mask=x["mask"], norm_pix=spec["norm_pix"], backend="torch")
    forward, leaves = bench_mae.PROVIDERS[provider].setup(x)
    out = forward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.backward()
    assert torch.isfinite(leaves[0].grad).all()
    assert case.fwd_bytes == (2 * 2 + 4) * 37 * 40 and case.bwd_bytes == 2 * 2 * 37 * 40


def test_linear_ce_list_shows_cases_and_providers():
    stdout = _listed(bench_linear_ce)
    # 16,384 rows through Qwen2.5-VL-3B's head: 6 * N * V * H useful FLOPs, bf16 hidden + weight
    assert "case n16k-3b: {'rows': 16384, 'hidden': 2048, 'vocab': 151936}, fwd+bwd 30.6 TFLOP useful, " \
        "inputs 658 MiB" in stdout


@pytest.mark.parametrize("provider", ["moca", "eager"])
def test_linear_ce_provider_computes_the_same_loss(provider, device):
    case = bench_linear_ce.make_case("tiny", torch.float32, str(device), dict(rows=37, hidden=24, vocab=1001))
    x = case.inputs()
    expected = linear_cross_entropy(x["hidden"], x["weight"], x["labels"], backend="torch")
    forward, leaves = bench_linear_ce.PROVIDERS[provider].setup(x)
    out = forward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert case.fwd_flops == 2 * 37 * 1001 * 24 and case.input_bytes == 4 * (37 + 1001) * 24


class _FakeEvent:
    elapsed = 1.0
    log: list = []

    def __init__(self, enable_timing=False):
        pass

    def record(self):
        _FakeEvent.log.append("record")

    def elapsed_time(self, other):
        return _FakeEvent.elapsed


def _fake_gpu(monkeypatch, first_call_ms=1.0):
    """Stand-ins for the CUDA timer and memory counters; returns the list of do_bench calls."""
    import triton.testing
    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        calls.append(return_mode)
        fn()
        return 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(_FakeEvent, "elapsed", first_call_ms)
    monkeypatch.setattr(_FakeEvent, "log", [])
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 100),
                        ("max_memory_allocated", 612)]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, value=value: value)
    return calls


@pytest.mark.parametrize("first_call_ms", [1.0, 500.0])
def test_measure_and_write_without_a_gpu(first_call_ms, tmp_path, monkeypatch):
    # The timing plumbing with a stand-in timer and memory counters: each mode's time (do_bench's
    # median, or for calls over LONG_CALL_MS the mean of two event-timed calls), rates by the
    # case's FLOP count, the peak against the inputs' floor, and the result files.
    import harness
    calls = _fake_gpu(monkeypatch, first_call_ms)
    x = torch.randn(8, 4, requires_grad=True)

    def forward():
        _FakeEvent.log.append("call")
        return (x * 3).sum(0)

    timings = harness.measure(forward, [x], harness.MODES)
    ms = 2.0 if first_call_ms < harness.LONG_CALL_MS else first_call_ms
    assert timings == {"fwd_ms": ms, "bwd_ms": ms, "fwd+bwd_ms": ms, "peak_mem_bytes": 512}
    assert calls == (["median"] * 3 if first_call_ms < harness.LONG_CALL_MS else [])
    # The forward timing starts with an untimed call (compilation and autotuning), then the timed
    # call that decides how to time it.
    assert _FakeEvent.log[1:5] == ["call", "record", "call", "record"]
    if first_call_ms > harness.LONG_CALL_MS:
        return
    case = harness.Case("c", {"tokens": 8}, fwd_flops=4e9)
    assert harness.rates(case, timings) == {"fwd_tflops": 2.0, "bwd_tflops": 5.0, "fwd+bwd_tflops": 7.0}
    row = {"case": "c", "tokens": 8, "provider": "p", **timings, **harness.rates(case, timings),
           "peak_over_floor": 1.25, "fwd_graph_ms": 1.5, "err_vs_fa2": 3e-3}
    harness.write(str(tmp_path), "t", {"gpu": "g", "torch": "1", "triton": "2", "commit": "c", "date": "d"}, "conv",
                  [row, {"case": "c", "provider": "q", "skipped": "why"}])
    table = (tmp_path / "results.md").read_text()
    assert "| c | p | 2.000 | 2 | 2.000 | 5 | 2.000 | 7 | 0 | 1.25 | 1.500 |  | err_vs_fa2 3.00e-03 |" in table
    assert "skipped: why" in table


def test_run_records_tuning_errors_and_graph_times(tmp_path, monkeypatch):
    # run() with a stand-in GPU: each provider's autotuner choices (read after its timing), the
    # check's error numbers, and the CUDA-graph replay times land in the row and the JSON.
    import json

    import harness
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(harness, "_graph_ms", lambda fn, leaves: 0.25)
    chosen = {}

    def setup(inputs):
        x = inputs.detach().clone().requires_grad_()
        chosen["fwd"] = None  # set once the provider has run: what a real autotuner does

        def forward():
            chosen["fwd"] = "BLOCK_N: 64, num_warps: 4"
            return x * 2

        return forward, [x]

    provider = harness.Provider("p", setup, tuning=lambda: dict(chosen))
    case = harness.Case("c", {}, fwd_flops=1e9, inputs=lambda: torch.ones(3))
    rows = harness.run("t", [case], [provider], harness.MODES, str(tmp_path), "conv", log=lambda *_: None,
                       graph=True, check=lambda inputs, out: {"err_vs_base": (out - 2 * inputs).abs().max().item()})
    assert rows[0]["tuning"] == {"fwd": "BLOCK_N: 64, num_warps: 4"}
    assert rows[0]["err_vs_base"] == 0.0
    assert rows[0]["fwd_graph_ms"] == 0.25 and rows[0]["fwd+bwd_graph_ms"] == 0.25
    saved = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert saved["tuning"] == rows[0]["tuning"] and saved["fwd_graph_ms"] == 0.25


def test_train_step_benchmark_compares_like_with_like(tmp_path):
    # the tiny shape on CPU: both ways of a stage-2 step compute the same loss on the same pairs
    # (the authors' three padded forwards and dense logits against moca's packed step), and the
    # stage-1 comparison runs and writes its table
    import json
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_train_step.py")
    small = ["--shape", "tiny", "--image-tokens", "4", "16", "--text-tokens", "8", "32", "--max-doc-tokens", "128",
             "--token-budget", "512", "--repeats", "1"]
    for stage, extra in (("cl", ["--pairs", "5", "--query-tokens", "8", "24"]),
                         ("cpt", ["--docs", "12", "--breakdown"])):
        out = tmp_path / stage
        result = subprocess.run([sys.executable, script, "--stage", stage, *small, *extra, "--out", str(out)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert [r["provider"] for r in rows] == ["moca", "authors"] and (out / "results.md").exists()
        if stage == "cl":
            assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4)
            assert rows[0]["real_tokens"] == rows[1]["real_tokens"]
        else:
            assert rows[0]["real_tokens"] == rows[1]["real_tokens"] and rows[1]["padded_tokens"] > 0
            for row in rows:  # the breakdown of each provider's step (moca.breakdown)
                classes, phases = row["breakdown"]["classes"], row["breakdown"]["phases"]
                assert sum(c["share"] for c in classes.values()) == pytest.approx(1, abs=0.01)
                assert sum(p["share"] for p in phases.values()) == pytest.approx(1, abs=0.02)
                assert all(classes[c]["device_ms"] > 0 for c in ("attention", "mlp", "norms", "vision", "heads"))
                assert phases["forward"]["host_ms"] > 0 and phases["backward"]["host_ms"] > 0
            assert rows[0]["recompute"] == "full" and "## Breakdown: moca" in (out / "results.md").read_text()


def test_pointwise_list_shows_cases_and_providers():
    import bench_pointwise
    stdout = _listed(bench_pointwise)
    # 12,800 x 11,008 bf16: gate and up read, the product written (forward)
    assert "case swiglu-3b: {'op': 'swiglu', 'tokens': 12800, 'intermediate': 11008}, forward moves 806 MiB" \
        in stdout


@pytest.mark.parametrize("spec", [dict(op="rmsnorm", tokens=7, hidden=24, residual=False),
                                  dict(op="rmsnorm", tokens=7, hidden=24, residual=True),
                                  dict(op="rope", tokens=5, heads=3, head_dim=8),
                                  dict(op="swiglu", tokens=3, intermediate=20)])
def test_pointwise_providers_compute_the_same(spec, device, monkeypatch):
    import bench_pointwise
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "triton")  # moca's kernels (the interpreter on CPU)
    x = bench_pointwise.make_case("tiny", torch.float32, str(device), spec).inputs()
    results = []
    for provider in ("moca", "eager"):
        forward, leaves = bench_pointwise.PROVIDERS[provider].setup(x)
        out = forward()
        if spec["op"] == "rope" and provider == "eager":  # the (1, H, L, D) view the attention hands over
            out = out[0].transpose(0, 1)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * torch.arange(out.shape[-1]).to(out))
        results.append((out, grads))
    (out, grads), (want, want_grads) = results
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
