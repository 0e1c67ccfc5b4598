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

A collective waits at most ``parallel.timeout`` seconds for the other ranks (NCCL's and gloo's
own limit, set on the process group), so that a rank that stopped answering ends the run instead
of holding the others. On gloo the failure surfaces in Python: the strategy's collectives (the
micro-batch's forward and backward, the gradient and loss all-reduces, the SIGTERM check, the
barriers) turn it into ``CollectiveFailed``, one line naming the rank, the collective and the
setting. NCCL's watchdog ends the process itself, with a line naming the rank and the operation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass

import torch

from .config import Config

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What a stage's step reports to the loop: mean losses over the step's micro-batches, the
    tokens it processed, its model FLOPs (None where not counted), and values shown beside the
    losses (accuracies, temperature) at logging steps."""
    losses: dict[str, float]
    tokens: int
    flops: float | None = None
    extras: dict = dataclasses.field(default_factory=dict)


class CollectiveFailed(RuntimeError):
    """A collective failed because another rank stopped answering (for ``parallel.timeout``) or is
    gone; the message names this rank, the collective and the setting."""


# How gloo reports a peer that stopped answering or died: plain RuntimeErrors from its transport
# ("[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer", "[.../gloo/
# transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"),
# and under DDP's reducer "Application timeout caused pair closure". NCCL raises DistBackendError.
_GLOO_LOST_PEER = ("gloo/transport", "timeout caused pair closure")


def environment(timeout: float) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE and MASTER_ADDR set,
    even with one process) the process group is set up once: NCCL and this rank's GPU on CUDA
    machines, gloo on CPU, its collectives waiting at most ``timeout`` seconds for the others."""
    import torch.distributed as dist
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun's environment
    if (size > 1 or launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
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
    """Replicated model, data sharded by rank. ``timeout``: ``parallel.timeout``, for the message
    of a collective that failed."""

    def __init__(self, rank: int, size: int, device: torch.device, timeout: float):
        super().__init__(rank, size, device)
        self.ddp, self.timeout = False, timeout

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
        within = contextlib.ExitStack()  # DDP's all-reduce and FSDP's gathers run inside the backward
        within.enter_context(self._waiting("the forward and backward of a micro-batch"))
        if self.ddp and not last:
            within.enter_context(runner.no_sync())
        return within

    def reduce(self, module, result: StepResult) -> StepResult:
        with self._waiting("the all-reduce of the gradients"):
            _average_gradients(self._averaged_here(module), self.size, self.device)
        with self._waiting("the all-reduce of the logged losses"):
            return _combine(result, self.size, self.device)

    def _averaged_here(self, module) -> list:
        """The trained parameters whose gradients ``reduce`` averages: all of them, unless DDP did."""
        return [] if self.ddp else [p for p in module.parameters() if p.requires_grad]

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist
        value = torch.tensor([int(flag)], device=self.device)
        with self._waiting("the all-reduce that asks every rank whether SIGTERM arrived"):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        import torch.distributed as dist
        with self._waiting("a barrier"):
            dist.barrier()

    @contextlib.contextmanager
    def _waiting(self, what: str):
        """Runs a block of collectives; the failure of one because another rank stopped answering
        or is gone becomes ``CollectiveFailed`` naming this rank and ``what``."""
        import torch.distributed as dist
        try:
            yield
        except RuntimeError as exc:
            text = str(exc)
            if not (isinstance(exc, dist.DistError) or any(word in text for word in _GLOO_LOST_PEER)):
                raise
            detail = text.split("] ", 1)[-1].split(". ", 1)[0].splitlines()[0]  # without gloo's source path
            raise CollectiveFailed(f"rank {self.rank} of {self.size}: {what} failed: another rank stopped answering "
                                   f"for parallel.timeout ({self.timeout:g} s), or is gone ({detail})") from exc


class Sharded(DataParallel):
    """FSDP2 over decoder layers, vision blocks and the MAE decoder."""

    def wrap(self, module, one_forward: bool):
        from torch.distributed.fsdp import fully_shard
        backbone = module.model.model
        for unit in list(backbone.language_model.layers) + list(backbone.visual.blocks):
            fully_shard(unit)
        if getattr(module, "mae_decoder", None) is not None:
            fully_shard(module.mae_decoder)
        # a learned temperature stays whole: reduce averages it with the few unsharded gradients
        ignored = {p for name, p in module.named_parameters() if name == "log_temperature"}
        fully_shard(module, ignored_params=ignored or None)
        module.model.uniform_collectives = True  # every rank runs every unit each step (moca.model.qwen)
        return module

    def _averaged_here(self, module) -> list:
        """The parameters FSDP leaves whole (a learned temperature): FSDP averages what it shards."""
        from torch.distributed.tensor import DTensor
        return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def strategy(config: Config) -> Single:
    """The strategy of this process: ``Sharded`` under torchrun with fsdp=true (one rank too: the
    same code path), ``DataParallel`` under torchrun with several ranks, else ``Single``."""
    import torch.distributed as dist
    timeout = config.parallel.timeout
    rank, size, device = environment(timeout)
    if config.parallel.fsdp and dist.is_initialized():
        return Sharded(rank, size, device, timeout)
    if config.parallel.fsdp:
        log.info("fsdp=true outside torchrun: one process, nothing to shard")
    return DataParallel(rank, size, device, timeout) if size > 1 else Single(rank, size, device)


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
