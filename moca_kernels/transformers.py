"""Put moca_kernels into Hugging Face Qwen2-VL and Qwen2.5-VL models with one call.

    from moca_kernels.transformers import apply_moca_kernels_to_qwen2_5_vl
    apply_moca_kernels_to_qwen2_5_vl()                 # before from_pretrained: every model built afterwards
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    # or, on a model that exists already:
    apply_moca_kernels_to_qwen2_5_vl(model)

What a patched model does:

- ``attention``: the language model's attention is ``varlen_attention`` under the name
  ``moca_varlen`` (registered with transformers' ``AttentionInterface``, and with
  ``AttentionMaskInterface`` so that no dense ``(B, 1, L, L)`` mask is ever built). Each call
  covers the whole batch in one launch, over the documents that the input delimits: see
  ``document_boundaries``. An input whose documents cannot be told apart is refused with a
  ``ValueError``, never run as if it were one document.
- ``bidirectional``: every token attends to its whole document (MoCa); ``False`` keeps the stock
  causal attention. Written to ``text_config.is_causal`` too, so a saved model carries it.
- ``vision``: the vision tower's attention runs every window and image of the batch in one
  ``varlen_attention`` launch per layer, instead of one attention call per window.

A patched model gets its own copy of its config (as ``from_pretrained`` gives each model): the
config object a user built it from is left as it was, so a second model built from that object
is stock. ``revert_class_patches`` restores every class attribute and module function replaced.

This module imports transformers (only this module of ``moca_kernels`` does) and never ``moca``.
"""
from __future__ import annotations

import copy
import functools
import sys
import types
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from ._patches import revert, set_attr
from .pointwise.hf import apply_fused_pointwise
from .varlen_attention import varlen_attention

ATTENTION = "moca_varlen"  # kept free of "flash": transformers 5 reads such names as hub kernels

_HOW_TO_PACK = ("give the documents' boundaries as cu_seq_lens_q / cu_seq_lens_k (DataCollatorWithFlattening("
                "return_flash_attn_kwargs=True)), or as position_ids that restart at 0 at each document "
                "(DataCollatorWithFlattening()), or pad with a 2-D attention_mask whose ones are contiguous in "
                "each row")


# --- the attention function ----------------------------------------------------------------------

def _same_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast the rotary embedding leaves q and k in float32 while v keeps the projections'
    bfloat16: the kernel runs in v's dtype, as flash-attention integrations do."""
    return q.to(v.dtype), k.to(v.dtype), v


def _cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens`` (documents + 1,) of the flattened batch from ``starts`` (B, L) bool, True
    where a document begins (the first token of every row must be True)."""
    total = torch.tensor([starts.numel()], dtype=torch.int32, device=starts.device)
    return torch.cat([starts.reshape(-1).nonzero().reshape(-1).to(torch.int32), total])


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-interface signature: query (B, Hq, L, D), key/value (B, Hkv, Lk, D);
    returns ((B, L, Hq, D), None).

    The batch's rows are flattened into one packed sequence of B * L tokens, whose documents come
    from ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 (documents + 1,) over the flattened tokens),
    or, failing those, from ``position_ids`` (B, L) restarting at 0 (as transformers' flash path
    reads them). Causal when ``is_causal`` (a keyword, else ``module.is_causal``) says so."""
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION} attention takes no dense attention mask (got one of shape "
                         f"{tuple(attention_mask.shape)}): {_HOW_TO_PACK}")
    if dropout:
        raise ValueError(f"{ATTENTION} attention has no dropout; got dropout={dropout} (set attention_dropout=0)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{ATTENTION} attention has no sliding window; got sliding_window={kwargs['sliding_window']}")
    batch, heads, length, dim = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        positions = kwargs.get("position_ids")
        if not (isinstance(positions, torch.Tensor) and positions.ndim == 2 and key.shape[2] == length):
            raise ValueError(f"{ATTENTION} attention cannot tell the documents of this input apart: {_HOW_TO_PACK} "
                             "(a Qwen2-VL / Qwen2.5-VL model patched by moca_kernels.transformers."
                             "apply_moca_kernels_to_qwen2_5_vl reads them from its input)")
        cu_q = cu_k = document_boundaries(batch, length, positions)
    elif cu_q is None or cu_k is None:
        cu_q = cu_k = cu_q if cu_q is not None else cu_k
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], dim) for x in _same_dtype(query, key, value))
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    out = varlen_attention(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), softmax_scale=scaling, causal=causal)
    return out.view(batch, length, heads, dim), None


