"""The corpus index: every usable record of a run's data files with what batching needs (a
document's cost in tokens, a pair's task), where its line is, and nothing more. Only the index
stays in memory; records are read again when their batch comes (``moca.data.loader``).

Each file is scanned once (records and image headers, no pixels) and its index cached under
``index_cache`` (default: the run directory), keyed by the file's path, size and modification
time and the settings that change costs, so a resumed run, or one sharing the cache, does not
scan it again. Bad records are counted and reported, from the cache too. A cache file is written
atomically and checked when read; a bad one (torn, emptied, of another shape) costs a new scan and
a warning naming it, never the run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..files import atomic_write, data_files, read_bounded
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


def _cached(file: str, settings: list, scan, cache_dir: str, strict: bool, bad: BadRecords, value: type,
            log) -> list[list]:
    """One file's index rows (``[offset, line, value]``, ``value`` a document's cost or a pair's
    task): from the cache when it was made from this file as it is now with these ``settings``,
    else from ``scan(file, bad)`` (which counts bad records in ``bad``), then cached. A cache file
    that does not hold what this function writes (torn by a crash, emptied, another program's)
    is made again with a warning naming it; one that cannot be written leaves the index uncached."""
    stat = os.stat(file)
    source = json.dumps([os.path.abspath(file), stat.st_size, stat.st_mtime_ns, *settings])
    cached = os.path.join(cache_dir, f"{hashlib.sha1(source.encode()).hexdigest()}.json")
    if os.path.lexists(cached):
        try:
            saved = _verified(cached, source, stat.st_size, value)
        except ValueError as exc:
            log(f"{exc}; {file} is indexed again")
        else:
            if strict and saved["examples"]:
                raise DataError(saved["examples"][0])
            for kind, count in saved["bad"].items():
                bad.counts[kind] += count
            bad.examples.extend(saved["examples"][: 10 - len(bad.examples)])
            return saved["entries"]
    before, examples = dict(bad.counts), len(bad.examples)
    rows = scan(file, bad)
    new = {k: v - before.get(k, 0) for k, v in bad.counts.items() if v - before.get(k, 0)}
    saved = dict(source=json.loads(source), entries=rows, bad=new, examples=bad.examples[examples:])
    try:
        atomic_write(cached, json.dumps(saved).encode(), shared=True)  # ranks may write the same index at once
    except (ValueError, OSError) as exc:
        log(f"index cache {cached} not written ({exc}); the next run indexes {file} again")
    return rows


def _verified(cached: str, source: str, size: int, value: type) -> dict:
    """The content of the cache file ``cached``, checked to be what ``_cached`` writes for
    ``source`` (the data file and settings, as JSON): rows of a byte offset within the file's
    ``size``, a line number and a ``value`` (a positive cost, or a task). ValueError naming the
    cache file and what is wrong."""
    try:  # the cache of a file holds a row of a few numbers per line of it: a few times its size at most
        saved = json.loads(read_bounded(cached, "index cache", 2**20 + 4 * size))
    except OSError as exc:
        raise ValueError(f"index cache {cached} cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"index cache {cached} is not JSON (empty or cut short)") from None
    if not isinstance(saved, dict) or set(saved) != {"source", "entries", "bad", "examples"}:
        raise ValueError(f"index cache {cached} is not an index cache of this version of moca")
    if json.dumps(saved["source"]) != source:
        raise ValueError(f"index cache {cached} was made from another file or with other settings")

    def row(r) -> bool:
        return (isinstance(r, list) and len(r) == 3 and type(r[0]) is int and 0 <= r[0] < size
                and type(r[1]) is int and r[1] > 0 and type(r[2]) is value and (value is str or r[2] > 0))
    rows, counts, examples = saved["entries"], saved["bad"], saved["examples"]
    if not (isinstance(rows, list) and all(map(row, rows)) and isinstance(counts, dict)
            and all(type(n) is int and n > 0 for n in counts.values())
            and isinstance(examples, list) and all(isinstance(e, str) for e in examples)):
        raise ValueError(f"index cache {cached} holds values of the wrong types or out of range")
    return saved


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
               for offset, line, cost in _cached(file, settings, scan, _cache_dir(config), config.run.strict, bad, int,
                                                     log)]
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
               for offset, line, task in _cached(file, ["pairs", k], scan, _cache_dir(config), config.run.strict, bad,
                                                     str, log)]
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
