"""The tiny Qwen2.5-VL on moca's attention: bidirectional, packing-exact, and refusing padding."""
import pytest
import torch

from moca.data.cpt import document_positions
from moca.model.qwen import TINY_SPECIALS, build, text_positions
from moca_kernels.varlen import lengths_to_cu_seqlens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("tiny").eval()


def _hidden(model, ids, lengths):
    cu = lengths_to_cu_seqlens(torch.tensor(lengths))
    with torch.no_grad():
        return model.model(input_ids=ids, position_ids=text_positions(lengths), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=max(lengths), max_length_k=max(lengths)).last_hidden_state[0]


def test_a_later_token_changes_an_earlier_hidden_state(model):
    ids = torch.randint(0, 200, (1, 13), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 200
    before, after = _hidden(model, ids, [13]), _hidden(model, changed, [13])
    assert (before[0] - after[0]).abs().max() > 1e-3  # attention is bidirectional


def test_packed_documents_equal_each_document_alone(model):
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 200, (1, n), generator=gen) for n in (13, 1, 9)]
    packed = _hidden(model, torch.cat(docs, 1), [13, 1, 9])
    start = 0
    for doc in docs:
        alone = _hidden(model, doc, [doc.shape[1]])
        torch.testing.assert_close(packed[start:start + doc.shape[1]], alone, rtol=1e-5, atol=1e-5)
        start += doc.shape[1]


