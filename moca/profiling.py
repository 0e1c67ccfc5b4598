"""Named ranges for Nsight Systems (NVTX, with CUDA) and the torch profiler (always: what
``moca.breakdown`` reads its phases from), and the capture range of ``profile_steps``."""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function


@contextlib.contextmanager
def nvtx(name: str):
    """One named range on the timeline (``step N``, ``data``, ``forward``, ...)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


class CaptureRange:
    """``profile_steps`` (A, B) (``RunConfig.profile_range``): cudaProfilerStart before step A,
    cudaProfilerStop after step B, for ``nsys profile --capture-range=cudaProfilerApi``; nothing
    without CUDA or without a range."""

    def __init__(self, steps: tuple[int, int] | None, device: torch.device):
        self.bounds = steps if device.type == "cuda" else None

    def before(self, step: int) -> None:
        if self.bounds and step == self.bounds[0]:
            torch.cuda.cudart().cudaProfilerStart()

    def after(self, step: int) -> None:
        """``step``: the number of steps done."""
        if self.bounds and step == self.bounds[1] + 1:
            torch.cuda.cudart().cudaProfilerStop()
