"""Cross-rank negatives: ``all_gather_with_grad``."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        world = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.rows = group, sum(sizes[:rank]), x.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may depend on this rank's rows: their gradient is the sum over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start: ctx.start + ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) of every rank along dim 0 (ranks may hold different n_r) and
    route gradients back to each rank's own rows.

    Gradient convention: the gradient of this rank's rows is the sum, over all ranks, of the
    gradients their losses put on those rows. So if each rank's loss is its share of the global
    loss (for a mean over the global batch: the sum over its local queries divided by the global
    batch size), and parameter gradients are summed across ranks, every gradient equals that of
    one process holding the whole global batch. Under DDP, which averages gradients over ranks,
    multiply the local loss by the world size. (MoCa's and mmE5's code divide by the world size
    without meaning to.) Without an initialized process group it returns ``x``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, group)
