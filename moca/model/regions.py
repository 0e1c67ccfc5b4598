"""The model's repeated blocks as regions: each decoder layer of the language model, each block
of the vision tower and the MAE decoder. A region is the unit of regional compilation and of
activation recomputation, as in torchtitan: every region of a kind runs the same code, so one
compiled graph serves all of them, and recomputation is decided per region.

``compile_regions`` compiles each region's forward with ``torch.compile``. The token dimension
(every dimension as long as the region's input rows, and the document count of ``cu_seqlens``)
is marked dynamic before each call, so packed micro-batches of different lengths reuse one graph
instead of compiling one each. moca's kernels are ``torch.library`` custom ops with fake
implementations: inside a compiled region they stay single nodes. Hooks on a region (FSDP2's
all-gather) stay outside the compiled code.

``apply_recompute`` checkpoints regions (non-reentrant ``torch.utils.checkpoint``):
- ``full``: keep each region's input only, recompute all of it in the backward;
- ``selective``: keep the outputs of the matrix products and the attention (the expensive ops),
  recompute the cheap pointwise work around them (norms, rotary embedding, SwiGLU, casts);
- ``every-K``: full recomputation of every K-th region, none for the others.

``choose_recompute`` picks one from the token budget and the card's memory with
``activation_bytes``, a deliberately simple estimate (see there).
"""
from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..config import Recompute

log = logging.getLogger(__name__)


def regions(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(kind, region) of every region under ``module`` (a Qwen2.5-VL model, or a stage's module
    holding one as ``.model``): ``decoder`` layers (the MAE decoder too) and ``vision`` blocks."""
    model = module.model if hasattr(module, "model") and not hasattr(module, "language_model") else module
    backbone = model.model if hasattr(model, "model") else model
    for layer in backbone.language_model.layers:
        yield "decoder", layer
    for block in backbone.visual.blocks:
        yield "vision", block
    mae = getattr(module, "mae_decoder", None)
    if mae is not None:
        yield "decoder", mae


# The ops whose outputs selective recomputation keeps: matrix products and attention, the work
# that dominates a region's time. Everything else in a region is pointwise or a reduction over
# one row, cheap to run again and as large in memory as a product's output.
_SAVED = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_efficient_attention.default,
          torch.ops.aten._scaled_dot_product_flash_attention.default,
          torch.ops.aten._scaled_dot_product_cudnn_attention.default}
_SAVED_NAMES = ("moca::varlen_attention_fwd",)


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective recomputation's policy: save products and attention, recompute the rest."""
    if op in _SAVED or getattr(op, "name", lambda: "")() in _SAVED_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_products)


def _checkpointed(forward: Callable, selective: bool) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, GradCache's first pass: nothing to keep anyway
            return forward(*args, **kwargs)
        extra = dict(context_fn=_selective_contexts) if selective else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    return run


def apply_recompute(module: nn.Module, mode: Recompute) -> int:
    """Checkpoint the regions of ``module`` as ``mode`` says (none, full, selective, every-K;
    resolve ``auto`` with ``choose_recompute`` first); returns how many regions recompute. Call
    before ``compile_regions``, so that the compiled code holds the checkpoint."""
    kind, k = mode.kind, mode.period
    if kind == "auto":
        raise ValueError("apply_recompute takes a resolved mode: choose_recompute turns auto into one")
    if kind == "none":
        return 0
    count = 0
    for index, (_, region) in enumerate(regions(module)):
        if kind == "every" and (index + 1) % k:
            continue
        region.forward = _checkpointed(region.forward, selective=kind == "selective")
        count += 1
    return count


def _mark_tokens(args: tuple, kwargs: dict) -> None:
    """Mark the token dimension of a region's inputs dynamic: in each tensor the first dimension
    as long as the hidden states' rows (dimension -2 of the first argument; the first only, so
    that a width equal to the row count by chance stays static and every call marks the same
    dimensions), and the length of 1-D integer tensors (``cu_seqlens``: the document count
    changes from batch to batch too)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return
    rows = hidden.shape[-2]
    stack = list(args) + list(kwargs.values())
    while stack:
        x = stack.pop()
        if isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor) and x.dim():
            if x.dim() == 1 and not x.dtype.is_floating_point:
                torch._dynamo.maybe_mark_dynamic(x, 0)
            elif rows > 1 and rows in x.shape:
                torch._dynamo.maybe_mark_dynamic(x, list(x.shape).index(rows))


def _without_hub_routing(region: nn.Module) -> None:
    """Give the modules of ``region`` their own forward where the ``kernels`` package wrapped it
    (transformers' ``use_kernelized_func``, on the attention): the wrapper sets a context variable
    to route Hub kernels, which moca never loads, and that side effect inside an activation
    checkpoint breaks the compiled region's graph in two."""
    for child in region.modules():
        wrapped = getattr(type(child).forward, "__wrapped__", None)
        if "_kernel_funcs" in vars(child) and wrapped is not None:
            child.forward = types.MethodType(wrapped, child)


def compile_regions(module: nn.Module, backend: str | Callable = "inductor", **options) -> int:
    """Compile the forward of every region of ``module`` (``torch.compile`` with ``backend`` and
    ``options``), the token dimension marked dynamic; returns how many regions."""
    from moca_kernels._registry import triton_import_error
    triton_import_error()  # probed once here, not on the first traced call: Dynamo would guard on the probe
    count = 0
    for _, region in regions(module):
        _without_hub_routing(region)
        compiled = torch.compile(region.forward, backend=backend, **options)

        def run(*args, _compiled=compiled, **kwargs):
            _mark_tokens(args, kwargs)
            return _compiled(*args, **kwargs)
        region.forward = functools.wraps(region.forward)(run)
        region.moca_compiled = True  # moca.breakdown times it whole: its modules' kernels are fused
        count += 1
    return count


@dataclass(frozen=True)
class Shape:
    """What the memory estimate needs of a model: per region kind, its width, MLP width, key/value
    width (heads x head_dim of k plus v) and count."""
    hidden: int
    intermediate: int
    kv: int
    layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_blocks: int
    merge: int  # vision patches per merged (language-model) image token

    @classmethod
    def of(cls, config, mae: bool = True) -> Shape:
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.hidden_size, text.intermediate_size, 2 * text.num_key_value_heads * head_dim,
                   text.num_hidden_layers + int(mae), vision.hidden_size, vision.intermediate_size, vision.depth,
                   vision.spatial_merge_size ** 2)


