"""Batches in training order: records read and encoded when their batch comes (kept in memory
while they fit), stage-1 micro-batches packed and corrupted, stage-2 contrastive batches, made in
the training process (with a background thread that prepares them ahead of the model) or in
``data.workers`` worker processes per rank.

Every batch is a pure function of its ticket, (epoch, position) and, for stage-1 masks, (step,
micro-batch): every random choice comes from generators seeded by those numbers. So a worker
makes any batch alone, and a resumed run reads exactly what the run that never stopped read, with
or without workers. Under several ranks each rank takes its own share of each round.

Workers are torch's ``DataLoader`` over a map-style dataset whose item is a whole batch and whose
sampler yields the tickets in training order (``in_workers``): it brings worker processes,
bounded prefetch, pinned memory and the detection of a worker that died, with nothing to
install. The warnings a worker raises (a record skipped, a batch passed over) travel with its
batch and are said by the training process, numbered as a run without workers numbers them.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model.flops import cpt_step_flops
from ..profiling import nvtx
from .cpt import Encoded, collate, encode
from .packing import pack
from .pairs import chosen_negatives, contrastive_batches, load_pair
from .records import load_cpt

log = logging.getLogger(__name__)

# Seconds the training process waits for one batch from its workers before it stops naming them:
# far past any batch an honest worker makes (a stage-1 micro-batch of the paper's size takes
# seconds), short of a run that waits on a wedged read for ever.
WORKER_WAIT_S = 600


class Warnings:
    """What loading batches reports, said once each by the process that logs: a record that
    could not be read (once per record), and a batch passed over (numbered across the run). In
    a worker (``recording`` a list) the reports are kept as events instead, which the training
    process replays (``replay``) as each batch arrives."""

    def __init__(self, what: str):
        self.what = what
        self.warned: set[int] = set()
        self.passed_over = 0
        self.recording: list[tuple] | None = None

    def skipped(self, index: int, reason: str) -> None:
        """Record ``index`` could not be read, for ``reason`` (its file and line first)."""
        if self.recording is not None:
            self.recording.append(("skipped", index, reason))
        elif index not in self.warned:
            self.warned.add(index)
            log.info(f"{reason}; {self.what} skipped")

    def passed(self, batch: str, j: int, epoch: int, count: int, first: str) -> None:
        """Batch ``j`` of ``epoch`` (of ``count`` records, none readable) was passed over."""
        if self.recording is not None:
            self.recording.append(("passed", batch, j, epoch, count, first))
            return
        self.passed_over += 1
        log.info(f"{batch} {j} of epoch {epoch} passed over ({self.passed_over} so far): none of its {count} "
                 f"{self.what}s could be read (first: {first})")

    def take(self) -> list[tuple]:
        """The events recorded since the last call (recording from now on)."""
        events, self.recording = self.recording or [], []
        return events

    def replay(self, events: list[tuple]) -> None:
        """Say what a worker recorded, as if it had happened here."""
        for kind, *args in events:
            (self.skipped if kind == "skipped" else self.passed)(*args)


class Cache:
    """Encoded items by index: made by ``load(i)`` on first use and kept while they fit in
    ``room`` bytes (a small corpus is encoded once; a large one streams). An item that fails to
    load (a corrupt image whose header was fine) is skipped with a warning, once, or stops the run
    under ``strict``."""

    def __init__(self, load, size, what: str, room: int, strict: bool):
        self.load, self.size, self.what, self.room, self.strict = load, size, what, room, strict
        self.warnings = Warnings(what)
        self.kept: dict[int, object] = {}
        self.failed: dict[int, str] = {}  # why each was left out (its file and line first)

    @property
    def passed_over(self) -> int:
        """Batches of which no item could be read, so far."""
        return self.warnings.passed_over

    def get(self, indices: Sequence[int]) -> list:
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
                self.warnings.skipped(i, str(exc))
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
            self.warnings.passed(what, j, epoch, len(indices), self.failed[indices[0]])
        raise ValueError(f"no {self.what} of epoch {epoch} could be read (see the warnings above)")


def image_decoder(name: str):
    """None for Pillow (decoded while reading), else a DALI decoder on ``cpu`` or ``gpu``."""
    if name == "pil":
        return None
    from .dali import DaliImages
    return DaliImages(name.split("-", 1)[1])


def _encoded_bytes(doc) -> int:
    return doc.rows.numel() * 4 + doc.ids.numel() * 8


def documents(entries, config, tokenizer) -> Cache:
    """The stage-1 documents of ``entries`` (``len`` and ``[i]`` with ``Entry``'s fields), encoded
    on demand."""
    d, decoder = config.data, image_decoder(config.data.image_decoder)

    def load(i):
        e = entries[i]
        return encode(load_cpt(e.file, e.offset, e.where, decode=decoder is None), tokenizer, d.max_doc_tokens,
                      d.min_pixels, d.max_pixels, decoder)
    return Cache(load, _encoded_bytes, "document", d.cache_bytes, config.run.strict)


def pairs(entries, config, tokenizer) -> Cache:
    """The stage-2 pairs of ``entries`` (``PairEntry``'s fields) as (query, positive, [hard
    negatives]), encoded on demand."""
    d, k, decoder = config.data, config.cl.hard_negatives, image_decoder(config.data.image_decoder)

    def side(doc):
        return encode(doc, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels, decoder)

    def load(i):
        e = entries[i]
        pair = load_pair(e.file, e.offset, e.where, k, decode=decoder is None, image_root=d.image_root)
        try:
            negatives = [side(pair.negatives[j]) for j in chosen_negatives(len(pair.negatives), k)]
            return side(pair.query), side(pair.positive), negatives
        except ValueError as exc:
            raise ValueError(f"{e.where}: {exc}") from None
    return Cache(load, lambda item: sum(_encoded_bytes(doc) for doc in item[:2] + tuple(item[2])), "pair",
                 d.cache_bytes, config.run.strict)


class Batches:
    """An epoch's batches of record indices as two NumPy arrays, every index batch after batch
    (``flat``, int64) and where each batch starts (``starts``, one more than the batches): 8 bytes
    an index, where lists of Python ints take about 36, in every process that holds the epoch."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray):
        self.flat, self.starts = flat, starts

    @classmethod
    def of(cls, batches: Sequence[Sequence[int]], order: np.ndarray | None = None) -> Batches:
        """``batches`` of positions in ``order`` (default: the indices themselves)."""
        sizes = np.fromiter(map(len, batches), np.int64, len(batches))
        flat = np.fromiter(itertools.chain.from_iterable(batches), np.int64, int(sizes.sum()))
        if order is not None:
            flat = order[flat]
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, j: int) -> list[int]:
        if not 0 <= j < len(self):
            raise IndexError(f"batch {j} of {len(self)}")
        return self.flat[self.starts[j]:self.starts[j + 1]].tolist()