def _no_dense_mask(*, attention_mask=None, **kwargs):
    """The mask function registered for ``moca_varlen``: never builds a mask (the documents reach the
    kernel as ``cu_seqlens``), and refuses padding that nothing upstream turned into documents."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{ATTENTION} attention cannot honour this padding mask here: {_HOW_TO_PACK}, "
                         "and patch the model with moca_kernels.transformers.apply_moca_kernels_to_qwen2_5_vl")
    return None


def register() -> None:
    """Register ``moca_varlen`` with transformers (done on import; calling it again is harmless)."""
    AttentionInterface.register(ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION, _no_dense_mask)


register()


# --- document boundaries -------------------------------------------------------------------------

def document_boundaries(batch: int, length: int, position_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """int32 ``cu_seqlens`` over the B * L tokens of a batch, flattened row after row.

    - every row starts a document (rows never attend to each other);
    - ``position_ids``: a document begins where positions restart at 0. Plain (B, L) ids, or
      (4, B, L) M-RoPE ids, whose plane 0 holds the text positions (transformers' convention), are
      read as transformers' flash path reads them. In (3, B, L) M-RoPE ids (temporal, height,
      width) a document begins where all three are 0: Qwen's ``get_rope_index`` gives (0, 0, 0)
      to a document's first token and to no other, except the later frames of a video that opens
      a document when its temporal step rounds down to 0 (pass ``cu_seq_lens_q`` there);
    - ``attention_mask`` (B, L), 1 for real tokens and 0 for padding: the real tokens of each row
      must be contiguous (right or left padding). They form the row's documents; its padding
      becomes a document of its own that no real token sees (its outputs mean nothing)."""
    if position_ids is not None:
        pos = position_ids
        if pos.ndim == 3 and pos.shape[0] == 4:
            pos = pos[0] == 0
        elif pos.ndim == 3 and pos.shape[0] == 3:
            pos = (pos == 0).all(0)
        elif pos.ndim == 2:
            pos = pos == 0
        else:
            raise ValueError(f"position_ids must be (B, L), (3, B, L) or (4, B, L); got {tuple(pos.shape)}")
        if pos.shape[-1] != length or pos.shape[0] not in (1, batch):
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} do not fit a batch of "
                             f"{batch} rows of {length} tokens")
        starts = pos.expand(batch, length).clone()
        device = starts.device
    else:
        starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"{ATTENTION} attention takes a 2-D (batch, length) = ({batch}, {length}) padding "
                             f"mask; got attention_mask of shape {tuple(attention_mask.shape)}: {_HOW_TO_PACK}")
        real = attention_mask.to(device=starts.device, dtype=torch.bool)
        rises = real[:, 1:] & ~real[:, :-1]  # padding followed by a real token
        if bool(((rises.sum(1) + real[:, 0]) > 1).any()):
            raise ValueError(f"{ATTENTION} attention cannot honour an attention_mask whose ones are not contiguous "
                             f"in each row: {_HOW_TO_PACK}")
        starts = (starts & real)  # restarts inside padding mean nothing
        starts[:, 1:] |= real[:, 1:] != real[:, :-1]
    if length:
        starts[:, 0] = True
    return _cu_seqlens(starts)


def _packed_text_forward(original: Callable) -> Callable:
    """The language model's ``forward`` that hands ``moca_varlen`` the documents of its input as
    ``cu_seq_lens_q/k``: those given, else ``document_boundaries`` from ``position_ids`` and the 2-D
    ``attention_mask`` (which it consumes, so transformers builds no mask). A model on another
    attention passes through untouched."""
    if getattr(original, "_moca_original", None) is not None:
        return original

    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != ATTENTION:
            return original(self, input_ids, attention_mask, position_ids, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{ATTENTION} attention runs whole documents; it cannot continue over a filled cache "
                             "(generation): use_cache=False, or another attention for generating")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and bool(attention_mask.all()):
            attention_mask = None  # no padding: nothing to honour
        if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
            if attention_mask is not None:
                raise ValueError(f"{ATTENTION} attention takes cu_seq_lens_q/k or a padding attention_mask, "
                                 "not both")
            for name in ("cu_seq_lens_q", "cu_seq_lens_k"):  # int32 once here, not once per layer
                if isinstance(kwargs.get(name), torch.Tensor):
                    kwargs[name] = kwargs[name].to(torch.int32)
        else:
            embeds = kwargs.get("inputs_embeds")
            batch, length = (embeds.shape[:2] if embeds is not None else input_ids.shape)
            if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"{ATTENTION} attention takes a 2-D padding attention_mask, not "
                                 f"{type(attention_mask).__name__}: {_HOW_TO_PACK}")
            device = (embeds if embeds is not None else input_ids).device
            cu = document_boundaries(batch, length, position_ids, attention_mask, device=device)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
            attention_mask = None
        return original(self, input_ids, attention_mask, position_ids, *args, **kwargs)

    forward._moca_original = original
    return forward


# --- the vision tower ----------------------------------------------------------------------------

def packed_vision_attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                            position_embeddings=None, max_seqlen=None, **kwargs) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL vision attention over every window (or image) of the batch in one
    ``varlen_attention`` launch: hidden_states (L, dim), cu_seqlens (windows + 1,) -> (L, dim). The
    rotary embedding is the one of the module's own modeling file, looked up at call time so that
    a later patch of it is honoured."""
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k, v = _same_dtype(*rotary(q, k, cos, sin), v)
    out = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.to(torch.int32),
                           softmax_scale=self.scaling)
    return self.proj(out.reshape(length, -1))


