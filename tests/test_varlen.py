"""moca_kernels.varlen helpers against hand-made cases and plain PyTorch."""
import pytest
import torch

from moca_kernels.varlen import (
    check_cu_seqlens,
    cu_seqlens_to_lengths,
    lengths_to_cu_seqlens,
    pack,
    segment_mean,
    unpack,
)


def test_lengths_round_trip():
    cu = lengths_to_cu_seqlens([3, 0, 5, 1])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert cu_seqlens_to_lengths(cu).tolist() == [3, 0, 5, 1]
    assert lengths_to_cu_seqlens(torch.tensor([], dtype=torch.long)).tolist() == [0]


@pytest.mark.parametrize("lengths,message", [
    ([[1, 2]], "lengths must be 1-D"),
    ([1.5, 2.0], "lengths must be integers"),
    ([3, -1], "lengths must be non-negative"),
])
def test_lengths_bad_input(lengths, message):
    with pytest.raises(ValueError, match=message):
        lengths_to_cu_seqlens(lengths)


def test_check_cu_seqlens_returns_longest():
    assert check_cu_seqlens(lengths_to_cu_seqlens([4, 0, 9, 2]), 15) == 9


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 6, 2, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    packed, cu, longest = pack(padded, mask)
    assert packed.shape == (9, 2, 4) and cu.tolist() == [0, 3, 3, 9] and longest == 6
    assert torch.equal(packed[:3], padded[0, :3]) and torch.equal(packed[3:], padded[2])
    back = unpack(packed, cu)
    assert back.shape == (3, 6, 2, 4)
    assert torch.equal(back[mask], packed) and torch.all(back[~mask] == 0)
    assert unpack(packed, cu, max_seqlen=8).shape == (3, 8, 2, 4)
    with pytest.raises(ValueError, match="max_seqlen=5 is shorter than the longest document"):
        unpack(packed, cu, max_seqlen=5)


def test_pack_left_padding():
    padded = torch.arange(8.0).view(2, 4)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    packed, cu, _ = pack(padded, mask)
    assert packed.tolist() == [2.0, 3.0, 5.0, 6.0, 7.0] and cu.tolist() == [0, 2, 5]


def test_pack_bad_mask():
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        pack(torch.zeros(2, 4, 3), torch.ones(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_mean(dtype):
    gen = torch.Generator().manual_seed(1)
    lengths = [2, 0, 5, 1]
    x = torch.randn(8, 3, generator=gen).to(dtype).requires_grad_()
    cu = lengths_to_cu_seqlens(lengths)
    pooled = segment_mean(x, cu)
    assert pooled.dtype == dtype and pooled.shape == (4, 3)
    bounds = cu.tolist()
    expected = torch.stack([x[a:b].double().mean(0) if b > a else torch.zeros(3, dtype=torch.float64)
                            for a, b in zip(bounds[:-1], bounds[1:])])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(pooled.double(), expected, atol=tol, rtol=tol)
    (grad,) = torch.autograd.grad(pooled.double().sum(), x)
    expected_grad = torch.tensor([0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 1.0])[:, None].expand(8, 3)
    torch.testing.assert_close(grad.double(), expected_grad.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("cu,message", [
    (torch.tensor([0, 2, 8]), "cu_seqlens must be int32"),
    (torch.tensor([0, 5, 2, 8], dtype=torch.int32), "must be non-decreasing"),
    (torch.tensor([0, 2, 7], dtype=torch.int32), "must end at the token count 8"),
    (torch.tensor([2, 8], dtype=torch.int32), "must start at 0"),
    (torch.tensor([0], dtype=torch.int32), r"must have shape \(B\+1,\) with B >= 1"),
])
def test_segment_mean_bad_cu_seqlens(cu, message):
    with pytest.raises(ValueError, match=message):
        segment_mean(torch.zeros(8, 3), cu)
