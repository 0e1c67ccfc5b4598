from .op import rms_norm, rotary_embedding, swiglu
from .reference import rms_norm_reference, rotary_embedding_reference, swiglu_reference

__all__ = ["rms_norm", "rms_norm_reference", "rotary_embedding", "rotary_embedding_reference", "swiglu",
           "swiglu_reference"]