def costs_of(entries) -> np.ndarray:
    """Each entry's cost in tokens: the index's ``costs`` array where it has one."""
    costs = getattr(entries, "costs", None)
    if costs is not None:
        return np.asarray(costs, dtype=np.int64)
    return np.fromiter((entries[i].cost for i in range(len(entries))), np.int64, len(entries))


def micro_batches(entries, token_budget: int, seed: int, epoch: int, costs: np.ndarray | None = None) -> Batches:
    """The epoch's micro-batches (document indices): documents shuffled by (seed, epoch), then
    packed under the token budget. ``costs``: ``costs_of(entries)``, when the caller has it."""
    shuffled = list(range(len(entries)))
    random.Random(seed * 1_000_003 + epoch).shuffle(shuffled)
    order = np.fromiter(shuffled, np.int64, len(shuffled))
    del shuffled  # a Python int a document: the largest thing made here
    costs = costs_of(entries) if costs is None else costs
    return Batches.of(pack(costs[order].tolist(), token_budget), order)


class Epochs:
    """The batches of one epoch at a time: ``make(epoch)`` when an epoch is first asked for, kept
    until another is (an epoch's batches are a pure function of it; a stream moves forward)."""

    def __init__(self, make: Callable[[int], Sequence]):
        self.make, self.epoch, self.batches = make, None, None

    def __call__(self, epoch: int) -> Sequence:
        if epoch != self.epoch:
            self.batches, self.epoch = None, None  # the old epoch freed before the new one is made
            self.batches, self.epoch = self.make(epoch), epoch
        return self.batches


