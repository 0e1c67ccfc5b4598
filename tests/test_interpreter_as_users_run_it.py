"""The Triton kernels in the CPU interpreter as a user runs them: ``TRITON_INTERPRET=1`` alone, in a
process without ``tests/conftest.py``'s environment, so autotuning stays on (nothing may try to
time a kernel there: the interpreter has no GPU driver). Every op, forward and backward, at head
dims 64, 80, 96 and 128 in float32 and float16, against its PyTorch backend."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    from moca_kernels import (info_nce, linear_cross_entropy, mae_loss, rms_norm, rotary_embedding, swiglu,
                              varlen_attention)
    from moca_kernels.varlen import lengths_to_cu_seqlens

    def both(op, tensors, **kwargs):
        # (outputs and gradients) of op on the Triton and the torch backend, from the same inputs
        results = []
        for backend in ("triton", "torch"):
            leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
            out = op(*leaves, backend=backend, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
            results.append([o.detach().float() for o in outs] + [t.grad.float() for t in leaves if t.grad is not None])
        return results

    def close(name, results, dtype):
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for got, want in zip(*results):
            error = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
            assert error <= tolerance, (name, dtype, error)
        print(name, dtype, "ok", flush=True)

    torch.manual_seed(0)
    cu = lengths_to_cu_seqlens([1, 17, 0, 9])
    for dtype in (torch.float32, torch.float16):
        for d in (64, 80, 96, 128):
            q, k, v = torch.randn(27, 4, d, dtype=dtype), torch.randn(27, 2, d, dtype=dtype), \\
                torch.randn(27, 2, d, dtype=dtype)
            close(f"varlen_attention hdim {d}", both(lambda q, k, v, backend: varlen_attention(q, k, v, cu,
                                                     backend=backend), [q, k, v]), dtype)
            cos, sin = torch.randn(27, d, dtype=dtype), torch.randn(27, d, dtype=dtype)
            close(f"rotary_embedding hdim {d}", both(lambda q, k, backend: rotary_embedding(q, k, cos, sin,
                                                     backend=backend), [q, k]), dtype)
        hidden, weight = torch.randn(13, 64, dtype=dtype), torch.randn(37, 64, dtype=dtype)
        labels = torch.tensor([0, 5, -100, 36, 7, 7, 1, 2, 3, 4, 5, 6, 8])
        close("linear_cross_entropy", both(lambda h, w, backend: linear_cross_entropy(h, w, labels, backend=backend),
                                           [hidden, weight]), dtype)
        pred, target = torch.randn(11, 40, dtype=dtype), torch.randn(11, 40)
        mask = torch.rand(11) < 0.6
        close("mae_loss", both(lambda p, backend: mae_loss(p, target, mask=mask, backend=backend), [pred]), dtype)
        query, docs, hard = torch.randn(6, 32, dtype=dtype), torch.randn(6, 32, dtype=dtype), \\
            torch.randn(6, 2, 32, dtype=dtype)
        close("info_nce", both(lambda a, b, c, backend: info_nce(a, b, hard_negatives=c, backend=backend),
                               [query, docs, hard]), dtype)
        x, w = torch.randn(9, 64, dtype=dtype), torch.rand(64, dtype=dtype)
        close("rms_norm", both(lambda x, w, backend: rms_norm(x, w, backend=backend), [x, w]), dtype)
        close("swiglu", both(lambda g, u, backend: swiglu(g, u, backend=backend),
                             [torch.randn(9, 48, dtype=dtype), torch.randn(9, 48, dtype=dtype)]), dtype)
    print("done")
""")


def test_every_op_runs_in_the_interpreter_with_autotuning_left_on(tmp_path):
    script = tmp_path / "interpret.py"
    script.write_text(SCRIPT)
    set_by_conftest = ("MOCA_KERNELS_AUTOTUNE", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in set_by_conftest}
    done = subprocess.run([sys.executable, str(script)], env={**env, "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "done" and sum(line.endswith(" ok") for line in lines) == 2 * (4 * 2 + 5), lines
