"""Batches in training order: records read and encoded when their batch comes (kept in memory
while they fit), stage-1 micro-batches packed and corrupted, stage-2 contrastive batches, and a
background thread that prepares them ahead of the model.

Every stream starts from (step, epoch, position) and draws every random choice from generators
seeded by those numbers, so a resumed run reads exactly what the run that never stopped read.
Under several ranks each rank takes its own share of each round.
"""
from __future__ import annotations

import queue
import random
import threading

import torch

from ..model.flops import cpt_step_flops
from ..profiling import nvtx
from .cpt import collate, encode
from .index import Entry, PairEntry
from .packing import pack
from .pairs import chosen_negatives, contrastive_batches, load_pair
from .records import load_cpt


class Cache:
    """Encoded items by index: made by ``load(i)`` on first use and kept while they fit in
    ``room`` bytes (a small corpus is encoded once; a large one streams). An item that fails to
    load (a corrupt image whose header was fine) is skipped with a warning, once, or stops the run
    under ``strict``."""

    def __init__(self, load, size, what: str, room: int, strict: bool, log):
        self.load, self.size, self.what, self.room, self.strict, self.log = load, size, what, room, strict, log
        self.kept: dict[int, object] = {}
        self.failed: dict[int, str] = {}  # why each was left out (its file and line first), warned about once
        self.passed_over = 0  # batches of which no item could be read

    def get(self, indices: list[int]) -> list:
        out = []
        for i in indices:
            if i in self.failed:
                continue
            if i in self.kept:
                out.append(self.kept[i])
                continue
            try:
                item = self.load(i)
            except ValueError as exc:
                if self.strict:
                    raise
                self.log(f"{exc}; {self.what} skipped")
                self.failed[i] = str(exc)
                continue
            if self.size(item) <= self.room:
                self.kept[i], self.room = item, self.room - self.size(item)
            out.append(item)
        return out

    def first_readable(self, batch, count: int, first: int, what: str, epoch: int) -> list:
        """The items of batch ``first`` (``batch(j)``: the indices of batch j of the epoch's
        ``count``) that load; where none does, that batch is passed over (counted, with a warning
        naming a bad record's file and line) for the next one, cyclically through the epoch, that
        has an item that loads. The choice depends only on the batches and on which items fail,
        so a resumed run chooses as the run that never stopped did, on every rank (the batch used
        in its place is used in its own turn too). ValueError when no item of any batch loads."""
        for k in range(count):
            indices = batch(j := (first + k) % count)
            if chosen := self.get(indices):
                return chosen
            self.passed_over += 1
            self.log(f"{what} {j} of epoch {epoch} passed over ({self.passed_over} so far): none of its "
                     f"{len(indices)} {self.what}s could be read (first: {self.failed[indices[0]]})")
        raise ValueError(f"no {self.what} of epoch {epoch} could be read (see the warnings above)")


def image_decoder(name: str):
    """None for Pillow (decoded while reading), else a DALI decoder on ``cpu`` or ``gpu``."""
    if name == "pil":
        return None
    from .dali import DaliImages
    return DaliImages(name.split("-", 1)[1])


def _encoded_bytes(doc) -> int:
    return doc.rows.numel() * 4 + doc.ids.numel() * 8


def documents(entries: list[Entry], config, tokenizer, log) -> Cache:
    """The stage-1 documents of ``entries``, encoded on demand."""
    d, decoder = config.data, image_decoder(config.data.image_decoder)

    def load(i):
        e = entries[i]
        return encode(load_cpt(e.file, e.offset, e.where, decode=decoder is None), tokenizer, d.max_doc_tokens,
                      d.min_pixels, d.max_pixels, decoder)
    return Cache(load, _encoded_bytes, "document", d.cache_bytes, config.run.strict, log)


def pairs(entries: list[PairEntry], config, tokenizer, log) -> Cache:
    """The stage-2 pairs of ``entries`` as (query, positive, [hard negatives]), encoded on demand."""
    d, k, decoder = config.data, config.cl.hard_negatives, image_decoder(config.data.image_decoder)

    def side(doc):
        return encode(doc, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels, decoder)

    def load(i):
        e = entries[i]
        pair = load_pair(e.file, e.offset, e.where, k, decode=decoder is None)
        try:
            negatives = [side(pair.negatives[j]) for j in chosen_negatives(len(pair.negatives), k)]
            return side(pair.query), side(pair.positive), negatives
        except ValueError as exc:
            raise ValueError(f"{e.where}: {exc}") from None
    return Cache(load, lambda item: sum(_encoded_bytes(doc) for doc in item[:2] + tuple(item[2])), "pair",
                 d.cache_bytes, config.run.strict, log)


