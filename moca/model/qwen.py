"""Qwen2.5-VL for MoCa: presets with random weights (``tiny`` builds offline on CPU in seconds) or
a local checkpoint, made bidirectional, and fed packed documents.

The kernels reach the model through ``moca_kernels.transformers.apply_moca_kernels_to_qwen2_5_vl``:
the language model's attention is ``moca_varlen`` (``varlen_attention`` over the documents that
``cu_seq_lens_q``, the packed batch's ``cu_seqlens`` passed as a model keyword, delimits),
bidirectional (MoCa) or causal where ``set_causal`` made the model so (the paper's causal
baseline), and the vision tower runs every window and image of the batch in one
``varlen_attention`` launch per layer.
"""
from __future__ import annotations

import json
import math
import os

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from moca.data.tokenizer import ByteTokenizer
from moca.files import open_regular, read_json
from moca_kernels.transformers import ATTENTION, apply_moca_kernels_to_qwen2_5_vl, set_bidirectional
from moca_kernels.transformers import varlen_attention_forward as varlen_attention_forward  # noqa: F401 (public)

# The tiny preset speaks the project's byte-level tokenizer (moca.data.tokenizer.ByteTokenizer).
_BYTES = ByteTokenizer()
TINY_SPECIALS = dict(image_token_id=_BYTES.specials.image, video_token_id=_BYTES.ids["<|video_pad|>"],
                     vision_start_token_id=_BYTES.specials.vision_start, vision_end_token_id=_BYTES.specials.vision_end,
                     bos_token_id=_BYTES.specials.eos, eos_token_id=_BYTES.specials.eos,
                     pad_token_id=_BYTES.specials.eos)

PRESETS = {
    "tiny": dict(
        text_config=dict(vocab_size=_BYTES.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         bos_token_id=TINY_SPECIALS["bos_token_id"], eos_token_id=TINY_SPECIALS["eos_token_id"],
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56),
        **TINY_SPECIALS),
}

# Qwen2.5-VL's own shapes and token ids, with random weights:
# for benchmarks, or as the skeleton a checkpoint fills. They speak Qwen's tokenizer, not the
# byte-level one, so training them needs --model.
QWEN_SPECIALS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
QWEN_MASK_ID = 151665  # <|mask|> as the authors' tokenizer adds it, inside the padded embedding table


def _qwen_shape(hidden, intermediate, layers, heads, kv_heads, vocab, tied):
    return dict(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, bos_token_id=QWEN_SPECIALS["bos_token_id"],
                         eos_token_id=QWEN_SPECIALS["eos_token_id"], tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
        tie_word_embeddings=tied, **QWEN_SPECIALS)


PRESETS["3b"] = _qwen_shape(2048, 11008, 36, 16, 2, 151936, tied=True)
PRESETS["7b"] = _qwen_shape(3584, 18944, 28, 28, 4, 152064, tied=False)


def build(preset: str | None = "tiny", path: str | None = None, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu", attention: str = ATTENTION, pointwise: bool = False):
    """A bidirectional Qwen2.5-VL: from a local checkpoint ``path``, else from ``preset`` with
    random weights (seeded by the caller; built directly on ``device``). ``attention`` is moca's
    packed attention (the default, language model and vision tower) or a transformers
    implementation such as ``"sdpa"`` for padded batches (the authors' approach; benchmarks).
    ``pointwise``: RMSNorm, rotary embedding and SwiGLU through moca's fused kernels."""
    if path is not None:
        try:
            config = checked_config(path)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype,
                                                                       local_files_only=True,
                                                                       attn_implementation=attention).to(device)
        except ValueError:
            raise
        except Exception as exc:  # whatever a broken config.json or weights file makes transformers raise
            raise ValueError(f"{path}: its model (config.json and weights) cannot be loaded: {type(exc).__name__}: "
                             f"{exc}") from exc
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        config = Qwen2_5_VLConfig(**PRESETS[preset], attn_implementation=attention)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    ours = attention == ATTENTION
    apply_moca_kernels_to_qwen2_5_vl(model, attention=ours, vision=ours, bidirectional=True, pointwise=pointwise)
    return model


_HEADER_BYTES = 1 << 27  # a safetensors header: names, dtypes and shapes (a few MB for a 7B model)


