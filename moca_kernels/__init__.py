"""moca_kernels: fast kernels for MoCa-style multimodal embedding training.

Ops (each with a ``backend=`` argument; ``python -m moca_kernels.info`` lists the backends):
    varlen_attention  bidirectional (or causal) attention over packed variable-length documents
    info_nce          contrastive loss with in-batch and hard negatives, memory linear in the batch

Helpers for packed batches live in ``moca_kernels.varlen``.
"""
from . import varlen
from .info_nce import all_gather_with_grad, info_nce
from .varlen_attention import varlen_attention

__version__ = "0.1.0"
__all__ = ["all_gather_with_grad", "info_nce", "varlen", "varlen_attention", "__version__"]