# --- patching ------------------------------------------------------------------------------------

def revert_class_patches() -> None:
    """Undo what the apply functions did to transformers' classes and modules: the class mode's
    (``model=None``) patches, and the fused rotary embedding's wrapper of ``apply_rotary_pos_emb``.
    Models built while it was on keep their own patches; one with the fused rotary module then
    applies the rotation through transformers again (the same result, not fused)."""
    revert()


# Configs that a patch copied for its model (id -> config): copied once, shared by the model's modules.
_OWN_CONFIGS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _config_copy(config):
    """A deep copy of ``config`` that the patch may write to, or ``config`` itself if it is one already."""
    if _OWN_CONFIGS.get(id(config)) is config:
        return config
    own = copy.deepcopy(config)
    _OWN_CONFIGS[id(own)] = own
    return own


def _own_config(model: torch.nn.Module) -> None:
    """Give ``model`` its own copy of its config and sub-configs (``text_config``, ``vision_config``),
    rebinding every submodule that held the shared ones, so that what the patch writes
    (``_attn_implementation``, ``is_causal``) never reaches an object the user may build another
    model from."""
    shared = model.config
    own = _config_copy(shared)
    if own is shared:
        return
    swap = {id(shared): own}
    for name, value in vars(shared).items():
        if isinstance(value, PreTrainedConfig):
            swap[id(value)] = getattr(own, name)
    for module in model.modules():
        held = vars(module).get("config")
        if held is not None and id(held) in swap:
            module.config = swap[id(held)]


def _modeling(kind: str) -> types.ModuleType:
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as module
    else:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as module
    return module


def _classes(kind: str) -> tuple[type, type, type]:
    """(the Model class that holds language_model and visual, its text model, its vision attention)."""
    m = _modeling(kind)
    if kind == "qwen2_vl":
        return m.Qwen2VLModel, m.Qwen2VLTextModel, m.VisionAttention
    return m.Qwen2_5_VLModel, m.Qwen2_5_VLTextModel, m.Qwen2_5_VLVisionAttention


def _inner(model, kind: str):
    """The ``*Model`` inside a ForConditionalGeneration (or the model itself)."""
    model_cls = _classes(kind)[0]
    inner = model if isinstance(model, model_cls) else getattr(model, "model", None)
    if not isinstance(inner, model_cls):
        raise TypeError(f"model must be a {model_cls.__name__} or hold one as .model; got {type(model).__name__}")
    return inner


def _kind(model) -> str:
    for kind in ("qwen2_5_vl", "qwen2_vl"):
        model_cls = _classes(kind)[0]
        if isinstance(model, model_cls) or isinstance(getattr(model, "model", None), model_cls):
            return kind
    raise TypeError(f"not a Qwen2-VL or Qwen2.5-VL model (nor one holding it as .model): {type(model).__name__}")


def set_bidirectional(model, bidirectional: bool = True) -> None:
    """Make a Qwen2-VL / Qwen2.5-VL language model bidirectional (MoCa) or causal (stock), in its
    attention modules and in its config (which ``save_pretrained`` writes and transformers' mask
    helpers read); works whichever attention the model runs."""
    inner = _inner(model, _kind(model))
    _own_config(model)
    for config in {id(c): c for c in (inner.config.text_config, inner.language_model.config)}.values():
        config.is_causal = not bidirectional
    for layer in inner.language_model.layers:
        layer.self_attn.is_causal = not bidirectional


