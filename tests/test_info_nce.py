"""info_nce (chunked PyTorch backend) against a dense float64 computation: loss and the gradients
of query, docs, hard negatives and temperature; bad inputs."""
import subprocess
import sys

import pytest
import torch

from moca_kernels.info_nce import info_nce, info_nce_reference


def dense(query, docs, labels, temperature, hard, symmetric, normalize):
    if normalize:
        query, docs = (torch.nn.functional.normalize(x, dim=-1) for x in (query, docs))
        hard = torch.nn.functional.normalize(hard, dim=-1) if hard is not None else None
    scores = query @ docs.T / temperature
    rows = torch.cat([scores, torch.einsum("bd,bkd->bk", query, hard) / temperature], 1) if hard is not None else scores
    idx = torch.arange(query.shape[0])
    loss = torch.logsumexp(rows, 1) - scores[idx, labels]
    if symmetric:
        cols = docs[labels] @ query.T / temperature  # positive i against every query
        loss = 0.5 * (loss + torch.logsumexp(cols, 1) - cols[idx, idx])
    return loss


def problem(batch, m, k, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=gen, dtype=dtype).requires_grad_()
    docs = torch.randn(m, dim, generator=gen, dtype=dtype).requires_grad_()
    hard = torch.randn(batch, k, dim, generator=gen, dtype=dtype).requires_grad_() if k else None
    labels = torch.randperm(m, generator=gen)[:batch]
    weights = torch.rand(batch, generator=gen, dtype=torch.float64)
    return query, docs, hard, labels, weights


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_matches_dense(symmetric, normalize, k):
    query, docs, hard, labels, weights = problem(37, 53, k, 24, seed=k + 2 * symmetric + 4 * normalize)
    temperature = torch.tensor(0.7 if not normalize else 0.05, dtype=torch.float64, requires_grad=True)
    leaves = [x for x in (query, docs, hard, temperature) if x is not None]
    loss = info_nce_reference(query, docs, labels, temperature, hard, symmetric, normalize, "none", chunk=16)
    grads = torch.autograd.grad((loss * weights).sum(), leaves)
    ref = dense(query, docs, labels, temperature, hard, symmetric, normalize)
    ref_grads = torch.autograd.grad((ref * weights).sum(), leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(["query", "docs", "hard", "temperature"] if k else ["query", "docs", "temperature"],
                          grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_op_reductions_and_float32(reduction):
    query, docs, hard, labels, _ = problem(9, 9, 2, 16, seed=7, dtype=torch.float32)
    out = info_nce(query, docs, hard_negatives=hard, reduction=reduction, temperature=0.03)
    ref = dense(query.double(), docs.double(), torch.arange(9), 0.03, hard.double(), False, True)
    expected = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_memory_is_linear_in_the_batch():
    # B = M = 32,768: a dense float32 score matrix alone would take 4 GiB. Forward and backward in
    # a fresh process must peak far below that.
    script = """
import resource, torch
from moca_kernels.info_nce import info_nce
gen = torch.Generator().manual_seed(0)
query = torch.randn(32768, 16, generator=gen, requires_grad=True)
docs = torch.randn(32768, 16, generator=gen, requires_grad=True)
loss = info_nce(query, docs, temperature=0.05)
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(query.grad).all() and torch.isfinite(docs.grad).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib = int(result.stdout.split()[-1])
    assert peak_mib < 1536, f"peak resident memory {peak_mib} MiB"


def _bad(**change):
    query, docs = torch.randn(4, 8), torch.randn(6, 8)
    args = dict(query=query, docs=docs, temperature=0.1, labels=torch.tensor([0, 1, 2, 5]))
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(query=torch.randn(4, 8, 1)), "query must be a 2-D tensor"),
    (dict(docs=torch.randn(6, 9)), "docs has embedding size 9, query has 8"),
    (dict(docs=torch.randn(6, 8, dtype=torch.float64)), "docs is torch.float64 but query is torch.float32"),
    (dict(labels=torch.tensor([0, 1, 2, 6])), "labels must index docs"),
    (dict(labels=torch.tensor([0, 1, 2], dtype=torch.int64)), r"labels must be int64 of shape \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), r"labels must be int64 of shape \(4,\)"),
    (dict(temperature=0.0), "temperature must be positive and finite"),
    (dict(temperature=torch.tensor(-1.0)), "temperature must be positive and finite"),
    (dict(temperature=torch.tensor([0.1])), "temperature must be a float or a 0-dim floating tensor"),
    (dict(hard_negatives=torch.randn(4, 2, 7)), r"hard_negatives must have shape \(4, K, 8\)"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(query=torch.ones(4, 8, dtype=torch.int64)), "query must be a floating-point tensor"),
    (dict(backend="cuda"), "info_nce has no cuda backend"),
    (dict(query=torch.randn(4, 8, dtype=torch.bfloat16), docs=torch.randn(6, 8, dtype=torch.bfloat16),
          backend="triton"), "bfloat16 tl.dot gives wrong results in the Triton interpreter"),
])
def test_bad_input(change, message):
    with pytest.raises(ValueError, match=message):
        info_nce(**_bad(**change))


def test_default_labels_need_enough_docs():
    with pytest.raises(ValueError, match="labels default to arange"):
        info_nce(torch.randn(5, 8), torch.randn(4, 8))