def test_a_mask_the_attention_cannot_honour_is_refused(model):
    # Right or left padding is honoured (tests/test_hf_patch.py); a row whose real tokens are not
    # contiguous, or a prebuilt 4-D mask, would be run across documents: refused.
    ids = torch.randint(0, 200, (2, 7))
    holed = torch.ones(2, 7, dtype=torch.long)
    holed[1, 3] = 0
    with pytest.raises(ValueError, match="ones are not contiguous in each row"):
        model.model(input_ids=ids, attention_mask=holed)
    with pytest.raises(ValueError, match=r"2-D \(batch, length\)"):
        model.model(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build("huge")


def _image_document(n_before, grid, n_after, seed):
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    ids = torch.cat([torch.randint(0, 200, (n_before,), generator=gen),
                     torch.tensor([TINY_SPECIALS["vision_start_token_id"]]),
                     torch.full((t * h * w // 4,), TINY_SPECIALS["image_token_id"]),
                     torch.tensor([TINY_SPECIALS["vision_end_token_id"]]),
                     torch.randint(0, 200, (n_after,), generator=gen)])
    return ids, torch.randn(t * h * w, 1176, generator=gen), torch.tensor([grid])


def _forward(model, ids, pixels, grids, lengths, positions):
    cu = lengths_to_cu_seqlens(torch.tensor(lengths))
    with torch.no_grad():
        return model.model(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grids,
                           position_ids=positions[:, None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=max(lengths), max_length_k=max(lengths)).last_hidden_state[0]


def test_positions_match_transformers_get_rope_index(model):
    ids, _, grid = _image_document(3, (1, 4, 6), 5, seed=4)
    ours = document_positions(ids, grid, TINY_SPECIALS["image_token_id"])
    token_types = (ids == TINY_SPECIALS["image_token_id"]).long()[None]
    try:
        ref, _ = model.model.get_rope_index(ids[None], token_types, image_grid_thw=grid,
                                            attention_mask=torch.ones(1, ids.numel(), dtype=torch.long))
    except TypeError:  # transformers before mm_token_type_ids
        ref, _ = model.model.get_rope_index(ids[None], image_grid_thw=grid,
                                            attention_mask=torch.ones(1, ids.numel(), dtype=torch.long))
    assert torch.equal(ours, ref[:, 0])


def test_packed_image_documents_equal_each_document_alone(model):
    # The vision tower runs each image alone (on moca's attention too); M-RoPE positions restart.
    docs = [_image_document(3, (1, 4, 4), 5, seed=1), _image_document(2, (1, 4, 6), 1, seed=2)]
    image = TINY_SPECIALS["image_token_id"]
    alone = [_forward(model, ids, px, grid, [ids.numel()], document_positions(ids, grid, image))
             for ids, px, grid in docs]
    lengths = [ids.numel() for ids, _, _ in docs]
    packed = _forward(model, torch.cat([d[0] for d in docs]), torch.cat([d[1] for d in docs]),
                      torch.cat([d[2] for d in docs]), lengths,
                      torch.cat([document_positions(ids, grid, image) for ids, _, grid in docs], 1))
    torch.testing.assert_close(packed[:lengths[0]], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[lengths[0]:], alone[1], rtol=1e-5, atol=1e-5)


def test_vision_tower_in_one_launch_equals_transformers_per_window_attention():
    # build() replaces the vision attention by one varlen launch over all windows; the stock
    # module (eager attention, one call per window and image) must give the same features.
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moca.model.qwen import PRESETS
    torch.manual_seed(3)
    ours = build("tiny").eval()
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PRESETS["tiny"], attn_implementation="eager")).eval()
    stock.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(5)
    grids = torch.tensor([[1, 8, 12], [1, 4, 4]])  # the first image spans several 56-pixel windows
    pixels = torch.randn(int(grids.prod(1).sum()), 1176, generator=gen)
    with torch.no_grad():
        a = ours.model.get_image_features(pixels, grids)
        b = stock.model.get_image_features(pixels, grids)
    a = torch.cat(a.pooler_output if hasattr(a, "pooler_output") else a)
    b = torch.cat(b.pooler_output if hasattr(b, "pooler_output") else b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_batch_on_transformers_sdpa_equals_packed_moca():
    # The benchmark's "authors" path (build(attention="sdpa"), right-padded rows with a padding
    # mask) computes the same function as moca's packed row: the comparison is like for like.
    torch.manual_seed(6)
    ours = build("tiny").eval()
    torch.manual_seed(6)
    stock = build("tiny", attention="sdpa").eval()
    docs = [_image_document(3, (1, 4, 4), 5, seed=7), _image_document(6, (1, 4, 6), 2, seed=8)]
    image = TINY_SPECIALS["image_token_id"]
    lengths = [ids.numel() for ids, _, _ in docs]
    packed = _forward(ours, torch.cat([d[0] for d in docs]), torch.cat([d[1] for d in docs]),
                      torch.cat([d[2] for d in docs]), lengths,
                      torch.cat([document_positions(ids, grid, image) for ids, _, grid in docs], 1))
    width = max(lengths) + 3
    ids = torch.full((2, width), TINY_SPECIALS["pad_token_id"])
    mask, positions = torch.zeros(2, width, dtype=torch.long), torch.zeros(3, 2, width, dtype=torch.long)
    for b, (doc, grid) in enumerate((d[0], d[2]) for d in docs):
        ids[b, :doc.numel()], mask[b, :doc.numel()] = doc, 1
        positions[:, b, :doc.numel()] = document_positions(doc, grid, image)
    with torch.no_grad():
        padded = stock.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             pixel_values=torch.cat([d[1] for d in docs]),
                             image_grid_thw=torch.cat([d[2] for d in docs])).last_hidden_state
    torch.testing.assert_close(padded[0, :lengths[0]], packed[:lengths[0]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1, :lengths[1]], packed[lengths[0]:], rtol=1e-4, atol=1e-4)


def test_attention_takes_float32_q_k_beside_bfloat16_v():
    # Under CUDA autocast the rotary embedding returns float32 q/k beside the projections'
    # bfloat16 v (this stopped the trainer's first GPU run): the wrapper runs the kernel in v's dtype.
    from moca.model.qwen import varlen_attention_forward
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 10, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    mixed, _ = varlen_attention_forward(None, q, k, v.bfloat16(), None, cu_seq_lens_q=cu)
    plain, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), plain, rtol=0.05, atol=0.05)
