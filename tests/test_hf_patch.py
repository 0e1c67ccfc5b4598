"""moca_kernels.transformers on tiny Hugging Face Qwen2-VL and Qwen2.5-VL models (random weights,
CPU): instance and class patching, documents told apart from every input form that carries them
(and refused where none does), padding honoured, the causal option, the vision tower."""
import copy

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import moca_kernels.transformers as hf
from moca.data.cpt import document_positions
from moca.model.qwen import PRESETS, TINY_SPECIALS
from moca_kernels import varlen_attention

IMAGE = TINY_SPECIALS["image_token_id"]
_QWEN2_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
KINDS = {
    "qwen2_5_vl": (lambda attn: Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(**PRESETS["tiny"], attn_implementation=attn)), hf.apply_moca_kernels_to_qwen2_5_vl),
    "qwen2_vl": (lambda attn: Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        **dict(PRESETS["tiny"], vision_config=_QWEN2_VISION), attn_implementation=attn)),
        hf.apply_moca_kernels_to_qwen2_vl),
}


def _stock(kind: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    return KINDS[kind][0](attn).eval()


def _patched(kind: str, seed: int = 0, **flags):
    model = _stock(kind, seed, attn="sdpa")
    KINDS[kind][1](model, **flags)
    return model


def _hidden(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.model(**inputs).last_hidden_state


def _text_docs(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (n,), generator=gen) for n in lengths]


def _image_doc(n_before, grid, n_after, seed):
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    ids = torch.cat([torch.randint(0, 200, (n_before,), generator=gen),
                     torch.tensor([TINY_SPECIALS["vision_start_token_id"]]), torch.full((t * h * w // 4,), IMAGE),
                     torch.tensor([TINY_SPECIALS["vision_end_token_id"]]),
                     torch.randint(0, 200, (n_after,), generator=gen)])
    return ids, torch.randn(t * h * w, 1176, generator=gen), torch.tensor([grid])


def _alone(model, docs):
    return torch.cat([_hidden(model, input_ids=d[None])[0] for d in docs])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_position_ids_alone_keep_packed_documents_apart(kind):
    # What DataCollatorWithFlattening gives without flash kwargs: one row, position_ids restarting
    # at 0. Each document must see only itself, as when it runs alone.
    model = _patched(kind)
    docs = _text_docs([13, 1, 9, 6], seed=1)
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(d.numel()) for d in docs])[None]
    alone = _alone(model, docs)
    for form in (positions, positions[None].expand(3, 1, -1), torch.cat([positions[None]] * 4)):  # (B,L), M-RoPE
        torch.testing.assert_close(_hidden(model, input_ids=ids, position_ids=form)[0], alone, rtol=1e-5, atol=1e-5)
    # the same documents as cu_seq_lens (the collator's flash kwargs) agree
    cu = torch.tensor([0, 13, 14, 23, 29], dtype=torch.int32)
    torch.testing.assert_close(_hidden(model, input_ids=ids, position_ids=positions, cu_seq_lens_q=cu,
                                       cu_seq_lens_k=cu)[0], alone, rtol=1e-5, atol=1e-5)
    # and they do differ from one document over the whole row: the check can fail
    whole = _hidden(model, input_ids=ids)[0]
    assert (whole - alone).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_packed_image_documents_from_m_rope_ids_alone(kind):
    # (3, 1, L) M-RoPE ids as get_rope_index gives them per document: a document begins at (0, 0, 0).
    model = _patched(kind, seed=2)
    docs = [_image_doc(0, (1, 4, 4), 5, seed=3), _image_doc(2, (1, 4, 6), 1, seed=4), _image_doc(3, (1, 4, 4), 0, 5)]
    alone = torch.cat([_hidden(model, input_ids=ids[None], pixel_values=px, image_grid_thw=grid,
                               position_ids=document_positions(ids, grid, IMAGE)[:, None])[0]
                       for ids, px, grid in docs])
    packed = _hidden(model, input_ids=torch.cat([d[0] for d in docs])[None],
                     pixel_values=torch.cat([d[1] for d in docs]), image_grid_thw=torch.cat([d[2] for d in docs]),
                     position_ids=torch.cat([document_positions(ids, g, IMAGE) for ids, _, g in docs], 1)[:, None])[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_padded_rows_equal_each_document_alone(kind):
    # A padded batch (right and left padding, positions from the model): the real tokens of each
    # row are its document; padding is seen by nobody.
    model = _patched(kind, seed=6)
    docs = _text_docs([9, 4, 7], seed=7)
    width = 11
    ids = torch.full((3, width), TINY_SPECIALS["pad_token_id"])
    mask = torch.zeros(3, width, dtype=torch.long)
    spans = [(0, 9), (7, 11), (2, 9)]  # right, left, both
    for row, (doc, (a, b)) in enumerate(zip(docs, spans)):
        ids[row, a:b], mask[row, a:b] = doc, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = _hidden(model, input_ids=ids, attention_mask=mask, position_ids=positions)
    for row, (doc, (a, b)) in enumerate(zip(docs, spans)):
        torch.testing.assert_close(out[row, a:b], _hidden(model, input_ids=doc[None])[0], rtol=1e-5, atol=1e-5)


def test_inputs_without_known_documents_are_refused():
    model = _patched("qwen2_5_vl")
    ids = torch.randint(0, 200, (2, 7))
    holed = torch.ones(2, 7, dtype=torch.long)
    holed[0, 2] = 0
    with pytest.raises(ValueError, match="ones are not contiguous in each row"):
        model.model(input_ids=ids, attention_mask=holed)
    cu = torch.tensor([0, 7, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q/k or a padding attention_mask, not both"):
        model.model(input_ids=ids, attention_mask=holed, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with torch.no_grad():  # generation: a filled cache
        out = model.model(input_ids=ids[:1], use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        with pytest.raises(ValueError, match="cannot continue over a filled cache"):
            model.model(input_ids=ids[:1, :1], cache=cache, use_cache=True)
    # the attention function on its own (a model transformers runs without the patch's forward)
    q = torch.randn(1, 4, 7, 16)
    k = v = torch.randn(1, 2, 7, 16)
    with pytest.raises(ValueError, match="cannot tell the documents of this input apart: give the documents"):
        hf.varlen_attention_forward(None, q, k, v, None)
    with pytest.raises(ValueError, match="takes no dense attention mask"):
        hf.varlen_attention_forward(None, q, k, v, torch.zeros(1, 1, 7, 7))
    # ... and transformers' mask step refuses padding it cannot pass on, instead of dropping it
    stock = _stock("qwen2_5_vl", attn=hf.ATTENTION)
    with pytest.raises(ValueError, match="cannot honour this padding mask here"):
        stock.model(input_ids=ids, attention_mask=holed)


def test_attention_function_reads_position_ids_as_transformers_flash_path_does():
    gen = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen), \
        torch.randn(2, 2, 9, 16, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(9))])
    out, _ = hf.varlen_attention_forward(None, q, k, v, None, position_ids=positions, scaling=0.25)
    for row, cuts in ((0, (0, 4, 7, 9)), (1, (0, 9))):
        for a, b in zip(cuts[:-1], cuts[1:]):
            ref = torch.nn.functional.scaled_dot_product_attention(q[row:row + 1, :, a:b],
                                                                   k[row:row + 1, :, a:b].repeat_interleave(2, 1),
                                                                   v[row:row + 1, :, a:b].repeat_interleave(2, 1),
                                                                   scale=0.25)
            torch.testing.assert_close(out[row, a:b], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_document_boundaries():
    cu = hf.document_boundaries(2, 5, torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]))
    assert cu.tolist() == [0, 2, 5, 10] and cu.dtype == torch.int32
    m_rope = torch.tensor([[[0, 1, 1, 1, 0]], [[0, 1, 1, 2, 0]], [[0, 1, 2, 1, 0]]])  # an image: (1,1,1),(1,1,2)...
    assert hf.document_boundaries(1, 5, m_rope).tolist() == [0, 4, 5]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert hf.document_boundaries(2, 5, attention_mask=mask).tolist() == [0, 3, 5, 7, 10]
    with pytest.raises(ValueError, match=r"position_ids must be \(B, L\)"):
        hf.document_boundaries(1, 5, torch.zeros(2, 1, 5, dtype=torch.long))


def test_class_patch_reaches_models_built_afterwards_and_reverts(tmp_path):
    reference = _patched("qwen2_5_vl", seed=9)
    reference.save_pretrained(tmp_path / "tiny")
    hf.apply_moca_kernels_to_qwen2_5_vl()
    try:
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "tiny", attn_implementation="sdpa")
        built = Qwen2_5_VLForConditionalGeneration(copy.deepcopy(reference.config))
    finally:
        hf.revert_class_patches()
    for model in (loaded, built):
        assert model.config.text_config._attn_implementation == hf.ATTENTION
        assert not any(layer.self_attn.is_causal for layer in model.model.language_model.layers)
    docs = _text_docs([6, 8], seed=10)
    positions = torch.cat([torch.arange(d.numel()) for d in docs])[None]
    torch.testing.assert_close(_hidden(loaded.eval(), input_ids=torch.cat(docs)[None], position_ids=positions)[0],
                               _alone(reference, docs), rtol=1e-5, atol=1e-5)
    after = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PRESETS["tiny"], attn_implementation="sdpa"))
    assert after.config.text_config._attn_implementation == "sdpa"
    assert all(layer.self_attn.is_causal for layer in after.model.language_model.layers)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bidirectional_false_keeps_stock_causal_attention_and_vision_runs_in_one_launch(kind, monkeypatch):
    stock = _stock(kind, seed=11)
    causal = _patched(kind, seed=11, bidirectional=False)
    assert causal.config.text_config.is_causal is True
    ids = _text_docs([10], seed=12)[0][None]
    torch.testing.assert_close(_hidden(causal, input_ids=ids), _hidden(stock, input_ids=ids), rtol=1e-5, atol=1e-5)
    # the vision tower (several images; Qwen2.5-VL's windows) against transformers' per-window eager path
    grids = torch.tensor([[1, 8, 12], [1, 4, 4]])
    pixels = torch.randn(int(grids.prod(1).sum()), 1176, generator=torch.Generator().manual_seed(13))
    launches = []
    monkeypatch.setattr(hf, "varlen_attention", lambda *a, **k: launches.append(a[3]) or varlen_attention(*a, **k))
    with torch.no_grad():
        a, b = causal.model.get_image_features(pixels, grids), stock.model.get_image_features(pixels, grids)
    torch.testing.assert_close(torch.cat(a.pooler_output), torch.cat(b.pooler_output), rtol=1e-5, atol=1e-5)
    assert len(launches) == len(causal.model.visual.blocks)  # one launch per layer over every window and image
    assert max(cu.numel() - 1 for cu in launches) > grids.shape[0] or kind == "qwen2_vl"  # windows: more than images