@dataclass(frozen=True)
class Ticket:
    """One batch of a rank's stream: what makes it, alone. ``first``: the batch of the epoch this
    rank reads, of ``count``; ``indices``: this rank's records of it (so that a worker plans the
    epoch only where that batch cannot be read and it must look further); ``after``: the data
    position after it, saved with a checkpoint; ``step`` and ``micro`` seed stage-1 masks."""
    epoch: int
    first: int
    after: int
    count: int
    indices: tuple[int, ...]
    step: int = 0
    micro: int = 0

    def batch(self, epochs: Epochs, indices: Callable[[Sequence, int], list[int]]) -> Callable[[int], list[int]]:
        """``Cache.first_readable``'s ``batch``: this ticket's records for its own batch, else
        ``indices(plan, j)`` of the epoch's plan."""
        return lambda j: list(self.indices) if j == self.first else indices(epochs(self.epoch), j)


def micro_batch_tickets(epochs: Epochs, grad_accum: int, step: int, epoch: int, position: int, rank: int,
                        size: int) -> Iterator[Ticket]:
    """This rank's stage-1 tickets from (step, epoch, position) on: each round takes the next
    ``size`` micro-batches of the epoch, this rank's being ``position + rank``; an epoch's
    remainder that cannot serve every rank is left out."""
    plan = epochs(epoch)
    while True:
        for micro in range(grad_accum):
            if position + size > len(plan):
                epoch, position = epoch + 1, 0
                plan = epochs(epoch)
                if size > len(plan):
                    raise ValueError(f"{len(plan)} micro-batches per epoch cannot serve {size} ranks")
            position += size
            first = position - size + rank
            yield Ticket(epoch, first, position, len(plan), tuple(plan[first]), step, micro)
        step += 1


def pair_batch_tickets(epochs: Epochs, pairs_count: int, per_rank: int, epoch: int, position: int, rank: int,
                       size: int) -> Iterator[Ticket]:
    """The stage-2 tickets from (epoch, position) on: one global batch each, this rank's slice."""
    plan = epochs(epoch)
    while True:
        if position >= len(plan):
            epoch, position = epoch + 1, 0
            plan = epochs(epoch)
            if not plan:
                raise ValueError(f"{pairs_count} pairs cannot fill one global batch of {per_rank * size}")
        position += 1
        yield Ticket(epoch, position - 1, position, len(plan), tuple(pair_slice(plan, position - 1, rank, per_rank)))


def pair_slice(plan: Sequence[Sequence[int]], j: int, rank: int, per_rank: int) -> list[int]:
    """Rank ``rank``'s pairs of global batch ``j``."""
    return list(plan[j][rank * per_rank:(rank + 1) * per_rank])


