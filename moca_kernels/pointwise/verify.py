"""The fused pointwise kernels prove their numbers on first use (``moca_kernels._verify``).

The first call of each kernel variant (op, dtype, the sizes that pick its blocks) runs the Triton
path on a sample of that call's own rows, forward and backward, beside the PyTorch definition in
float64 and in the inputs' precision. A variant that breaks the numerics rule is warned about once
and never used again in the process: its op serves those calls with the PyTorch definition.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._verify import can_verify, disagreement, outputs_and_grads, warn_once

SAMPLE_ROWS = 32  # from each end of the call's rows
_TRUSTED: dict[tuple, bool] = {}


def rows_sample(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The first and last ``SAMPLE_ROWS`` entries of ``x`` along ``dim`` (all of them when fewer)."""
    n = x.shape[dim]
    if n <= 2 * SAMPLE_ROWS:
        return x
    return torch.cat([x.narrow(dim, 0, SAMPLE_ROWS), x.narrow(dim, n - SAMPLE_ROWS, SAMPLE_ROWS)], dim)


def trusted(op: str, key: tuple, fast: Callable, reference: Callable, inputs: Sequence[torch.Tensor],
            wrt: Sequence[int]) -> bool:
    """Whether the Triton variant ``(op, *key)`` may serve: checked on its first call (``inputs``:
    a sample of that call's own arguments, ``wrt``: the positions that are differentiated), then
    remembered. True without a check where none can run now (torch.compile tracing, CUDA-graph
    capture, MOCA_KERNELS_VERIFY=0), without remembering it."""
    variant = (op, *key)
    if variant in _TRUSTED:
        return _TRUSTED[variant]
    if not can_verify():
        return True
    ours = outputs_and_grads(fast, inputs, wrt)
    ref = outputs_and_grads(reference, inputs, wrt, torch.float64)
    plain = outputs_and_grads(reference, inputs, wrt)
    why = disagreement(op, ours, ref, plain)
    if why is not None:
        warn_once(variant, f"{op}: the Triton kernel is not used on this machine for {key}: its results break the "
                           f"numerics rule ({why}); the PyTorch definition serves instead. Please report it with "
                           "`python -m moca_kernels.check --json report.json`.")
    _TRUSTED[variant] = why is None
    return _TRUSTED[variant]