def _padded_batch(seed: int):
    docs = _text_docs([7, 4], seed=seed)
    ids = torch.full((2, 7), TINY_SPECIALS["pad_token_id"])
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, :doc.numel()], mask[row, :doc.numel()] = doc, 1
    return ids, mask


@pytest.mark.parametrize("mode", ["instance", "class"])
def test_the_config_a_model_was_built_from_builds_stock_models_after_the_patch(mode):
    # The user's config object is theirs: a patch (of a model, or of the classes) leaves it as it
    # was, so that a second model built from it is stock, causal, and takes plain and padded input.
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    config = Qwen2_5_VLConfig(**PRESETS["tiny"], attn_implementation="sdpa")
    before = (config.to_dict(), config.text_config.to_dict(), config.vision_config.to_dict())
    hf.revert_class_patches()  # what an earlier test's pointwise patch left in transformers' module
    originals = (modeling.Qwen2_5_VLForConditionalGeneration.__init__, modeling.Qwen2_5_VLModel.__init__,
                 modeling.apply_rotary_pos_emb)
    torch.manual_seed(14)
    if mode == "instance":
        first = Qwen2_5_VLForConditionalGeneration(config).eval()
        hf.apply_moca_kernels_to_qwen2_5_vl(first, pointwise=True)
    else:
        hf.apply_moca_kernels_to_qwen2_5_vl(pointwise=True)
        try:
            first = Qwen2_5_VLForConditionalGeneration(config).eval()
        finally:
            hf.revert_class_patches()
    assert (config.to_dict(), config.text_config.to_dict(), config.vision_config.to_dict()) == before
    assert first.config is not config and first.config.text_config._attn_implementation == hf.ATTENTION
    # every module of the patched model reads the one copy
    configs = {id(vars(m)["config"]) for m in first.modules() if "config" in vars(m)}
    assert configs <= {id(first.config), id(first.config.text_config), id(first.config.vision_config)}
    assert first.config.text_config.is_causal is False
    torch.manual_seed(14)
    second = Qwen2_5_VLForConditionalGeneration(config).eval()
    assert second.config.text_config._attn_implementation == "sdpa"
    assert all(layer.self_attn.is_causal for layer in second.model.language_model.layers)
    ids, mask = _padded_batch(seed=15)
    torch.manual_seed(14)
    stock = _stock("qwen2_5_vl", seed=14, attn="sdpa")
    for inputs in (dict(input_ids=ids[:1]), dict(input_ids=ids, attention_mask=mask)):
        torch.testing.assert_close(_hidden(second, **inputs), _hidden(stock, **inputs), rtol=1e-5, atol=1e-5)
    # the patched model is bidirectional: its first document differs from the causal stock one
    assert (_hidden(first, input_ids=ids[:1]) - _hidden(stock, input_ids=ids[:1])).abs().max() > 1e-3
    hf.revert_class_patches()  # restores every class and module function the patch replaced
    assert (modeling.Qwen2_5_VLForConditionalGeneration.__init__, modeling.Qwen2_5_VLModel.__init__,
            modeling.apply_rotary_pos_emb) == originals
