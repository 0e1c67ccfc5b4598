"""Qwen2.5-VL for MoCa: presets with random weights (``tiny`` builds offline on CPU in seconds) or
a local checkpoint, made bidirectional, and fed packed documents.

The language model's attention goes through transformers' attention interface under the name
``moca_varlen``: ``moca_kernels.varlen_attention`` over the documents that ``cu_seq_lens_q``
(the packed batch's ``cu_seqlens``, passed as a model keyword) delimits, never causal. A batch
that is padded instead of packed (more than one row, or an attention mask) is refused: this
attention cannot honour padding silently.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from moca_kernels import varlen_attention

ATTENTION = "moca_varlen"

# Token ids of the tiny preset's vocabulary (the project's own tokenizer places its specials here).
TINY_SPECIALS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
                     bos_token_id=254, eos_token_id=255, pad_token_id=255)

PRESETS = {
    "tiny": dict(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         bos_token_id=TINY_SPECIALS["bos_token_id"], eos_token_id=TINY_SPECIALS["eos_token_id"],
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56),
        **TINY_SPECIALS),
}


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature: query (1, Hq, L, D), key/value (1, Hkv, L, D);
    returns ((1, L, Hq, D), None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if query.shape[0] != 1 or attention_mask is not None or (cu is None and kwargs.get("cu_seq_lens_k") is not None):
        raise ValueError("moca_varlen attention takes one packed row with cu_seq_lens_q (the documents' "
                         "cu_seqlens), not a padded batch: pack the documents (moca.data) instead of padding them")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (L, H, D)
    if cu is None:  # one document: the whole row
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    out = varlen_attention(q, k, v, cu.to(torch.int32), softmax_scale=scaling, causal=False)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, varlen_attention_forward)


def build(preset: str | None = "tiny", path: str | None = None, dtype: torch.dtype = torch.float32):
    """A Qwen2.5-VL on moca's bidirectional packed attention: from a local checkpoint ``path``,
    else from ``preset`` with random weights (seeded by the caller)."""
    if path is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                                   attn_implementation=ATTENTION)
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        config = Qwen2_5_VLConfig(**PRESETS[preset], attn_implementation=ATTENTION)
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.config.text_config.is_causal = False
    for layer in model.model.language_model.layers:
        layer.self_attn.is_causal = False
    return model


def text_positions(lengths: list[int], device=None) -> torch.Tensor:
    """M-RoPE position ids (3, 1, total) of packed text-only documents: each restarts at 0."""
    pos = torch.cat([torch.arange(n, device=device) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    return pos.view(1, 1, -1).expand(3, 1, -1)


def document_positions(ids: torch.Tensor, grids: torch.Tensor, image_token_id: int, merge: int = 2) -> torch.Tensor:
    """M-RoPE position ids (3, len) of one document, starting at 0: text tokens count up on all
    three axes; an image's tokens take (frame, row, column) of the merged grid, offset by the
    position reached, and the text after it continues from the largest position plus one (as
    Qwen2.5-VL's get_rope_index does for still images). ``grids`` (n_images, 3) in order."""
    ids = ids.tolist()
    out, current, i, image = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append(torch.full((3, 1), current, dtype=torch.long))
            current += 1
            i += 1
            continue
        t, h, w = (int(x) for x in grids[image])
        h, w = h // merge, w // merge
        frame = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
        row = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
        col = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
        block = torch.stack([frame, row, col]) + current
        out.append(block)
        current = int(block.max()) + 1
        i += t * h * w
        image += 1
    return torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)