# Activation bytes kept per token (bf16) in one region, by mode, in units of the region's widths:
# (h-wide tensors, intermediate-wide tensors, kv-wide tensors). Without recomputation: the
# residual inputs, two norms' outputs and their float32 copies (counted as two each), q and its
# rotated copy, the attention output and the output projection's input, about 16 h-wide tensors;
# gate, up, the activation and the product, 4 intermediate-wide; k, v and rotated k, 2 kv-wide.
# Selective keeps the input, q, the attention output, the two projections' outputs and the down
# projection's (5 h-wide), gate and up (2 intermediate-wide), k and v (1 kv-wide). Full keeps the
# input only. The estimate ignores the vision merger, the heads and the losses (a small share).
_UNITS = {"none": (16, 4, 2), "selective": (5, 2, 1), "full": (1, 0, 0)}


def activation_bytes(shape: Shape, tokens: int, mode: Recompute, image_share: float = 1.0) -> float:
    """Estimated peak activation memory (bytes) of a forward and backward over ``tokens`` packed
    tokens under recomputation ``mode`` (none, selective, full, every-K), bf16: every token through
    each decoder region, ``image_share`` of them image tokens, each ``merge`` patches through each
    vision block (vision attention is full multi-head: kv = 2 x width). The peak is the larger of
    what the forward keeps and, for each region recomputed in the backward, what the regions
    before it keep plus its own activations, whole again while its backward runs."""
    kind, k = mode.kind, mode.period

    def per_token(kind_: str, h: int, i: int, kv: int) -> int:
        a, b, c = _UNITS[kind_]
        return 2 * (a * h + b * i + c * kv)

    def peak(h: int, i: int, kv: int, count: int) -> float:
        whole = per_token("none", h, i, kv)
        before, highest = 0.0, 0.0
        for index in range(count):
            recomputed = kind in ("full", "selective") or (kind == "every" and (index + 1) % k == 0)
            if recomputed:
                highest = max(highest, before + whole)
            before += per_token(("full" if kind == "every" else kind) if recomputed else "none", h, i, kv)
        return max(before, highest)

    s = shape
    text = peak(s.hidden, s.intermediate, s.kv, s.layers) * tokens
    vision = peak(s.vision_hidden, s.vision_intermediate, 2 * s.vision_hidden, s.vision_blocks)
    return text + vision * tokens * image_share * s.merge


def state_bytes(parameters: int, param_bytes: int) -> int:
    """Weights, gradients and AdamW's two moments, all four in the parameters' dtype (as torch's
    AdamW keeps them) of ``param_bytes`` each."""
    return parameters * 4 * param_bytes


def choose_recompute(shape: Shape, tokens: int, memory: int | None, state: int, headroom: float = 0.85,
                     image_share: float = 1.0) -> tuple[Recompute, str]:
    """(mode, why) for ``auto``: the least recomputation (none, then selective, then full) whose
    estimated activations over ``tokens`` fit in ``headroom`` of the card's ``memory`` bytes after
    ``state`` bytes of weights, gradients and optimizer; full when none fits. Without a known
    memory size (CPU) nothing needs saving: none."""
    if memory is None:
        return Recompute("none"), "no device memory limit known (CPU): no recomputation"
    free = headroom * memory - state
    mode = next((m for m in (Recompute("none"), Recompute("selective"))
                 if activation_bytes(shape, tokens, m, image_share) <= free), Recompute("full"))
    need = activation_bytes(shape, tokens, mode, image_share)
    fits = "fits" if need <= free else "does not fit either; the largest saving"
    return mode, (f"{mode}: estimated activations {need / 2**30:.1f} GiB for {tokens} tokens {fits} in "
                  f"{free / 2**30:.1f} GiB ({headroom:.0%} of {memory / 2**30:.0f} GiB less {state / 2**30:.1f} GiB "
                  "of weights, gradients and AdamW state)")


def prepare(module: nn.Module, model_config, recompute: Recompute, compile: bool, token_budget: int,
            device: torch.device, backend: str | Callable = "inductor") -> Recompute:
    """Recomputation (``auto`` resolved here from the token budget and the card's memory) then
    regional compilation of a stage's ``module``; logs the choice and returns the mode used."""
    if recompute.kind == "auto":
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        params = [p for p in module.parameters()]
        state = state_bytes(sum(p.numel() for p in params), max((p.element_size() for p in params), default=2))
        recompute, why = choose_recompute(Shape.of(model_config, getattr(module, "mae_decoder", None) is not None),
                                          token_budget, memory, state)
        log.info(f"recompute=auto -> {why}")
    count = apply_recompute(module, recompute)
    if recompute.kind != "none":
        log.info(f"recompute={recompute}: {count} regions recompute in the backward")
    if compile:
        log.info(f"compile=true: {compile_regions(module, backend=backend)} regions compiled (token dimension dynamic)")
    return recompute