class MicroBatches:
    """Stage-1 micro-batches by ticket (a map-style dataset: item = a whole micro-batch): (batch,
    its model FLOPs, epoch, position after it). One of which no document can be read is passed
    over (``Cache.first_readable``). Masks come from a generator seeded by (seed, step,
    micro-batch of the step across ranks). An objective that is off corrupts nothing: without MLM
    the text is whole, without MAE the pictures (a corruption that no loss asks to undo would only
    hide what the other objective reads). The next-token objective corrupts nothing and labels
    every text token's predecessor."""

    def __init__(self, entries, docs: Cache, tokenizer, model_config, config, rank: int, size: int):
        c = config.cpt
        self.cache, self.tokenizer, self.model_config, self.cpt = docs, tokenizer, model_config, c
        self.seed, self.rank, self.size = config.run.seed, rank, size
        self.mlm_ratio = c.mlm_ratio if c.trains_mlm else 0.0
        self.mae_ratio = c.mae_ratio if c.trains_mae else 0.0
        costs, budget = costs_of(entries), config.data.token_budget
        self.epochs = Epochs(lambda e: micro_batches(entries, budget, self.seed, e, costs))

    def __getitem__(self, t: Ticket) -> tuple[dict, float, int, int]:
        c = self.cpt
        with nvtx("load"):
            chosen = self.cache.first_readable(t.batch(self.epochs, lambda plan, j: plan[j]), t.count, t.first,
                                               "micro-batch", t.epoch)
        generator = torch.Generator().manual_seed(hash((self.seed, t.step, t.micro * self.size + self.rank)) % 2**63)
        with nvtx("collate"):
            batch = collate(chosen, self.tokenizer.specials, self.mlm_ratio, self.mae_ratio, generator,
                            c.mae_sampling, c.next_token)
        flops = cpt_step_flops(self.model_config, batch["lengths"], batch["image_grid_thw"].tolist(),
                               int((batch["labels"] != -100).sum()), batch["mae_positions"].numel(), c.trains_mae)
        return batch, flops, t.epoch, t.after

    def send(self, item):
        """``item`` as a worker hands it over (a micro-batch is a dozen tensors already)."""
        return item

    def receive(self, sent):
        return sent


class PairBatches:
    """Stage-2 contrastive batches by ticket: (this rank's encoded pairs, epoch, position after the
    batch). A global batch holds ``pairs_per_batch`` pairs per rank; rank r takes the r-th slice
    (passed over where no pair of it can be read, as micro-batches are)."""

    def __init__(self, entries, cache: Cache, config, rank: int, size: int):
        self.cache, self.per_rank, self.rank, self.size = cache, config.cl.pairs_per_batch, rank, size
        tasks = getattr(entries, "tasks", None) or [entries[i].task for i in range(len(entries))]  # the index's own
        mixed, seed = config.cl.task_batching == "mixed", config.run.seed
        self.epochs = Epochs(lambda e: contrastive_batches(tasks, self.per_rank * size, seed, e, mixed))

    def __getitem__(self, t: Ticket) -> tuple[list, int, int]:
        batch = t.batch(self.epochs, lambda plan, j: pair_slice(plan, j, self.rank, self.per_rank))
        with nvtx("load"):
            chosen = self.cache.first_readable(batch, t.count, t.first, "batch", t.epoch)
        return chosen, t.epoch, t.after

    def send(self, item):
        """``item`` with its pairs' documents in four tensors (``bundle``): each tensor a worker
        hands over holds a file descriptor open until it is freed, and a batch has hundreds."""
        chosen, epoch, after = item
        return bundle([doc for q, p, negatives in chosen for doc in (q, p, *negatives)]), len(chosen), epoch, after

    def receive(self, sent):
        docs, count, epoch, after = sent
        docs = unbundle(*docs)
        per = len(docs) // count if count else 0
        return [(docs[s], docs[s + 1], docs[s + 2:s + per]) for s in range(0, len(docs), per)], epoch, after


def bundle(docs: list[Encoded]) -> tuple:
    """Encoded documents as (ids (sum L,), rows (sum R, 1176), grids (sum G, 3), sizes (n, 3) of
    (L, R, G), wheres): ``unbundle`` splits them again (views, no copy)."""
    sizes = torch.tensor([[d.ids.numel(), d.rows.shape[0], d.grids.shape[0]] for d in docs],
                         dtype=torch.long).reshape(-1, 3)
    return (torch.cat([d.ids for d in docs]), torch.cat([d.rows for d in docs]), torch.cat([d.grids for d in docs]),
            sizes, [d.where for d in docs])