def _safetensors_values(path: str) -> int | None:
    """How many values the ``*.safetensors`` files of the folder ``path`` hold, from their headers
    (None when it has none: weights in another form)."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    total = 0
    for name in files:
        with open_regular(os.path.join(path, name), "weights") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _HEADER_BYTES:
                raise ValueError(f"{os.path.join(path, name)}: not a safetensors file (header of {size} bytes)")
            try:
                header = json.loads(f.read(size))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{os.path.join(path, name)}: not a safetensors file ({exc})") from None
    return total if files else None


def checked_config(path: str) -> Qwen2_5_VLConfig:
    """The configuration of the model folder ``path``, checked before transformers builds anything:
    ``config.json`` a regular JSON file (without one, transformers would build its default ~8B
    model), describing no more parameters than its safetensors weights hold (a config whose sizes
    were changed would otherwise be allocated whole before the mismatch is found). ValueError
    naming the file."""
    file = os.path.join(path, "config.json")
    try:
        values = read_json(file, "model config")
    except FileNotFoundError:
        raise ValueError(f"{path}: no config.json (not a Hugging Face model folder)") from None
    if not isinstance(values, dict) or values.get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"{file}: not a Qwen2-VL or Qwen2.5-VL configuration (model_type "
                         f"{values.get('model_type') if isinstance(values, dict) else None!r})")
    config = Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True)
    held = _safetensors_values(path)
    if held is not None:
        with torch.device("meta"):
            wanted = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())
        if wanted > 1.5 * held + (1 << 20):
            raise ValueError(f"{file} describes a model of {wanted:,} parameters; its weights hold {held:,} values")
    return config


def set_causal(model, causal: bool) -> None:
    """The language model's attention made causal (stock Qwen) or bidirectional (MoCa), in its
    layers and in its config, which an export carries to transformers."""
    set_bidirectional(model, not causal)


def freeze_lm_head(model) -> None:
    """Take an LM head that its stage never uses out of training (no gradient, no optimizer state,
    which FSDP's resume requires of every trainable parameter), unless it is tied to the input
    embedding, which does train."""
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        head.requires_grad_(False)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (the API moved in transformers 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def text_positions(lengths: list[int], device=None) -> torch.Tensor:
    """M-RoPE position ids (3, 1, total) of packed text-only documents: each restarts at 0."""
    pos = torch.cat([torch.arange(n, device=device) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    return pos.view(1, 1, -1).expand(3, 1, -1)


def packed_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states (L, H) of a packed row (``moca.data.cpt.pack_documents`` or
    ``collate``): the documents kept apart by ``cu_seqlens``, images through the vision tower.

    On a sharded model (``uniform_collectives``, set for FSDP) every rank must run every unit in
    every step: a row without images gets a one-token black image as an extra document, whose
    hidden states join the result with weight zero, so the vision tower runs forward and backward."""
    length = batch["input_ids"].shape[1]
    if getattr(model, "uniform_collectives", False) and batch["pixel_values"].shape[0] == 0:
        batch = _with_dummy_image(model.config, batch)
    images = batch["pixel_values"].shape[0] > 0
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      pixel_values=batch["pixel_values"] if images else None,
                      image_grid_thw=batch["image_grid_thw"] if images else None,
                      use_cache=False,  # training: no key/value cache (recomputation would append to it)
                      **packed_kwargs(batch))
    hidden = out.last_hidden_state[0]
    return hidden if hidden.shape[0] == length else hidden[:length] + 0.0 * hidden[length:].sum()


def _with_dummy_image(config, batch: dict) -> dict:
    """``batch`` plus a document of one merged image token (2 x 2 black patches)."""
    ids, device = batch["input_ids"], batch["input_ids"].device
    extra = torch.tensor([[config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]],
                         device=device)
    positions = torch.tensor([0, 1, 2], device=device).view(1, 1, 3).expand(3, 1, 3)
    cu = batch["cu_seqlens"]
    return dict(batch, input_ids=torch.cat([ids, extra], 1),
                position_ids=torch.cat([batch["position_ids"], positions.to(batch["position_ids"].dtype)], 2),
                cu_seqlens=torch.cat([cu, cu[-1:] + 3]), max_seqlen=max(batch["max_seqlen"], 3),
                pixel_values=batch["pixel_values"].new_zeros(4, batch["pixel_values"].shape[1]),
                image_grid_thw=torch.tensor([[1, 2, 2]], device=batch["image_grid_thw"].device,
                                            dtype=batch["image_grid_thw"].dtype))


def packed_kwargs(batch: dict) -> dict:
    """The attention keywords that carry a packed row's document boundaries to ``moca_varlen``."""
    cu = batch["cu_seqlens"]
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])

