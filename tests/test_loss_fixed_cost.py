"""The losses' fixed cost: info_nce and linear_cross_entropy read no tensor value on the host on
their Triton path (bad labels give NaN instead of a ValueError), and their dense engine (score
matrices within DENSE_MAX_BYTES) against the float64 oracles, forward and every gradient."""
import os
import sys

import pytest
import test_info_nce_triton as nce
import test_linear_cross_entropy as lce
import torch

from moca_kernels import _tiled_lse, info_nce, linear_cross_entropy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import loss_overhead  # noqa: E402


@pytest.fixture
def dense_only(monkeypatch):
    """The dense engine for every size, and a failure if the tiled one is reached."""
    monkeypatch.setenv("MOCA_KERNELS_DENSE_MAX_BYTES", str(1 << 40))

    def refuse(*args, **kwargs):
        raise AssertionError("the tiled engine ran")

    monkeypatch.setattr(_tiled_lse, "forward_lse", refuse)
    monkeypatch.setattr(_tiled_lse, "backward_products", refuse)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [0, 3])
def test_dense_info_nce_float32_matches_dense_float64(symmetric, normalize, k, device, dense_only):
    query, docs, hard, labels, weights = nce.make(37, 70, k, 40, seed=k + 3 * symmetric + 7 * normalize,
                                                  dtype=torch.float32, device=device)
    nce.check(query, docs, hard, labels, weights, 0.05 if normalize else 1.5, symmetric, normalize,
              rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_info_nce_float16_and_repeated_labels(symmetric, device, dense_only):
    query, docs, hard, labels, weights = nce.make(45, 50, 2, 48, seed=11, dtype=torch.float16, device=device,
                                                  duplicate_labels=True)
    nce.check(query, docs, hard, labels, weights, 0.05, symmetric, True, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dense_linear_cross_entropy_matches_dense_float64(with_bias, reduction, device, dense_only):
    hidden, weight, bias, labels = lce.make(29, 301, 24, torch.float32, device, seed=5, with_bias=with_bias)
    lce.check("triton", hidden, weight, bias, labels, reduction, rtol=2e-5, atol=2e-5)


def test_dense_linear_cross_entropy_float16(device, dense_only):
    hidden, weight, bias, labels = lce.make(29, 301, 24, torch.float16, device, seed=6)
    lce.check("triton", hidden, weight, bias, labels, "mean", rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("engine", ["tiled", "dense"])
def test_bad_labels_give_nan_rows_without_a_host_read(engine, device, monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_DENSE_MAX_BYTES", "0" if engine == "tiled" else str(1 << 40))
    query, docs, hard, _, _ = nce.make(6, 9, 1, 32, seed=2, dtype=torch.float32, device=device)
    labels = torch.tensor([0, 3, 9, 2, -1, 8], device=device)  # 9 and -1 index nothing
    call = lambda: info_nce(query, docs, labels=labels, hard_negatives=hard, reduction="none", backend="triton")  # noqa: E731,E501
    call()  # the first call of a shape class checks its engine, on the host (tests/test_loss_engines.py)
    with _reads() as reads:
        losses = call()
    assert sum(reads.values()) == 0
    bad = torch.tensor([False, False, True, False, True, False])
    assert losses[bad.to(device)].isnan().all()
    good = info_nce(query, docs, labels=labels.clamp(0, 8), hard_negatives=hard, reduction="none", backend="torch")
    torch.testing.assert_close(losses[~bad], good[~bad], rtol=1e-5, atol=1e-5)
    losses.nan_to_num().sum().backward()  # the NaN rows send no gradient
    assert torch.isfinite(query.grad).all() and torch.isfinite(docs.grad).all()

    hidden, weight, bias, _ = lce.make(5, 40, 16, torch.float32, device, seed=3)
    labels = torch.tensor([1, -100, 40, 39, -100], device=device)  # 40 is past the vocabulary
    call = lambda: linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none", backend="triton")  # noqa: E731,E501
    call()
    with _reads() as reads:
        rows = call()
    assert sum(reads.values()) == 0
    assert rows[2].isnan() and rows[1] == 0 and rows[4] == 0 and torch.isfinite(rows[[0, 3]]).all()
    want = linear_cross_entropy(hidden, weight, torch.tensor([1, -100, -100, 39, -100], device=device), bias=bias,
                                reduction="none", backend="torch")
    torch.testing.assert_close(rows[[0, 1, 3, 4]], want[[0, 1, 3, 4]].float(), rtol=1e-5, atol=1e-5)
    # A tensor temperature that is not positive: NaN losses, not a ValueError (that needs a host read).
    assert info_nce(query, docs, labels=labels.new_tensor([0, 1, 2, 3, 4, 5]), temperature=torch.tensor(-0.1),
                    backend="triton").isnan()


def _reads():
    from collections import Counter
    return loss_overhead.count_host_reads(Counter())


def test_mean_over_counted_rows_and_all_ignored(device):
    hidden, weight, _, _ = lce.make(4, 30, 16, torch.float32, device, seed=4, with_bias=False)
    labels = torch.full((4,), -100, device=device)
    out = linear_cross_entropy(hidden, weight, labels, backend="triton")
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("engine", ["tiled", "dense"])
def test_a_call_reads_nothing_on_the_host(engine, monkeypatch):
    # Forward and backward of both losses at a step's sizes, kernels stubbed (counted, not run),
    # as every call after the first of a shape class runs (host_work checks no engine).
    monkeypatch.setenv("MOCA_KERNELS_DENSE_MAX_BYTES", "0" if engine == "tiled" else str(1 << 40))
    for call in (loss_overhead.info_nce_call(24, 64, 2), loss_overhead.linear_ce_call(24, 32, 500)):
        work = loss_overhead.host_work(call)
        assert work["host_reads"] == 0, work["reads"]
        assert (work["triton_launches"] >= 2) if engine == "tiled" else work["triton_launches"] == 0
        if engine == "dense":  # a bounded number of launches whatever the size (the tiled engine chunks)
            assert 0 < work["torch_ops"] < 150, work


@pytest.mark.gpu
def test_dense_bf16_on_gpu_matches_the_reference():
    # Sizes a step uses, on the default choice (the dense engine): 1,024 queries with 2 hard
    # negatives each; 64 masked rows through the 3B head.
    from moca_kernels._dense_lse import fits
    from moca_kernels.info_nce import info_nce_reference
    from moca_kernels.linear_cross_entropy import linear_cross_entropy_reference
    assert fits(1024, 1024) and fits(64, 151936)
    query, docs, hard, labels, weights = nce.make(1024, 1024, 2, 2048, seed=3, dtype=torch.bfloat16, device="cuda")
    temp = torch.tensor(0.03, device="cuda", requires_grad=True)
    leaves = [query, docs, hard, temp]
    loss = info_nce(query, docs, labels=labels, temperature=temp, hard_negatives=hard, reduction="none")
    ref = info_nce_reference(query, docs, labels, temp, hard, False, True, "none")
    w = weights.cuda().float()
    grads = torch.autograd.grad((loss * w).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r.float()).norm() / r.float().norm() < 2e-2
    hidden, weight, _, labels = lce.make(64, 151936, 2048, torch.bfloat16, "cuda", seed=4, with_bias=False)
    out = linear_cross_entropy(hidden, weight, labels)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    grads = torch.autograd.grad(out, [hidden, weight])
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(out, ref.float(), rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r.float()).norm() / r.float().norm() < 2e-2
