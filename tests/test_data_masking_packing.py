"""MLM and MAE masking statistics and exactness; packing keeps documents whole, respects the
budget, and fills it well."""
import random

import pytest
import torch

from moca.data.masking import IGNORE, choose_image_tokens, corrupt_rows, mask_tokens
from moca.data.packing import pack, utilization


def test_mlm_masks_about_the_ratio_and_never_special_tokens():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200_000,), generator=gen)
    maskable = torch.rand(200_000, generator=gen) > 0.2  # a fifth are special
    inputs, labels = mask_tokens(ids, maskable, mask_id=7, ratio=0.4, generator=gen)
    chosen = labels != IGNORE
    assert not chosen[~maskable].any()
    assert abs(chosen[maskable].float().mean().item() - 0.4) < 0.005
    assert torch.equal(inputs[chosen], torch.full_like(inputs[chosen], 7))
    assert torch.equal(inputs[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])


def test_mae_chooses_exactly_the_ratio_and_replaces_exactly_their_rows():
    gen = torch.Generator().manual_seed(1)
    token_mask = choose_image_tokens(37, 0.5, gen)
    assert token_mask.sum().item() == round(0.5 * 37)
    rows = torch.randn(4 * 37, 1176, generator=gen)
    noise = torch.randn(1176, generator=gen)
    corrupted, targets = corrupt_rows(rows, token_mask, noise)
    for token in range(37):
        block = slice(4 * token, 4 * token + 4)
        if token_mask[token]:
            assert torch.equal(corrupted[block], noise.expand(4, -1))
        else:
            assert torch.equal(corrupted[block], rows[block])
    expected = torch.cat([rows[4 * t: 4 * t + 4] for t in range(37) if token_mask[t]])
    assert torch.equal(targets, expected)
    with pytest.raises(ValueError, match="5 pixel rows for 37 merged tokens"):
        corrupt_rows(rows[:5], token_mask, noise)


@pytest.mark.parametrize("seed", range(5))
def test_packing_keeps_documents_whole_within_the_budget(seed):
    rng = random.Random(seed)
    costs = [rng.randint(1, 1280) for _ in range(2000)] + [1280, 1]
    batches = pack(costs, 4096)
    assert sorted(i for b in batches for i in b) == list(range(len(costs)))  # each document once
    assert all(sum(costs[i] for i in b) <= 4096 for b in batches)
    assert utilization(batches, costs, 4096) > 0.97
    assert pack(costs, 4096) == batches  # deterministic


def test_packing_refuses_documents_over_the_budget():
    with pytest.raises(ValueError, match="document 1 costs 5000 tokens"):
        pack([10, 5000], 4096)


def test_cpp_and_python_packers_agree():
    # setup.py builds the C++ packer wherever pybind11 is importable at build time, which the
    # build requirements guarantee for the README's install.
    from moca.data import packing
    assert packing._pack_cpp is not None, "the C++ packer (moca.data._packer) was not built"
    rng = random.Random(7)
    for budget in (1280, 4096, 12800):
        costs = [rng.randint(1, budget) for _ in range(5000)]
        assert packing.pack(costs, budget) == packing.pack_python(costs, budget)
    with pytest.raises(ValueError, match="document 0 costs 0 tokens"):
        packing.pack([0], 10)
