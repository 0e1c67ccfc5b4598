"""The corpus index: every usable record of a run's data files with what batching needs (a
document's cost in tokens, a pair's task), where its line is, and nothing more. Only the index
stays in memory; records are read again when their batch comes (``moca.data.loader``).

Each file is scanned once (records and image headers, no pixels) and its index cached under
``index_cache`` (default: the run directory), keyed by the file's path, size and modification
time and the settings that change costs, so a resumed run, or one sharing the cache, does not
scan it again. Bad records are counted and reported, from the cache too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..files import data_files
from . import embedded
from .cpt import layout
from .pairs import read_pairs
from .records import BadRecords, DataError, read_cpt


@dataclass(frozen=True)
class Entry:
    """A document of the corpus: where its line is, and its cost in tokens."""
    file: str
    offset: int
    where: str
    cost: int


@dataclass(frozen=True)
class PairEntry:
    """A stage-2 pair: where its line is, and its task."""
    file: str
    offset: int
    where: str
    task: str


def embedded_file(write, folder: str, name: str, seed: int, main: bool, barrier) -> str:
    """The embedded dataset's file ``name``: the main process writes it (unless a run already did:
    the same seed gives the same files) while the others wait at ``barrier``."""
    if main and not os.path.isfile(os.path.join(folder, name)):
        write(folder, seed=seed)
    barrier()
    return os.path.join(folder, name)


def _cached(file: str, settings: list, scan, cache_dir: str, strict: bool, bad: BadRecords) -> list[list]:
    """One file's index rows (``[offset, line, value]``): from the cache when the file and
    ``settings`` are those it was made with, else from ``scan(file, bad)`` (which counts bad
    records in ``bad``), then cached."""
    stat = os.stat(file)
    key = hashlib.sha1(json.dumps([os.path.abspath(file), stat.st_size, stat.st_mtime_ns, *settings]).encode())
    cached = os.path.join(cache_dir, f"{key.hexdigest()}.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            saved = json.load(f)
        if strict and saved["examples"]:
            raise DataError(saved["examples"][0])
        for kind, count in saved["bad"].items():
            bad.counts[kind] += count
        bad.examples.extend(saved["examples"][: 10 - len(bad.examples)])
        return saved["entries"]
    before, examples = dict(bad.counts), len(bad.examples)
    rows = scan(file, bad)
    os.makedirs(cache_dir, exist_ok=True)
    with open(f"{cached}.{os.getpid()}.tmp", "w") as f:  # ranks may write the same index at once
        new = {k: v - before.get(k, 0) for k, v in bad.counts.items() if v - before.get(k, 0)}
        json.dump(dict(entries=rows, bad=new, examples=bad.examples[examples:]), f)
    os.replace(f"{cached}.{os.getpid()}.tmp", cached)
    return rows


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def index_documents(config, tokenizer, path: str, log=print) -> list[Entry]:
    """Every usable document of the files at ``path`` with its cost (``config``: a
    ``moca.config.Config``)."""
    d, bad = config.data, BadRecords()

    def scan(file, bad):
        rows = []
        for doc in read_cpt(file, bad, strict=config.run.strict, decode=False):
            ids, _ = layout(doc, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels)
            if ids:
                rows.append([doc.offset, _line(doc.where), len(ids)])
        return rows
    settings = [tokenizer.fingerprint, d.max_doc_tokens, d.min_pixels, d.max_pixels]
    entries = [Entry(file, offset, f"{file}:{line}", cost) for file in data_files(path)
               for offset, line, cost in _cached(file, settings, scan, _cache_dir(config), config.run.strict, bad)]
    bad.report(log)
    if not entries:
        raise ValueError(f"no usable documents in {path}")
    return entries


def index_pairs(config, path: str, log=print) -> list[PairEntry]:
    """Every usable pair of the files at ``path`` with its task."""
    bad, k = BadRecords(), config.cl.hard_negatives

    def scan(file, bad):
        return [[p.offset, _line(p.where), p.task] for p in read_pairs(file, k, bad, strict=config.run.strict,
                                                                       decode=False)]
    entries = [PairEntry(file, offset, f"{file}:{line}", task) for file in data_files(path)
               for offset, line, task in _cached(file, ["pairs", k], scan, _cache_dir(config), config.run.strict, bad)]
    bad.report(log)
    if not entries:
        raise ValueError(f"no usable pairs in {path}")
    return entries


def _cache_dir(config) -> str:
    return config.data.index_cache or os.path.join(config.run.out, "index")


def default_documents(config, main: bool, barrier) -> str:
    """The run's stage-1 documents: ``data.documents``, else the embedded dataset (written once)."""
    return config.data.documents or embedded_file(embedded.write, os.path.join(config.run.out, "data"), "cpt.jsonl",
                                                  config.data.embedded_seed, main, barrier)


def default_pairs(config, main: bool, barrier) -> str:
    """The run's stage-2 pairs: ``data.pairs``, else the embedded pairs (written once)."""
    return config.data.pairs or embedded_file(embedded.write_pairs, os.path.join(config.run.out, "data"),
                                              "pairs.jsonl", config.data.embedded_seed, main, barrier)
