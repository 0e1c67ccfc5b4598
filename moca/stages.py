"""The two stages' data and steps, under the one loop of ``moca.train``.

``CptStage`` (stage 1): the corpus indexed once by cost (image headers only), documents read,
decoded and encoded when their micro-batch comes, packed micro-batches corrupted for MLM and MAE,
``grad_accum`` of them per step. ``ClStage`` (stage 2): pairs indexed the same way, global batches
of pairs (mixed tasks, or one task each), each step one contrastive batch
(``moca.model.embed.contrastive_step``). Both produce their inputs in order from (step, epoch,
position) on, with masks and choices seeded by those numbers, so that a resumed run is the run
that never stopped.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .data import embedded
from .data.cpt import collate, encode, layout
from .data.packing import pack
from .data.pairs import chosen_negatives, contrastive_batches, load_pair, read_pairs
from .data.records import BadRecords, DataError, load_cpt, read_cpt
from .model.embed import MocaEmbedder, check_finite, contrastive_step
from .model.flops import cpt_step_flops
from .model.heads import MocaCPT

if TYPE_CHECKING:
    from .train import TrainConfig


class _Nvtx:
    """NVTX ranges for Nsight Systems; no-ops without CUDA."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_pop()


def _data_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise ValueError(f"--data {path}: no .jsonl files in the folder")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file or folder")
    return [path]


def _embedded(write, folder: str, name: str, seed: int) -> str:
    """The embedded dataset's file: rank 0 writes it (unless a run already did: the same seed
    gives the same files) while the other ranks wait."""
    rank, size = world()
    if rank == 0 and not os.path.isfile(os.path.join(folder, name)):
        write(folder, seed=seed)
    if size > 1:
        import torch.distributed as dist
        dist.barrier()
    return os.path.join(folder, name)


@dataclass(frozen=True)
class Entry:
    """A document of the corpus: where its line is, and its cost in tokens."""
    file: str
    offset: int
    where: str
    cost: int