def unbundle(ids: torch.Tensor, rows: torch.Tensor, grids: torch.Tensor, sizes: torch.Tensor,
             wheres: list[str]) -> list[Encoded]:
    """The documents ``bundle`` joined."""
    parts = [x.split(n.tolist()) for x, n in zip((ids, rows, grids), sizes.T)]
    return [Encoded(i, r, g, w) for i, r, g, w in zip(*parts, wheres)]


def micro_batch_stream(entries, docs: Cache, tokenizer, model_config, config, step: int, epoch: int, position: int,
                       rank: int, size: int, pin: bool = False):
    """This rank's micro-batches from (step, epoch, position) on, made in this process:
    ``MicroBatches``' items in ``micro_batch_tickets``' order; ``pin``: in page-locked memory, so
    that the copy to the GPU does not wait on the host."""
    dataset = MicroBatches(entries, docs, tokenizer, model_config, config, rank, size)
    for ticket in micro_batch_tickets(dataset.epochs, config.cpt.grad_accum, step, epoch, position, rank, size):
        batch, flops, epoch, after = dataset[ticket]
        if pin:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield batch, flops, epoch, after


def pair_batch_stream(entries, cache: Cache, config, epoch: int, position: int, rank: int, size: int):
    """This rank's share of the contrastive batches from (epoch, position) on, made in this
    process: (encoded pairs, epoch, position after the batch)."""
    dataset = PairBatches(entries, cache, config, rank, size)
    for ticket in pair_batch_tickets(dataset.epochs, len(entries), config.cl.pairs_per_batch, epoch, position, rank,
                                     size):
        yield dataset[ticket]


@dataclass
class Failed:
    """A worker's error (a bad record under ``strict``, an epoch of which nothing can be read):
    raised by the training process as it was raised in the worker."""
    error: Exception


class _InWorker(torch.utils.data.Dataset):
    """``dataset``'s items as a worker makes them: with the warnings raised while making each, and
    a user's error (ValueError, OSError) as a value, so that it reaches the training process as
    it was raised rather than wrapped in a traceback of the worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, ticket: Ticket):
        warnings = self.dataset.cache.warnings
        warnings.take()  # recording from the first item on
        try:
            item = self.dataset.send(self.dataset[ticket])
        except (ValueError, OSError) as exc:
            item = Failed(exc)
        return item, warnings.take()


def _as_made(item):
    return item


def in_workers(dataset, tickets: Iterator[Ticket], workers: int, ahead: int, pin: bool):
    """``dataset[ticket]`` for each ticket in order, made by ``workers`` processes (forked when
    this is called, so they start from this process's memory), each holding at most ``ahead``
    batches ready; ``pin``: handed over in page-locked memory. Warnings are said here as each
    batch arrives; a worker's error is raised here; a worker that dies (killed, out of memory)
    stops the run with torch's error naming its process and the signal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a fast tokenizer's threads do not survive a fork
    batches = torch.utils.data.DataLoader(_InWorker(dataset), batch_size=None, sampler=tickets, num_workers=workers,
                                          collate_fn=_as_made, pin_memory=pin, prefetch_factor=ahead,
                                          timeout=WORKER_WAIT_S, multiprocessing_context="fork")
    made = iter(batches)  # the workers start now, not at the first batch
    return _received(dataset, made)


def _received(dataset, made):
    try:
        for item, events in made:
            dataset.cache.warnings.replay(events)
            if isinstance(item, Failed):
                raise item.error
            yield dataset.receive(item)
    finally:
        del made  # the workers stop (their iterator's end), even while a traceback holds this frame


class Loader:
    """A stage's batches in order, with ``per_epoch`` batches in an epoch. Made in this process
    (``workers`` 0, with the background thread of ``ahead`` batches when it is positive) or by
    ``workers`` processes each holding up to ``ahead`` (at least 1) ready."""

    def __init__(self, dataset, tickets: Iterator[Ticket], first_epoch: int, workers: int, ahead: int, pin: bool):
        self.per_epoch = len(dataset.epochs(first_epoch))
        if workers > 0:
            dataset.cache.room //= workers  # each worker keeps its own share of cache_bytes
            self.stream = in_workers(dataset, tickets, workers, max(1, ahead), pin)
        else:
            self.stream = background((dataset[t] for t in tickets), ahead, pin)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.stream)

    def close(self) -> None:
        """Stop making batches (the thread, or the workers)."""
        self.stream.close()


