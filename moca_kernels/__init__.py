"""moca_kernels: fast kernels for MoCa-style multimodal embedding training.

Ops (each with a ``backend=`` argument; ``python -m moca_kernels.info`` lists the backends):
    varlen_attention  bidirectional (or causal) attention over packed variable-length documents
    info_nce          contrastive loss with in-batch and hard negatives, memory linear in the batch
    mae_loss          MAE reconstruction loss over masked rows, loss and gradient in one pass
    linear_cross_entropy  the LM head and its cross-entropy without the (N, V) logits
    rms_norm, rotary_embedding, swiglu  a Qwen decoder's pointwise work, one kernel each (moca_kernels.pointwise)

Helpers for packed batches live in ``moca_kernels.varlen``.
"""
from . import varlen
from .info_nce import all_gather_with_grad, info_nce
from .linear_cross_entropy import linear_cross_entropy
from .mae_loss import mae_loss
from .pointwise import rms_norm, rotary_embedding, swiglu
from .varlen_attention import varlen_attention

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it; moca.__version__ is it)
__all__ = ["all_gather_with_grad", "info_nce", "linear_cross_entropy", "mae_loss", "rms_norm", "rotary_embedding",
           "swiglu", "varlen", "varlen_attention", "__version__"]