def _cached_index(file: str, settings: list, scan, config: TrainConfig, bad: BadRecords) -> list[list]:
    """One file's index rows (``[offset, line, value]``): from the index cache when the file and
    ``settings`` are those it was made with, else from ``scan(file, bad)`` (which counts bad
    records in ``bad``), then cached under ``index_cache`` (default: the run directory)."""
    stat = os.stat(file)
    key = hashlib.sha1(json.dumps([os.path.abspath(file), stat.st_size, stat.st_mtime_ns, *settings]).encode()).hexdigest()
    cached = os.path.join(config.index_cache or os.path.join(config.out, "index"), f"{key}.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            saved = json.load(f)
        if config.strict and saved["examples"]:
            raise DataError(saved["examples"][0])
        for kind, count in saved["bad"].items():
            bad.counts[kind] += count
        bad.examples.extend(saved["examples"][: 10 - len(bad.examples)])
        return saved["entries"]
    before, examples = dict(bad.counts), len(bad.examples)
    rows = scan(file, bad)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(f"{cached}.{os.getpid()}.tmp", "w") as f:  # ranks may write the same index at once
        json.dump(dict(entries=rows, bad={k: v - before.get(k, 0) for k, v in bad.counts.items() if v - before.get(k, 0)},
                       examples=bad.examples[examples:]), f)
    os.replace(f"{cached}.{os.getpid()}.tmp", cached)
    return rows


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def _index_file(file: str, config: TrainConfig, tokenizer, bad: BadRecords) -> list[Entry]:
    """One file's documents and their costs (cached; a scan reads only image headers)."""
    def scan(path, bad):
        rows = []
        for doc in read_cpt(path, bad, strict=config.strict, decode=False):
            ids, _ = layout(doc, tokenizer, config.max_doc_tokens, config.min_pixels, config.max_pixels)
            if ids:
                rows.append([doc.offset, _line(doc.where), len(ids)])
        return rows
    settings = [tokenizer.fingerprint, config.max_doc_tokens, config.min_pixels, config.max_pixels]
    return [Entry(file, offset, f"{file}:{line}", cost)
            for offset, line, cost in _cached_index(file, settings, scan, config, bad)]


def index_documents(config: TrainConfig, tokenizer, log=print) -> list[Entry]:
    """Every usable document of the run's data (the embedded dataset when none is given) with its
    cost: only this index stays in memory, documents are read again when their micro-batch comes.
    Each file is scanned once (image headers only) and its index cached under ``index_cache``
    (default: the run directory), so a resumed run, or one sharing the cache, does not scan it again."""
    path = config.data or _embedded(embedded.write, os.path.join(config.out, "data"), "cpt.jsonl", config.seed)
    bad = BadRecords()
    entries = [e for file in _data_files(path) for e in _index_file(file, config, tokenizer, bad)]
    bad.report(log)
    if not entries:
        raise ValueError(f"no usable documents in {path}")
    return entries


def micro_batches(entries: list[Entry], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches (document indices): documents shuffled by (seed, epoch), then
    packed under the token budget."""
    order = list(range(len(entries)))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    batches = pack([entries[i].cost for i in order], config.token_budget)
    return [[order[i] for i in b] for b in batches]


class _Cache:
    """Encoded items by index: made by ``load(i)`` on first use and kept while they fit in
    ``cache_bytes`` (a small corpus is encoded once; a large one streams). An item that fails to
    load (a corrupt image whose header was fine) is skipped with a warning, once, or stops the run
    under strict."""

    def __init__(self, load, size, what: str, config: TrainConfig, log):
        self.load, self.size, self.what, self.config, self.log = load, size, what, config, log
        self.kept: dict[int, object] = {}
        self.failed: set[int] = set()  # warned about once, then left out
        self.room = config.cache_bytes

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
                if self.config.strict:
                    raise
                self.log(f"{exc}; {self.what} skipped")
                self.failed.add(i)
                continue
            if self.size(item) <= self.room:
                self.kept[i], self.room = item, self.room - self.size(item)
            out.append(item)
        return out


def _image_decoder(config: TrainConfig):
    if config.image_decoder == "pil":
        return None
    from .data.dali import DaliImages
    return DaliImages(config.image_decoder.split("-", 1)[1])


def _encoded_bytes(doc) -> int:
    return doc.rows.numel() * 4 + doc.ids.numel() * 8


def _documents(entries: list[Entry], config: TrainConfig, tokenizer, log) -> _Cache:
    decoder = _image_decoder(config)

    def load(i):
        e = entries[i]
        return encode(load_cpt(e.file, e.offset, e.where, decode=decoder is None), tokenizer, config.max_doc_tokens,
                      config.min_pixels, config.max_pixels, decoder)
    return _Cache(load, _encoded_bytes, "document", config, log)


def world() -> tuple[int, int]:
    """(rank, world size) of this process (0, 1 without torch.distributed)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _micro_batch_stream(entries, documents: _Cache, tokenizer, model_config, config: TrainConfig, step: int, epoch: int,
                        position: int, pin: bool = False):
    """This rank's micro-batches in training order from (step, epoch, position) on: (batch, its
    model FLOPs, epoch, position after it). Each round of micro-batches takes the next ``world
    size`` of the epoch, this rank's being ``position + rank`` (an epoch's remainder that cannot
    serve every rank is left out). Masks come from a generator seeded by (seed, step, micro-batch
    of the step across ranks), so the sequence does not depend on where a run was resumed."""
    rank, size = world()
    batches = micro_batches(entries, config, epoch)
    while True:
        for micro in range(config.grad_accum):
            if position + size > len(batches):
                epoch, position = epoch + 1, 0
                batches = micro_batches(entries, config, epoch)
                if size > len(batches):
                    raise ValueError(f"{len(batches)} micro-batches per epoch cannot serve {size} ranks")
            with _Nvtx("load"):
                chosen = documents.get(batches[position + rank])
            position += size
            if not chosen:
                raise ValueError(f"no document of micro-batch {position - size + rank} of epoch {epoch} could be read "
                                 "(see the warnings above)")
            generator = torch.Generator().manual_seed(hash((config.seed, step, micro * size + rank)) % 2**63)
            with _Nvtx("collate"):
                batch = collate(chosen, tokenizer.specials, config.mlm_ratio, config.mae_ratio, generator)
            flops = cpt_step_flops(model_config, batch["lengths"], batch["image_grid_thw"].tolist(),
                                   int((batch["labels"] != -100).sum()) if config.use_mlm else 0,
                                   batch["mae_positions"].numel() if config.use_mae else 0, config.use_mae)
            if pin:  # page-locked, so that the copy to the GPU does not wait on the host
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch, flops, epoch, position
        step += 1


def _background(items, depth: int):
    """``items`` produced ``depth`` ahead in a background thread (reading, decoding and collating
    overlap the model's step); an exception there is raised here, in order. ``depth`` 0: inline."""
    if depth <= 0:
        yield from items
        return
    import queue
    import threading
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


def _depth(config: TrainConfig, device) -> int:
    """How far the loader thread runs ahead: ``prefetch``, or with -1, 2 on a GPU and 0 on CPU,
    where it would take cores from the model (1.7x slower measured on the 2-core CI machine)."""
    if config.prefetch >= 0:
        return config.prefetch
    return 2 if device.type == "cuda" else 0


class CptStage:
    """Stage 1: ``grad_accum`` packed, corrupted micro-batches per step through ``MocaCPT``."""
    name = "cpt"

    def __init__(self, config: TrainConfig, model, tokenizer, device, log):
        self.config, self.tokenizer, self.device, self.log = config, tokenizer, device, log
        self.module = MocaCPT(model, config.mae_weight, config.use_mlm, config.use_mae).to(device)
        self.replicated = None  # DistributedDataParallel around module, once data_parallel() is called

    def data_parallel(self) -> None:
        """Under several processes without FSDP: gradients averaged by DDP during the backward of
        each step's last micro-batch (overlapping communication with computation); parameters a
        micro-batch does not use (the vision tower without images, the MAE decoder without masked
        image tokens) count as zero gradients."""
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.replicated = DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)

    def start(self, step: int, epoch: int, position: int) -> None:
        c = self.config
        entries = index_documents(c, self.tokenizer, self.log)
        self.log(f"{len(entries)} documents, {len(micro_batches(entries, c, epoch))} micro-batches of up to "
                 f"{c.token_budget} tokens per epoch")
        documents = _documents(entries, c, self.tokenizer, self.log)
        self.stream = _background(_micro_batch_stream(entries, documents, self.tokenizer, self.module.model.config, c,
                                                      step, epoch, position, pin=self.device.type == "cuda"),
                                  _depth(c, self.device))
        self.epoch, self.position = epoch, position

    def step(self, autocast, measure: bool = False) -> dict:
        """Forward and backward of one step: its losses, tokens and model FLOPs; with ``measure``
        also the MLM accuracy of its last micro-batch (for ``extras``)."""
        c, sums, tokens, flops = self.config, {"loss": 0.0, "mlm_loss": 0.0, "mae_loss": 0.0}, 0, 0.0
        for micro in range(c.grad_accum):
            batch, batch_flops, self.epoch, self.position = next(self.stream)
            flops += batch_flops
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            tokens += batch["input_ids"].numel()
            last = micro == c.grad_accum - 1
            run = self.replicated or self.module
            quiet = run.no_sync() if self.replicated is not None and not last else contextlib.nullcontext()
            with quiet:  # DDP communicates in the last micro-batch's backward only
                with _Nvtx("forward"), autocast:
                    out = run(batch, accuracy=measure and last)
                check_finite(out["loss"])
                with _Nvtx("backward"):
                    (out["loss"] / c.grad_accum).backward()
            for k in sums:
                sums[k] += out[k].item() / c.grad_accum
        self.last = dict(mlm_accuracy=out.get("mlm_accuracy"))
        return dict(metrics=sums, tokens=tokens, flops=flops)

    def extras(self) -> dict:
        """The MLM accuracy of the last measured step's last micro-batch."""
        return self.last

    def close(self) -> None:
        self.stream.close()  # stops the loader thread

    def summary(self) -> dict:
        return dict(mlm_chance=1 / self.tokenizer.vocab_size)


@dataclass(frozen=True)
class PairEntry:
    file: str
    offset: int
    where: str
    task: str


def index_pairs(config: TrainConfig, log=print) -> list[PairEntry]:
    """Every usable pair of the run's data (the embedded pairs when none is given) with its task;
    each file scanned once (the records and only the images' headers) and its index cached like
    the documents'."""
    path = config.data or _embedded(embedded.write_pairs, os.path.join(config.out, "data"), "pairs.jsonl", config.seed)
    bad = BadRecords()
    def scan(file, bad):
        return [[p.offset, _line(p.where), p.task]
                for p in read_pairs(file, config.hard_negatives, bad, strict=config.strict, decode=False)]
    entries = [PairEntry(file, offset, f"{file}:{line}", task) for file in _data_files(path)
               for offset, line, task in _cached_index(file, ["pairs", config.hard_negatives], scan, config, bad)]
    bad.report(log)
    need = config.pairs_per_batch * world()[1]
    if len(entries) < need:
        raise ValueError(f"{len(entries)} usable pairs in {path}: fewer than one global batch ({need} = "
                         "pairs_per_batch x ranks)")
    return entries


def _pairs(entries: list[PairEntry], config: TrainConfig, tokenizer, log) -> _Cache:
    decoder, c = _image_decoder(config), config

    def side(doc):
        return encode(doc, tokenizer, c.max_doc_tokens, c.min_pixels, c.max_pixels, decoder)

    def load(i):
        e = entries[i]
        pair = load_pair(e.file, e.offset, e.where, c.hard_negatives, decode=decoder is None)
        try:
            negatives = [side(pair.negatives[k]) for k in chosen_negatives(len(pair.negatives), c.hard_negatives)]
            return side(pair.query), side(pair.positive), negatives
        except ValueError as exc:
            raise ValueError(f"{e.where}: {exc}") from None
    return _Cache(load, lambda item: sum(_encoded_bytes(d) for d in item[:2] + tuple(item[2])), "pair", config, log)


def _pair_batch_stream(entries: list[PairEntry], pairs: _Cache, config: TrainConfig, epoch: int, position: int):
    """This rank's share of the contrastive batches in training order from (epoch, position) on:
    (encoded pairs, epoch, position after the batch). A global batch holds ``pairs_per_batch``
    pairs per rank; rank r takes the r-th slice."""
    mixed, (rank, size) = config.task_batching == "mixed", world()
    per_rank = config.pairs_per_batch

    def epoch_batches(e):
        return contrastive_batches([x.task for x in entries], per_rank * size, config.seed, e, mixed)
    batches = epoch_batches(epoch)
    while True:
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(epoch)
            if not batches:
                raise ValueError(f"{len(entries)} pairs cannot fill one global batch of {per_rank * size}")
        with _Nvtx("load"):
            chosen = pairs.get(batches[position][rank * per_rank:(rank + 1) * per_rank])
        position += 1
        if not chosen:
            raise ValueError(f"no pair of batch {position - 1} of epoch {epoch} could be read (see the warnings above)")
        yield chosen, epoch, position


class ClStage:
    """Stage 2: one contrastive batch per step through ``MocaEmbedder`` (``grad_cache`` optional)."""
    name = "cl"

    def __init__(self, config: TrainConfig, model, tokenizer, device, log):
        if config.task_batching not in ("mixed", "homogeneous"):
            raise ValueError(f"task_batching must be mixed or homogeneous, got {config.task_batching!r}")
        if config.hard_negatives < 0 or config.pairs_per_batch < 1:
            raise ValueError("hard_negatives must be >= 0 and pairs_per_batch >= 1")
        self.config, self.tokenizer, self.device, self.log = config, tokenizer, device, log
        self.module = MocaEmbedder(model, config.temperature, config.learn_temperature).to(device)

    def start(self, step: int, epoch: int, position: int) -> None:
        c = self.config
        entries = index_pairs(c, self.log)
        tasks = sorted({e.task for e in entries})
        self.log(f"{len(entries)} pairs of {len(tasks)} task(s) ({', '.join(tasks[:8])}), batches of "
                 f"{c.pairs_per_batch} pairs ({c.task_batching}), {c.hard_negatives} hard negatives each")
        self.stream = _background(_pair_batch_stream(entries, _pairs(entries, c, self.tokenizer, self.log), c, epoch,
                                                     position), _depth(c, self.device))
        self.epoch, self.position = epoch, position

    def step(self, autocast, measure: bool = False) -> dict:
        chosen, self.epoch, self.position = next(self.stream)
        queries, positives, negatives = (list(x) for x in zip(*chosen))
        with _Nvtx("contrastive step"):
            out = contrastive_step(self.module, queries, positives, negatives, self.tokenizer.specials.image,
                                   self.config.token_budget, self.device, self.config.grad_cache, autocast)
        tokens = sum(d.ids.numel() for d in queries + positives + [n for per in negatives for n in per])
        self.last = dict(accuracy=round(out["accuracy"], 4), temperature=round(out["temperature"], 6))
        return dict(metrics=dict(loss=out["loss"].item()), tokens=tokens, flops=None)

    def extras(self) -> dict:
        return self.last

    def close(self) -> None:
        self.stream.close()

    def summary(self) -> dict:
        return dict(accuracy_chance=1 / (self.config.pairs_per_batch + self.config.hard_negatives))


STAGES = {"cpt": CptStage, "cl": ClStage}
