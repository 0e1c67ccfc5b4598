"""Model FLOPs of a stage-1 step, for tokens-per-second figures turned into TFLOP/s and MFU.

Counted: the useful work of the method on the real tokens, forward times 3 for forward plus
backward. Per document: the language model's linear layers on every token and its attention
over the document (bidirectional: the full length squared); the vision tower on every patch
(full-attention blocks over the image, windowed blocks over windows of at most
``(window_size / patch_size)**2`` patches) and its merger; the LM head on the MLM rows only; the
MAE decoder layer on every token and its projection on the masked image tokens. Not counted:
padding, recomputation under activation checkpointing, norms, rotary embeddings, elementwise
work. Two ways of running the same step therefore share one FLOP count.
"""
from __future__ import annotations

from moca.data.images import ROW
from moca.data.masking import ROWS_PER_TOKEN

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))


def peak_bf16(device_name: str | None) -> float | None:
    """The card's dense bf16 peak, or None for a card not in the table (then no MFU is given)."""
    for key, peak in PEAK_BF16:
        if device_name and key in device_name:
            return peak
    return None


def _layer_linear(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Multiply-adds per token of one decoder layer's projections and gated MLP."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def cpt_step_flops(config, lengths: list[int], grids: list[tuple[int, int, int]], mlm_rows: int,
                   mae_tokens: int, mae: bool = True) -> float:
    """FLOPs of forward plus backward of one stage-1 micro-batch (or several: pass them all).
    ``config``: a Qwen2.5-VL config; ``lengths``: token count of each document; ``grids``:
    (t, h, w) patches of each image; ``mlm_rows``: masked text tokens; ``mae_tokens``: masked
    merged image tokens."""
    text, vision = config.text_config, config.vision_config
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    per_token = _layer_linear(hidden, text.intermediate_size, heads, text.num_key_value_heads, head_dim)
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    layers = text.num_hidden_layers + (1 if mae else 0)  # the MAE decoder is one more layer
    fwd = 2 * layers * (per_token * tokens + 2 * heads * head_dim * squares)
    fwd += 2 * hidden * text.vocab_size * mlm_rows
    if mae:
        fwd += 2 * hidden * ROWS_PER_TOKEN * ROW * mae_tokens
    vh, merge = vision.hidden_size, vision.spatial_merge_size
    window = (vision.window_size // vision.patch_size) ** 2
    for t, h, w in grids:
        patches = t * h * w
        full = len(vision.fullatt_block_indexes)
        fwd += 2 * patches * ROW * vh  # patch embedding
        fwd += 2 * vision.depth * patches * (4 * vh * vh + 3 * vh * vision.intermediate_size)
        fwd += 4 * vh * (full * patches * patches + (vision.depth - full) * patches * min(window, patches))
        merged, wide = patches // (merge * merge), vh * merge * merge
        fwd += 2 * merged * (wide * wide + wide * vision.out_hidden_size)
    return 3.0 * fwd
