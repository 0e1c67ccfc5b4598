"""CPT documents to packed micro-batches: image blocks, truncation that never cuts an image,
MLM/MAE masks and targets that line up, and a forward pass of the tiny model on the result."""
import numpy as np
import pytest
import torch
from PIL import Image

from moca.data.cpt import collate, encode
from moca.data.images import image_rows
from moca.data.records import CptDocument
from moca.data.tokenizer import ByteTokenizer

SMALL = dict(min_pixels=56 * 56, max_pixels=56 * 56)  # every image becomes 4 merged tokens


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


@pytest.fixture
def tok():
    return ByteTokenizer()


def test_encode_expands_each_image(tok):
    doc = CptDocument("ab<image>c", [_image(0)], "f:1")
    enc = encode(doc, tok, max_tokens=100, **SMALL)
    sp = tok.specials
    assert enc.ids.tolist() == [97, 98, sp.vision_start] + [sp.image] * 4 + [sp.vision_end, 99]
    assert enc.grids.tolist() == [[1, 4, 4]] and enc.rows.shape == (16, 1176)
    np.testing.assert_array_equal(enc.rows.numpy(), image_rows(_image(0), **SMALL)[0])


@pytest.mark.parametrize("limit,expected_images", [(100, 2), (15, 2), (14, 1), (8, 1), (7, 0), (3, 0)])
def test_truncation_never_cuts_an_image(tok, limit, expected_images):
    doc = CptDocument("ab<image>c<image>d", [_image(0), _image(1)], "f:1")
    enc = encode(doc, tok, max_tokens=limit, **SMALL)
    assert enc.ids.numel() <= limit and enc.grids.shape[0] == expected_images
    assert (enc.ids == tok.specials.image).sum().item() == 4 * expected_images == enc.rows.shape[0] // 4


def test_collate_lines_up_masks_and_targets(tok):
    docs = [encode(CptDocument("hello <image> world", [_image(2)], "f:1"), tok, 200, **SMALL),
            encode(CptDocument("text only here", [], "f:2"), tok, 200, **SMALL),
            encode(CptDocument("<image><image>", [_image(3), _image(4)], "f:3"), tok, 200, **SMALL)]
    batch = collate(docs, tok.specials, mlm_ratio=0.4, mae_ratio=0.5, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([d.ids for d in docs])
    assert batch["cu_seqlens"].tolist() == [0, docs[0].ids.numel(), docs[0].ids.numel() + docs[1].ids.numel(),
                                            ids.numel()]
    masked = batch["labels"] != -100
    assert torch.equal(batch["labels"][masked], ids[masked])
    assert not torch.isin(ids[masked], torch.tensor(sorted(tok.specials.all))).any()  # specials never masked
    assert (batch["input_ids"][0][masked] == tok.specials.mask).all()
    # MAE: each masked image token's 4 target rows are its original rows, and its input rows are noise
    rows = torch.cat([d.rows for d in docs])
    image_places = (ids == tok.specials.image).nonzero().squeeze(1).tolist()
    assert len(batch["mae_positions"]) == 2 + 2 + 2  # half of each document's 4 tokens per image
    noise = None
    for k, place in enumerate(batch["mae_positions"].tolist()):
        token = image_places.index(place)
        original = rows[4 * token: 4 * token + 4]
        assert torch.equal(batch["mae_targets"][4 * k: 4 * k + 4], original)
        corrupted = batch["pixel_values"][4 * token: 4 * token + 4]
        noise = corrupted[0] if noise is None else noise
        assert torch.equal(corrupted, noise.expand(4, -1))  # one row shared by the micro-batch
    kept = [t for t, p in enumerate(image_places) if p not in batch["mae_positions"].tolist()]
    for token in kept:
        assert torch.equal(batch["pixel_values"][4 * token: 4 * token + 4], rows[4 * token: 4 * token + 4])


def test_tiny_model_runs_on_a_collated_batch(tok):
    from moca.model.qwen import build
    torch.manual_seed(0)
    model = build("tiny").eval()
    docs = [encode(CptDocument("a <image> b", [_image(5)], "f:1"), tok, 100, **SMALL),
            encode(CptDocument("plain", [], "f:2"), tok, 100, **SMALL)]
    b = collate(docs, tok.specials, 0.4, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                          position_ids=b["position_ids"], cu_seq_lens_q=b["cu_seqlens"], cu_seq_lens_k=b["cu_seqlens"],
                          max_length_q=b["max_seqlen"], max_length_k=b["max_seqlen"])
    assert out.last_hidden_state.shape == (1, b["input_ids"].shape[1], 64)
    assert torch.isfinite(out.last_hidden_state).all()
