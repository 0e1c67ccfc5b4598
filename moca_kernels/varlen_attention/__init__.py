from .op import varlen_attention
from .reference import varlen_attention_reference

__all__ = ["varlen_attention", "varlen_attention_reference"]
