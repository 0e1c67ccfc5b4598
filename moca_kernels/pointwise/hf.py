"""Route a Hugging Face Qwen2.5-VL model's pointwise work through moca's fused ops, in place.

``apply_fused_pointwise(model)`` changes the class of matching submodules to a subclass whose
``forward`` calls the fused op (so copies of the model, e.g. a decoder layer deep-copied for a
head, keep the fused path, and other models in the process are untouched):
- RMSNorm modules (``weight``, ``variance_epsilon``; language model and vision tower) ->
  ``rms_norm``;
- gate/up/down MLPs whose activation is SiLU (language model and vision tower) -> ``swiglu``
  between the projections;
- the language model's rotary embedding module, which composes the M-RoPE sections of its
  cos/sin once per forward, returns them per token ``(L, D)`` for a packed row (batch of one);
  transformers' ``apply_rotary_pos_emb`` of the Qwen2.5-VL module is wrapped so that such cos/sin
  go to ``rotary_embedding`` (queries and keys in one launch), and every other call to the
  original. ``moca_kernels.transformers.revert_class_patches`` takes the wrapper away again.

The ops pick their backend as usual (Triton on CUDA tensors, the PyTorch definitions elsewhere,
``MOCA_KERNELS_BACKEND`` to force one). Imports transformers on call only.
"""
from __future__ import annotations

import torch

from .._patches import set_attr
from .op import rms_norm as _rms_norm
from .op import rotary_embedding as _rotary_embedding
from .op import swiglu as _swiglu

_FUSED_CLASSES: dict[tuple[type, str], type] = {}


def _fused_class(cls: type, kind: str, forward) -> type:
    key = (cls, kind)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_moca_fused": kind})
    return _FUSED_CLASSES[key]


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


def _rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    """cos, sin ``(L, D)`` for a batch of one (the packed row) while the wrapper that takes them
    (``_install_rotary_wrapper``) is in place, else as transformers returns them (after
    ``revert_class_patches`` transformers' own function gets its own shapes)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    cos, sin = super(type(self), self).forward(x, position_ids)
    wrapped = getattr(modeling.apply_rotary_pos_emb, "_moca_fused", False)
    return (cos[0], sin[0]) if wrapped and cos.dim() == 3 and cos.shape[0] == 1 else (cos, sin)


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(isinstance(getattr(module, name, None), torch.nn.Linear)
                        for name in ("gate_proj", "up_proj", "down_proj"))


def _install_rotary_wrapper(modeling) -> None:
    """Wrap the module's ``apply_rotary_pos_emb`` (looked up by name at every attention call)."""
    original = modeling.apply_rotary_pos_emb
    if getattr(original, "_moca_fused", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # q, k (1, H, L, D), transposed views of the projections; cos, sin (L, D) from the fused module.
        if cos.dim() == 2 and q.dim() == 4 and q.shape[0] == 1 and k.shape[0] == 1 and unsqueeze_dim == 1:
            qo, ko = _rotary_embedding(q[0].transpose(0, 1), k[0].transpose(0, 1), cos, sin)
            return qo.transpose(0, 1).unsqueeze(0), ko.transpose(0, 1).unsqueeze(0)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._moca_fused = True
    apply_rotary_pos_emb.__wrapped__ = original
    set_attr(modeling, "apply_rotary_pos_emb", apply_rotary_pos_emb)  # revert_class_patches restores it


def apply_fused_pointwise(model: torch.nn.Module, rms_norm: bool = True, rope: bool = True,
                          swiglu: bool = True) -> dict[str, int]:
    """Make ``model`` (a Qwen2.5-VL, or any module holding its layers) use the fused pointwise ops;
    returns how many modules of each kind were changed. Idempotent; outputs and gradients equal
    the unpatched model's within rounding (the fused ops round once where PyTorch rounds after
    each product)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in model.modules():
        if getattr(type(module), "_moca_fused", None):
            continue
        if rms_norm and _is_rms_norm(module):
            module.__class__ = _fused_class(type(module), "rms_norm", _rms_forward)
            counts["rms_norm"] += 1
        elif swiglu and _is_swiglu_mlp(module):
            module.__class__ = _fused_class(type(module), "swiglu", _mlp_forward)
            counts["swiglu"] += 1
        elif rope and type(module) is modeling.Qwen2_5_VLRotaryEmbedding:
            _install_rotary_wrapper(modeling)
            module.__class__ = _fused_class(type(module), "rope", _rotary_forward)
            counts["rope"] += 1
    return counts
