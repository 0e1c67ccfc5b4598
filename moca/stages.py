"""The two stages under the one loop of ``moca.train``: each owns its module, its batches and
its step.

``CptStage`` (stage 1): ``grad_accum`` packed, corrupted micro-batches per step through
``MocaCPT`` (MLM + MAE; or, with ``cpt.objective=next-token``, causal next-token prediction, which
makes a base for the tiny preset). ``ClStage`` (stage 2): one contrastive batch of pairs per step
through ``MocaEmbedder`` (in-batch and hard negatives, optionally GradCache).
"""
from __future__ import annotations

import logging
import math
from typing import Protocol

import torch

from .config import Config
from .data import loader
from .data.index import default_documents, default_pairs, index_documents, index_pairs
from .data.masking import IGNORE
from .model.embed import MocaEmbedder, NonFiniteLoss, contrastive_step
from .model.heads import MocaCPT
from .model.qwen import set_causal
from .parallel import Single, StepResult
from .profiling import nvtx

log = logging.getLogger(__name__)


class Stage(Protocol):
    """What the loop needs of a stage."""
    name: str
    module: torch.nn.Module  # what is trained and checkpointed, wrapped by the parallel strategy
    epoch: int               # the data position after the last step, saved with each checkpoint
    position: int

    def start(self, step: int, epoch: int, position: int) -> None:
        """Index the data and start the batch stream at this point of the run."""

    def step(self, autocast, measure: bool) -> StepResult:
        """Forward and backward of one optimizer step (gradients left for the loop); ``measure``:
        also compute the extras shown at logging steps."""

    def close(self) -> None:
        """Stop the batch stream (its background thread or worker processes)."""

    def summary(self) -> dict:
        """Chance levels of the stage's accuracies, for the final report."""


class CptStage:
    name = "cpt"

    def __init__(self, config: Config, model, tokenizer, parallel: Single):
        self.config, self.tokenizer, self.parallel = config, tokenizer, parallel
        c = config.cpt
        if c.next_token:  # a causal base: the LM head on every text token
            set_causal(model, True)
        self.module = MocaCPT(model, c.mae_weight, c.use_mlm or c.next_token, c.trains_mae).to(parallel.device)
        self.runner = parallel.wrap(self.module, one_forward=True)
        self.epoch = self.position = 0

    def start(self, step: int, epoch: int, position: int) -> None:
        c, p = self.config, self.parallel
        path = default_documents(c, p.main, p.barrier)
        entries = index_documents(c, self.tokenizer, path, p.rank, p.size, p.barrier)
        self.stream = loader.micro_batch_loader(entries, c, self.tokenizer, self.module.model.config, step, epoch,
                                                position, p.rank, p.size, p.device)
        log.info(f"{len(entries)} documents, {self.stream.per_epoch} micro-batches of up to {c.data.token_budget} "
                 "tokens per epoch")
        self.epoch, self.position = epoch, position

    def step(self, autocast, measure: bool) -> StepResult:
        accum, device = self.config.cpt.grad_accum, self.parallel.device
        names, sums, tokens, flops, accuracies = ("loss", "mlm_loss", "mae_loss"), [], 0, 0.0, []
        for micro in range(accum):
            with nvtx("data"):
                batch, batch_flops, self.epoch, self.position = next(self.stream)
                # the MLM rows found on the host, where the labels are: no device sync for their count
                batch["mlm_rows"] = (batch["labels"] != IGNORE).nonzero().squeeze(1)
                batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
            flops += batch_flops
            tokens += batch["input_ids"].numel()
            last = micro == accum - 1
            with self.parallel.micro_batch(self.runner, last):  # DDP communicates in the last backward only
                with nvtx("forward"), autocast:
                    out = self.runner(batch, accuracy=measure)  # an extra LM-head product: logging steps only
                with nvtx("backward"):
                    (out["loss"] / accum).backward()
            sums.append(torch.stack([out[k].detach().float() for k in names]))
            if out.get("mlm_accuracy") is not None:
                accuracies.append(out["mlm_accuracy"])
        # one host sync a step: the losses, read together; a NaN stops the run before the optimizer
        # applies anything (the NaN guard needs their values)
        values = (torch.stack(sums).sum(0) / accum).tolist()
        check_finite_values(dict(zip(names, values)))
        extras = {"mlm_accuracy": sum(accuracies) / len(accuracies)} if accuracies else {}
        return StepResult(dict(zip(names, values)), tokens, flops, extras)

    def close(self) -> None:
        self.stream.close()

    def summary(self) -> dict:
        return dict(mlm_chance=1 / self.tokenizer.vocab_size)


class ClStage:
    name = "cl"

    def __init__(self, config: Config, model, tokenizer, parallel: Single):
        self.config, self.tokenizer, self.parallel = config, tokenizer, parallel
        c = config.cl
        self.module = MocaEmbedder(model, c.temperature, c.learn_temperature, c.attention,
                                   c.pooling).to(parallel.device)
        parallel.wrap(self.module, one_forward=False)  # several forwards per backward: averaged after it
        self.epoch = self.position = 0

    def start(self, step: int, epoch: int, position: int) -> None:
        c, p = self.config, self.parallel
        path = default_pairs(c, p.main, p.barrier)
        entries = index_pairs(c, path, p.rank, p.size, p.barrier)
        need = c.cl.pairs_per_batch * p.size
        if len(entries) < need:
            raise ValueError(f"{len(entries)} usable pairs in {path}: fewer than one global batch ({need} = "
                             "pairs_per_batch x ranks)")
        tasks = sorted({e.task for e in entries})
        log.info(f"{len(entries)} pairs of {len(tasks)} task(s) ({', '.join(tasks[:8])}), batches of "
                 f"{c.cl.pairs_per_batch} pairs ({c.cl.task_batching}), {c.cl.hard_negatives} hard negatives each")
        self.stream = loader.pair_batch_loader(entries, c, self.tokenizer, epoch, position, p.rank, p.size, p.device)
        self.epoch, self.position = epoch, position

    def step(self, autocast, measure: bool) -> StepResult:
        with nvtx("data"):
            chosen, self.epoch, self.position = next(self.stream)
        queries, positives, negatives = (list(x) for x in zip(*chosen))
        with nvtx("contrastive step"):
            out = contrastive_step(self.module, queries, positives, negatives, self.tokenizer.specials.image,
                                   self.config.data.token_budget, self.parallel.device, self.config.cl.grad_cache,
                                   autocast)
        tokens = sum(d.ids.numel() for d in queries + positives + [n for per in negatives for n in per])
        # one host sync a step: the loss (for the NaN guard and the log) with the logged extras
        names = ("loss", "accuracy", "temperature")
        loss, accuracy, temperature = torch.stack([out[k].float() for k in names]).tolist()
        check_finite_values(dict(loss=loss))
        extras = dict(accuracy=round(accuracy, 4), temperature=round(temperature, 6))
        return StepResult(dict(loss=loss), tokens, None, extras)

    def close(self) -> None:
        self.stream.close()

    def summary(self) -> dict:
        return dict(accuracy_chance=1 / (self.config.cl.pairs_per_batch + self.config.cl.hard_negatives))


def check_finite_values(losses: dict[str, float]) -> None:
    """NonFiniteLoss unless every value of ``losses`` (read from the device once) is finite."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLoss(f"the loss became {bad.get('loss', next(iter(bad.values())))}")


STAGES: dict[str, type] = {"cpt": CptStage, "cl": ClStage}
