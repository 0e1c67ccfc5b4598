"""MoCa's stage-2 embedding and contrastive step.

An embedding is the mean of a document's final hidden states over all its tokens (text and
image; ``segment_mean`` over ``cu_seqlens``), L2-normalized; or, for the paper's causal baseline
(``attention="causal"``, ``pooling="last"``), the state of its last token. The loss is ``info_nce`` in MoCa's
layout: each query against every positive of the global batch (gathered across ranks with
exact gradients) plus its own K hard negatives, temperature 0.03 (optionally learned).

A step encodes the batch's documents (queries, positives, negatives) packed into rows under the
token budget. Plainly, every row keeps its graph until the loss; with GradCache the rows are
first encoded without a graph, the loss gives the gradient of each embedding, and each row is
then encoded again and back-propagated on its own: activations of one row at a time, the same
gradients.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moca.data.cpt import Encoded, pack_documents
from moca.data.images import ROW
from moca.data.packing import pack
from moca_kernels import info_nce
from moca_kernels.info_nce.distributed import all_gather_with_grad
from moca_kernels.varlen import segment_mean

from ..profiling import nvtx
from .qwen import freeze_lm_head, packed_hidden, set_causal

ATTENTIONS, POOLINGS = ("bidirectional", "causal"), ("mean", "last")


class MocaEmbedder(nn.Module):
    def __init__(self, model, temperature: float = 0.03, learn_temperature: bool = False,
                 attention: str = "bidirectional", pooling: str = "mean"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if attention not in ATTENTIONS or pooling not in POOLINGS:
            raise ValueError(f"attention must be one of {ATTENTIONS} and pooling one of {POOLINGS}, got "
                             f"{attention!r} and {pooling!r}")
        self.model, self.attention, self.pooling = model, attention, pooling
        if hasattr(model, "config"):  # a Qwen model (a bare module stands in for one when only the loss matters)
            set_causal(model, attention == "causal")
        freeze_lm_head(model)  # embeddings never reach the LM head
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, batch: dict) -> torch.Tensor:
        """Normalized float32 embeddings (documents, H) of a packed row (``pack_documents``): the
        mean of each document's states, or its last token's (``pooling="last"``)."""
        hidden = packed_hidden(self.model, batch)
        cu = batch["cu_seqlens"]
        pooled = hidden[cu[1:].long() - 1] if self.pooling == "last" else segment_mean(hidden, cu)
        return F.normalize(pooled.float(), dim=-1)

    def loss(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        """InfoNCE of this rank's queries (B, H) against the positives of every rank and their own
        hard negatives (B, K, H). Scaled so that gradients summed over ranks (or averaged by DDP,
        whose average this undoes) equal one process's mean over the global batch."""
        docs = all_gather_with_grad(positive)
        world, offset = 1, 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            counts = [torch.zeros(1, dtype=torch.long, device=query.device) for _ in range(world)]
            dist.all_gather(counts, torch.tensor([query.shape[0]], device=query.device))
            offset = int(sum(c.item() for c in counts[:dist.get_rank()]))  # ranks may hold different counts
        labels = torch.arange(query.shape[0], device=query.device) + offset
        total = info_nce(query, docs, temperature=self.temperature(), labels=labels, hard_negatives=negatives,
                         normalize=False, reduction="sum")
        return total * world / docs.shape[0]

    @torch.no_grad()
    def accuracy(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        """Share of this rank's queries whose best score (over this rank's positives and their own
        negatives) is their positive: a 0-dim tensor, left on the device (reading it syncs)."""
        scores = query @ positive.T
        best_in_batch = scores.max(1).values
        if negatives is not None and negatives.shape[1]:
            best_in_batch = torch.maximum(best_in_batch, torch.einsum("bd,bkd->bk", query, negatives).max(1).values)
        return (scores.diagonal() >= best_in_batch).float().mean()


def _plan(embedder: MocaEmbedder, docs: list[Encoded], token_budget: int,
          device) -> tuple[list[list[int]], torch.Tensor, int]:
    """Packed rows of document indices under the budget, each document's place among the rows'
    outputs in row order, and how many weightless padding rows this rank adds so that every rank
    runs as many forwards (on a sharded model, ``uniform_collectives``; else 0)."""
    rows = pack([d.ids.numel() for d in docs], token_budget)
    order = torch.tensor([i for row in rows for i in row])
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    padding = 0
    if getattr(embedder.model, "uniform_collectives", False) and dist.is_available() and dist.is_initialized():
        most = torch.tensor([len(rows)], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        padding = int(most.item()) - len(rows)
    return rows, where, padding


def _embed_row(embedder: MocaEmbedder, docs: list[Encoded], image_token_id: int, device, autocast) -> torch.Tensor:
    batch = pack_documents(docs, image_token_id)
    batch = {key: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    with autocast or contextlib.nullcontext():
        return embedder(batch)


def _padding_row(embedder: MocaEmbedder, device, autocast) -> torch.Tensor:
    """A forward on a one-token document whose result weighs zero (keeps ranks' collectives in step)."""
    doc = Encoded(torch.tensor([embedder.model.config.eos_token_id or 0]), torch.zeros(0, ROW),
                  torch.zeros(0, 3, dtype=torch.long), "padding")
    return 0.0 * _embed_row(embedder, [doc], embedder.model.config.image_token_id, device, autocast).sum()


def embed_documents(embedder: MocaEmbedder, docs: list[Encoded], image_token_id: int, token_budget: int, device,
                    autocast=None, plan=None) -> torch.Tensor:
    """Embeddings (len(docs), H) of documents packed into rows under the token budget, in the
    documents' order (differentiable when grad is enabled); ``plan``: ``_plan``'s result, if made."""
    rows, where, padding = plan or _plan(embedder, docs, token_budget, device)
    out = torch.cat([_embed_row(embedder, [docs[i] for i in row], image_token_id, device, autocast) for row in rows])
    for _ in range(padding):
        out = out + _padding_row(embedder, device, autocast)
    return out[where.to(out.device)]


def contrastive_step(embedder: MocaEmbedder, queries: list[Encoded], positives: list[Encoded],
                     negatives: list[list[Encoded]], image_token_id: int, token_budget: int, device,
                     grad_cache: bool = False, autocast=None) -> dict:
    """Forward and backward of one contrastive batch on this rank (``negatives``: K per query, K
    may be 0); returns ``loss``, ``accuracy`` and ``temperature`` as detached 0-dim tensors, left
    on the device so that the caller reads them together (one host sync). The caller zeroes
    gradients before, checks that the loss is finite and steps the optimizer after."""
    b, k = len(queries), len(negatives[0]) if negatives else 0
    docs = queries + positives + [n for per_query in negatives for n in per_query]

    def split(emb: torch.Tensor):
        return emb[:b], emb[b:2 * b], emb[2 * b:].reshape(b, k, -1) if k else None

    if not grad_cache:
        with nvtx("forward"):
            q, p, n = split(embed_documents(embedder, docs, image_token_id, token_budget, device, autocast))
            loss = embedder.loss(q, p, n)
        with nvtx("backward"):
            loss.backward()
    else:
        plan = _plan(embedder, docs, token_budget, device)  # the same rows for both passes
        with nvtx("forward"), torch.no_grad():
            cached = embed_documents(embedder, docs, image_token_id, token_budget, device, autocast, plan)
        cached.requires_grad_(True)
        q, p, n = split(cached)
        with nvtx("forward"):
            loss = embedder.loss(q, p, n)
        with nvtx("backward"):  # the second pass's forwards count here: they run for the backward
            loss.backward()  # the gradient of every embedding (and of the temperature)
            rows, _, padding = plan
            for row in rows:  # again with a graph, one packed row at a time
                _embed_row(embedder, [docs[i] for i in row], image_token_id, device, autocast).backward(
                    cached.grad[row])
            for _ in range(padding):
                _padding_row(embedder, device, autocast).backward()
    accuracy = embedder.accuracy(q.detach(), p.detach(), None if n is None else n.detach())
    return dict(loss=loss.detach(), accuracy=accuracy, temperature=embedder.temperature().detach())


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite (raised before any gradient is applied)."""
