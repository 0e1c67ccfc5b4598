"""Bidirectional attention over a packed batch of documents, then one embedding per document.

    python examples/varlen_attention.py

On a machine without a GPU the Triton kernel runs in Triton's CPU interpreter (slow, but the same
kernel code), and is checked against the PyTorch reference.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined

from moca_kernels import varlen_attention  # noqa: E402
from moca_kernels.varlen import lengths_to_cu_seqlens, segment_mean  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)

# Three documents packed back to back: a caption, a paragraph, a page. Qwen2.5-VL-3B's heads:
# 16 query heads sharing 2 key/value heads (GQA), head dim 128.
lengths = [20, 75, 230]
cu_seqlens = lengths_to_cu_seqlens(lengths, device=device)
total = sum(lengths)
q = torch.randn(total, 16, 128, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(total, 2, 128, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(total, 2, 128, device=device, dtype=dtype, requires_grad=True)

out = varlen_attention(q, k, v, cu_seqlens, backend="triton")       # (total, 16, 128)
embeddings = segment_mean(out.flatten(1), cu_seqlens)                # (3, 2048): mean over each document
embeddings.float().pow(2).sum().backward()

reference = varlen_attention(q.detach().float(), k.detach().float(), v.detach().float(), cu_seqlens, backend="torch")
error = (out.float() - reference).abs().max().item()
print(f"device {device}, {dtype}: {len(lengths)} documents, {total} tokens packed")
print(f"attention output {tuple(out.shape)}, embeddings {tuple(embeddings.shape)}, dq {tuple(q.grad.shape)}")
print(f"largest difference from the PyTorch reference: {error:.2e}")
if error > (2e-2 if dtype == torch.bfloat16 else 1e-4):
    raise SystemExit("the Triton kernel disagrees with the reference")