def _patch_instance(model, kind: str, attention: bool, vision: bool, bidirectional: bool,
                    pointwise: bool = False) -> None:
    """Patch one model: its own copy of its config and, on the module instances, the forwards
    (Liger's instance mode)."""
    _own_config(model)
    inner = _inner(model, kind)
    text = inner.language_model
    if attention:
        for config in {id(c): c for c in (inner.config.text_config, text.config)}.values():
            config._attn_implementation = ATTENTION
        current = text.forward  # wrap what runs now: another patch may have rebound it on the instance
        if getattr(current, "_moca_original", None) is None:
            original = current.__func__ if getattr(current, "__self__", None) is text else type(text).forward
            text.forward = types.MethodType(_packed_text_forward(original), text)
    if vision:
        for block in inner.visual.blocks:
            block.attn.forward = types.MethodType(packed_vision_attention, block.attn)
    elif inner.visual.config._attn_implementation == ATTENTION:
        inner.visual.config._attn_implementation = "sdpa"  # its per-window calls carry no boundaries
    set_bidirectional(model, bidirectional)
    if pointwise:
        apply_fused_pointwise(model)


def _apply(kind: str, model, attention: bool, vision: bool, bidirectional: bool, pointwise: bool = False) -> None:
    """Patch ``model``, or with ``model=None`` the ``*Model`` class's ``__init__`` so that every model
    built afterwards (directly, by ``from_pretrained``, or inside a ForConditionalGeneration) is
    patched as it is built and stays so after ``revert_class_patches``."""
    register()
    if model is not None:
        if _kind(model) != kind:
            raise TypeError(f"this patch is for {kind}; got a {type(model).__name__}")
        _patch_instance(model, kind, attention, vision, bidirectional, pointwise)
        return
    modeling, model_cls = _modeling(kind), _classes(kind)[0]
    outer_cls = modeling.Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else \
        modeling.Qwen2_5_VLForConditionalGeneration
    set_attr(outer_cls, "__init__", _init_on_own_config(outer_cls.__init__))
    set_attr(model_cls, "__init__", _init_on_own_config(
        model_cls.__init__, lambda self: _patch_instance(self, kind, attention, vision, bidirectional, pointwise)))


def _init_on_own_config(init: Callable, then: Callable | None = None) -> Callable:
    """A model class's ``__init__`` that builds the model on a copy of the config it is given (the
    ForConditionalGeneration and the Model inside it on the same copy), then calls ``then(self)``."""
    init = getattr(init, "_moca_original", init)

    @functools.wraps(init)
    def __init__(self, config, *args, **kwargs):
        init(self, _config_copy(config), *args, **kwargs)
        if then is not None:
            then(self)

    __init__._moca_original = init
    return __init__


def apply_moca_kernels_to_qwen2_5_vl(model=None, *, attention: bool = True, vision: bool = True,
                                     bidirectional: bool = True, pointwise: bool = False) -> None:
    """Put moca_kernels into a Qwen2.5-VL model: ``model`` (a ``Qwen2_5_VLForConditionalGeneration``
    or ``Qwen2_5_VLModel``) is patched in place; with ``model=None`` transformers' classes are, so
    that every Qwen2.5-VL built afterwards (``from_pretrained`` included) comes patched.

    attention      the language model on ``moca_varlen`` (packed documents, no dense mask)
    vision         the vision tower's windows in one ``varlen_attention`` launch per layer
    bidirectional  every token sees its whole document (MoCa); False keeps causal attention
    pointwise      RMSNorm, the rotary embedding and SwiGLU through moca's fused kernels
                   (``moca_kernels.pointwise``; off by default until GPU measurements show them
                   ahead of torch.compile's code)"""
    _apply("qwen2_5_vl", model, attention, vision, bidirectional, pointwise)


def apply_moca_kernels_to_qwen2_vl(model=None, *, attention: bool = True, vision: bool = True,
                                   bidirectional: bool = True) -> None:
    """``apply_moca_kernels_to_qwen2_5_vl`` for Qwen2-VL (``Qwen2VLForConditionalGeneration`` or
    ``Qwen2VLModel``; its vision tower attends over whole images)."""
    _apply("qwen2_vl", model, attention, vision, bidirectional)


__all__ = ["ATTENTION", "apply_moca_kernels_to_qwen2_5_vl", "apply_moca_kernels_to_qwen2_vl", "document_boundaries",
           "packed_vision_attention", "register", "revert_class_patches", "set_bidirectional",
           "varlen_attention_forward"]