def micro_batch_loader(entries, config, tokenizer, model_config, step: int, epoch: int, position: int, rank: int,
                       size: int, device: torch.device) -> Loader:
    """The stage-1 loader of a rank: ``MicroBatches`` from (step, epoch, position) on, with the
    run's ``data.workers`` and ``data.prefetch`` on ``device``."""
    dataset = MicroBatches(entries, documents(entries, config, tokenizer), tokenizer, model_config, config,
                           rank, size)
    tickets = micro_batch_tickets(dataset.epochs, config.cpt.grad_accum, step, epoch, position, rank, size)
    return Loader(dataset, tickets, epoch, worker_count(config.data, device), depth(config.data.prefetch, device),
                  device.type == "cuda")


def pair_batch_loader(entries, config, tokenizer, epoch: int, position: int, rank: int, size: int,
                      device: torch.device) -> Loader:
    """The stage-2 loader of a rank: ``PairBatches`` from (epoch, position) on."""
    dataset = PairBatches(entries, pairs(entries, config, tokenizer), config, rank, size)
    tickets = pair_batch_tickets(dataset.epochs, len(entries), config.cl.pairs_per_batch, epoch, position, rank, size)
    return Loader(dataset, tickets, epoch, worker_count(config.data, device), depth(config.data.prefetch, device),
                  device.type == "cuda")


def _pinned(item):
    """``item`` (a batch, or a tuple holding one) with its tensors in page-locked memory."""
    if isinstance(item, torch.Tensor):
        return item.pin_memory()
    if isinstance(item, dict):
        return {k: _pinned(v) for k, v in item.items()}
    if isinstance(item, tuple | list):
        return type(item)(_pinned(v) for v in item)
    return item


def background(items, depth: int, pin: bool = False):
    """``items`` produced ``depth`` ahead in a background thread (reading, decoding and collating
    overlap the model's step); an exception there is raised here, in order. ``depth`` 0: inline.
    ``pin``: tensors handed over in page-locked memory."""
    if pin:
        items = (_pinned(item) for item in items)
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
    """How far the loader runs ahead: ``prefetch``, or with -1, 2 on a GPU and 0 on CPU, where a
    thread would take cores from the model (1.7x slower measured on a 2-core machine)."""
    if prefetch >= 0:
        return prefetch
    return 2 if device.type == "cuda" else 0


def worker_count(data, device: torch.device, cpus: int | None = None, ranks: int | None = None) -> int:
    """Worker processes of a rank: ``data.workers``, or with -1, on a GPU with Pillow decoding,
    the rank's share of the host's ``cpus`` (default: the cores this process may run on) less one
    for the rank itself, ``ranks`` being the ranks on this host (default: torchrun's
    LOCAL_WORLD_SIZE, else 1); 0 on CPU, where the model's threads use every core, and with DALI,
    which decodes in threads of its own."""
    if data.workers >= 0:
        return data.workers
    if device.type != "cuda" or data.image_decoder != "pil":
        return 0
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ranks is None else ranks
    return max(1, cpus // max(1, ranks) - 1)