def micro_batches(entries: list[Entry], token_budget: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches (document indices): documents shuffled by (seed, epoch), then
    packed under the token budget."""
    order = list(range(len(entries)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches = pack([entries[i].cost for i in order], token_budget)
    return [[order[i] for i in b] for b in batches]


def micro_batch_stream(entries, docs: Cache, tokenizer, model_config, config, step: int, epoch: int, position: int,
                       rank: int, size: int, pin: bool = False):
    """This rank's micro-batches from (step, epoch, position) on: (batch, its model FLOPs, epoch,
    position after it). Each round takes the next ``size`` micro-batches of the epoch, this rank's
    being ``position + rank`` (an epoch's remainder that cannot serve every rank is left out; one
    of which no document can be read is passed over, ``Cache.first_readable``).
    Masks come from a generator seeded by (seed, step, micro-batch of the step across ranks). An
    objective that is off corrupts nothing: without MLM the text is whole, without MAE the
    pictures (a corruption that no loss asks to undo would only hide what the other objective
    reads). The next-token objective corrupts nothing and labels every text token's predecessor."""
    c, seed, budget = config.cpt, config.run.seed, config.data.token_budget
    mlm_ratio = c.mlm_ratio if c.trains_mlm else 0.0
    mae_ratio = c.mae_ratio if c.trains_mae else 0.0
    batches = micro_batches(entries, budget, seed, epoch)
    while True:
        for micro in range(c.grad_accum):
            if position + size > len(batches):
                epoch, position = epoch + 1, 0
                batches = micro_batches(entries, budget, seed, epoch)
                if size > len(batches):
                    raise ValueError(f"{len(batches)} micro-batches per epoch cannot serve {size} ranks")
            with nvtx("load"):
                chosen = docs.first_readable(batches.__getitem__, len(batches), position + rank, "micro-batch", epoch)
            position += size
            generator = torch.Generator().manual_seed(hash((seed, step, micro * size + rank)) % 2**63)
            with nvtx("collate"):
                batch = collate(chosen, tokenizer.specials, mlm_ratio, mae_ratio, generator, c.mae_sampling,
                                c.next_token)
            flops = cpt_step_flops(model_config, batch["lengths"], batch["image_grid_thw"].tolist(),
                                   int((batch["labels"] != -100).sum()), batch["mae_positions"].numel(), c.trains_mae)
            if pin:  # page-locked, so that the copy to the GPU does not wait on the host
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch, flops, epoch, position
        step += 1


def pair_batch_stream(entries: list[PairEntry], cache: Cache, config, epoch: int, position: int, rank: int,
                      size: int):
    """This rank's share of the contrastive batches from (epoch, position) on: (encoded pairs,
    epoch, position after the batch). A global batch holds ``pairs_per_batch`` pairs per rank;
    rank r takes the r-th slice (passed over where no pair of it can be read, as micro-batches are)."""
    per_rank, mixed = config.cl.pairs_per_batch, config.cl.task_batching == "mixed"

    def epoch_batches(e):
        return contrastive_batches([x.task for x in entries], per_rank * size, config.run.seed, e, mixed)
    batches = epoch_batches(epoch)
    while True:
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(epoch)
            if not batches:
                raise ValueError(f"{len(entries)} pairs cannot fill one global batch of {per_rank * size}")
        with nvtx("load"):
            chosen = cache.first_readable(lambda j, b=batches: b[j][rank * per_rank:(rank + 1) * per_rank],
                                          len(batches), position, "batch", epoch)
        position += 1
        yield chosen, epoch, position


def background(items, depth: int):
    """``items`` produced ``depth`` ahead in a background thread (reading, decoding and collating
    overlap the model's step); an exception there is raised here, in order. ``depth`` 0: inline."""
    if depth <= 0:
        yield from items
        return
    ready, stop = queue.Queue(maxsize=depth), threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((None, exc))

    thread = threading.Thread(target=produce, name="moca-loader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()


def depth(prefetch: int, device: torch.device) -> int:
    """How far the loader thread runs ahead: ``prefetch``, or with -1, 2 on a GPU and 0 on CPU,
    where it would take cores from the model (1.7x slower measured on a 2-core machine)."""
    if prefetch >= 0:
        return prefetch
    return 2 if device.type == "cuda" else 0
