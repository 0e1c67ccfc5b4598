"""How a run spreads over processes: one strategy object that the loop calls without branching.

- ``Single``: one process.
- ``DataParallel`` (torchrun, several processes): a stage with one forward per backward (stage 1)
  runs under DDP, whose all-reduce overlaps the last micro-batch's backward; a stage with several
  forwards per backward (stage 2: queries, positives and negatives, or GradCache's passes)
  averages its gradients in buckets after the backward.
- ``Sharded`` (torchrun with ``fsdp=true``, one process too): FSDP2, each decoder layer, vision
  block and the MAE decoder its own unit; FSDP averages the gradients of what it shards.

Every strategy also averages the step's logged losses over the ranks and sums its tokens and
FLOPs. Checkpoints need nothing from the strategy: ``moca.checkpoint`` reads and writes the
sharded or whole state of any of them in one form.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from .config import Config


@dataclass
class StepResult:
    """What a stage's step reports to the loop: mean losses over the step's micro-batches, the
    tokens it processed, its model FLOPs (None where not counted), and values shown beside the
    losses (accuracies, temperature) at logging steps."""
    losses: dict[str, float]
    tokens: int
    flops: float | None = None
    extras: dict = dataclasses.field(default_factory=dict)


def environment() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE and MASTER_ADDR set,
    even with one process) the process group is set up once: NCCL and this rank's GPU on CUDA
    machines, gloo on CPU."""
    import torch.distributed as dist
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun's environment
    if (size > 1 or launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)


class Single:
    """One process: nothing to wrap or average."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None):
        self.rank, self.size, self.device = rank, size, device or torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process logs and writes the run directory."""
        return self.rank == 0

    def wrap(self, module: torch.nn.Module, one_forward: bool):
        """The callable the stage runs its forward through. ``one_forward``: the stage runs one
        forward per backward of each micro-batch (DDP's condition)."""
        return module

    def micro_batch(self, runner, last: bool):
        """Context for one micro-batch's forward and backward; ``last``: the step's last one."""
        return contextlib.nullcontext()

    def reduce(self, module: torch.nn.Module, result: StepResult) -> StepResult:
        """After the backward: gradients averaged over ranks where the strategy has not done it,
        the logged numbers combined."""
        return result

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        return flag

    def barrier(self) -> None:
        pass


class DataParallel(Single):
    """Replicated model, data sharded by rank."""

    def __init__(self, rank: int, size: int, device: torch.device):
        super().__init__(rank, size, device)
        self.ddp = False

    def wrap(self, module, one_forward: bool):
        if not one_forward:
            return module
        from torch.nn.parallel import DistributedDataParallel
        self.ddp = True
        # parameters a micro-batch does not use (the vision tower without images, the MAE decoder
        # without masked image tokens) count as zero gradients
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def micro_batch(self, runner, last: bool):
        return runner.no_sync() if self.ddp and not last else contextlib.nullcontext()

    def reduce(self, module, result: StepResult) -> StepResult:
        if not self.ddp:
            _average_gradients([p for p in module.parameters() if p.requires_grad], self.size, self.device)
        return _combine(result, self.size, self.device)

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier()


class Sharded(DataParallel):
    """FSDP2 over decoder layers, vision blocks and the MAE decoder."""

    def wrap(self, module, one_forward: bool):
        from torch.distributed.fsdp import fully_shard
        backbone = module.model.model
        for unit in list(backbone.language_model.layers) + list(backbone.visual.blocks):
            fully_shard(unit)
        if getattr(module, "mae_decoder", None) is not None:
            fully_shard(module.mae_decoder)
        # a learned temperature stays whole: averaged below with the few unsharded gradients
        ignored = {p for name, p in module.named_parameters() if name == "log_temperature"}
        fully_shard(module, ignored_params=ignored or None)
        module.model.uniform_collectives = True  # every rank runs every unit each step (moca.model.qwen)
        return module

    def micro_batch(self, runner, last: bool):
        return contextlib.nullcontext()

    def reduce(self, module, result: StepResult) -> StepResult:
        from torch.distributed.tensor import DTensor
        whole = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        _average_gradients(whole, self.size, self.device)
        return _combine(result, self.size, self.device)


def strategy(config: Config, log=print) -> Single:
    """The strategy of this process: ``Sharded`` under torchrun with fsdp=true (one rank too: the
    same code path), ``DataParallel`` under torchrun with several ranks, else ``Single``."""
    import torch.distributed as dist
    rank, size, device = environment()
    if config.parallel.fsdp and dist.is_initialized():
        return Sharded(rank, size, device)
    if config.parallel.fsdp:
        log("fsdp=true outside torchrun: one process, nothing to shard")
    return DataParallel(rank, size, device) if size > 1 else Single(rank, size, device)


def leave() -> None:
    """Tear the process group down (NCCL aborts the process at exit otherwise)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _average_gradients(params: list, size: int, device: torch.device, bucket: int = 1 << 25) -> None:
    """Every gradient of ``params`` averaged over the ranks in buckets of ``bucket`` values. A
    parameter without a gradient on some rank counts as zero there; one that no rank used keeps
    no gradient, as in one process."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    if params:
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has)
        params = [p for p, used in zip(params, has.tolist()) if used]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        end, count = start, 0
        while end < len(params) and (count == 0 or count + params[end].numel() <= bucket):
            count, end = count + params[end].numel(), end + 1
        grads = [p.grad for p in params[start:end]]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= size
        for g, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(averaged)
        start = end


def _combine(result: StepResult, size: int, device: torch.device) -> StepResult:
    """The losses averaged over the ranks; tokens and FLOPs summed."""
    import torch.distributed as dist
    names = sorted(result.losses)
    numbers = torch.tensor([result.losses[k] / size for k in names] + [result.tokens, result.flops or 0.0],
                           dtype=torch.float64, device=device)
    dist.all_reduce(numbers)
    values = numbers.tolist()
    return dataclasses.replace(result, losses=dict(zip(names, values[:len(names)])), tokens=int(values[-2]),
                               flops=None if result.flops is None else values[-1])
