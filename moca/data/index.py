"""The corpus index: every usable record of a run's sources with what batching needs (a
document's cost in tokens, a pair's task) and where it is, in NumPy arrays, and nothing more. Only
the index stays in memory; records are read again when their batch comes (``moca.data.loader``).

Per record: its file (an id into the source's file list), its row (the row number in a Parquet or
Arrow file, the byte offset of its line in a JSON Lines file), its line (JSON Lines only) and its
value (a document's cost, a pair's task id), each array of the narrowest unsigned type that holds
it: 8 bytes a document of a Parquet source, at most 16 of a JSON Lines one. ``Index`` serves them
as ``Entry`` / ``PairEntry`` objects one at a time, and the costs as one array (``Index.costs``).

A document's cost is the length of what ``moca.data.cpt.encode`` makes of it (what packing
needs): its text tokenized in batches by the fast tokenizer, each image's tokens from its size
in its header, no pixel decoded (``document_cost``).

Each source is indexed once and cached under ``index_cache`` (default: the run directory) as a
small manifest (``KEY.json``) and one ``.npy`` file per array (``KEY.file.npy``, ...), KEY a hash
of the source's files (path, size, modification time) and the settings that change the index; the
arrays are memory-mapped, so the ranks of a node share one copy in the page cache. Bad records are
counted and reported, from the cache too. The files are written atomically, the manifest last,
and checked when read: a bad cache (torn, emptied, of another shape or origin) costs a new build
and a warning naming it, never the run.

A build splits the source into units (a JSON Lines file; a Parquet file's row groups; an Arrow
file's record batches), shares them out across the ranks and, on each rank, across a pool of
``data.index_workers`` processes, and merges the shares on the main rank; a progress bar counts
records per second.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..files import atomic_write, read_json
from ..logs import bars_shown
from . import embedded, shards
from .images import PATCH, fitted_size, merged_tokens
from .pairs import read_pairs
from .records import IMAGE_PLACEHOLDER, BadRecords, DataError, read_cpt
from .sources import Source, drawn, parse_sources

log = logging.getLogger(__name__)

VERSION = "moca-index-2"  # in every cache key: a cache of another layout is never read as this one
_CHUNK = 1024  # documents tokenized in one batch


@dataclass(frozen=True)
class Entry:
    """A document of the corpus: where it is (``offset``: its row in a Parquet or Arrow file, the
    byte offset of its line in a JSON Lines file), and its cost in tokens."""
    file: str
    offset: int
    where: str
    cost: int


@dataclass(frozen=True)
class PairEntry:
    """A stage-2 pair: where it is (as ``Entry``), and its task."""
    file: str
    offset: int
    where: str
    task: str


def document_cost(pieces: list[int], sizes: list[tuple[int, int]], max_tokens: int, min_pixels: int,
                  max_pixels: int) -> int:
    """The length of ``moca.data.cpt.layout``'s ids of a document, from the token count of each
    piece of its text (split at ``<image>``) and each image's (width, height): the same
    truncation, an image that would cross ``max_tokens`` dropped with the rest."""
    n = 0
    for k, length in enumerate(pieces):
        n += min(length, max_tokens - n)
        if n >= max_tokens or k == len(sizes):
            break
        width, height = sizes[k]
        h, w = fitted_size(height, width, min_pixels, max_pixels)
        block = 2 + merged_tokens((1, h // PATCH, w // PATCH))
        if n + block > max_tokens:
            break
        n += block
    return n


# ---- scanning one unit (in a pool worker or in-process) -------------------------------------------

@dataclass
class _Scanned:
    """One unit's usable records: rows, lines, values (costs, or task names), bad records."""
    rows: list[int]
    lines: list[int]
    values: list
    bad: BadRecords


def _line(where: str) -> int:
    """A record's line (JSON Lines' "file:line") or row from 1 (tables' "file:row N")."""
    return int(where.rsplit(":", 1)[1].removeprefix("row "))


def _scan_documents(file: str, group: int | None, counter, limits: tuple[int, int, int], strict: bool) -> _Scanned:
    """The usable documents of one unit with their costs, tokenized ``_CHUNK`` at a time."""
    out = _Scanned([], [], [], BadRecords())
    docs = []

    def flush():
        pieces = [doc.text.split(IMAGE_PLACEHOLDER) for doc in docs]
        lengths = iter(counter.lengths([p for parts in pieces for p in parts]))
        for doc, parts in zip(docs, pieces):
            cost = document_cost([next(lengths) for _ in parts], [image.size for image in doc.images], *limits)
            if cost:
                out.rows.append(doc.offset)
                out.lines.append(_line(doc.where))
                out.values.append(cost)
        docs.clear()
    for doc in read_cpt(file, out.bad, strict=strict, decode=False, group=group):
        docs.append(doc)
        if len(docs) == _CHUNK:
            flush()
    flush()
    return out


def _scan_pairs(file: str, group: int | None, hard_negatives: int, image_root: str | None, strict: bool) -> _Scanned:
    """The usable pairs of one unit with their tasks."""
    out = _Scanned([], [], [], BadRecords())
    for pair in read_pairs(file, hard_negatives, out.bad, strict=strict, decode=False, image_root=image_root,
                           group=group):
        out.rows.append(pair.offset)
        out.lines.append(_line(pair.where))
        out.values.append(pair.task)
    return out


def _units(files: list[str]) -> list[tuple[int, int | None]]:
    """(file id, row group or None for the whole file) of each unit a source's build is split in."""
    return [(f, g) for f, file in enumerate(files)
            for g in ([None] if shards.kind(file) == "jsonl" else range(shards.groups(file)))]


def index_workers(setting: int, units: int) -> int:
    """Processes that build an index on this rank: ``setting``, or with -1 this node's CPUs shared
    among its ranks (torchrun's LOCAL_WORLD_SIZE); never more than there are ``units``."""
    workers = setting if setting > 0 else max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(workers, units))


def _run_units(scan, files: list[str], units: list[tuple[int, int | None]], workers: int,
               progress: bool) -> list[_Scanned]:
    """``scan(file, group)`` of each unit, in order: in this process, or in a pool of ``workers``
    forked processes (as torch's DataLoader makes its workers on Linux: no module imported again,
    the settings and the tokenizer inherited); a progress bar on stderr with records per second
    when ``progress``."""
    from tqdm import tqdm
    bar = tqdm(total=len(units), unit="unit", desc="indexing", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    start, done, results = time.monotonic(), 0, []

    def advance(result: _Scanned):
        nonlocal done
        done += len(result.rows)
        bar.set_postfix_str(f"{done / max(time.monotonic() - start, 1e-9):,.0f} records/s", refresh=False)
        bar.update(1)
        return result
    try:
        if workers <= 1:
            return [advance(scan(files[f], g)) for f, g in units]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(scan, files[f], g) for f, g in units]
            results = [advance(future.result()) for future in futures]
        return results
    finally:
        bar.close()


# ---- one source's arrays: built, saved, memory-mapped ---------------------------------------------

def _narrow(values, most: int) -> np.ndarray:
    """``values`` as the narrowest unsigned integer array that holds ``most``."""
    dtype = np.uint16 if most < 2**16 else np.uint32 if most < 2**32 else np.uint64
    return np.asarray(values, dtype=dtype)


class Part:
    """One source's index: ``files``, the arrays (``file``, ``row``, ``value`` and, when the
    source has a JSON Lines file, ``line``), and ``names`` (the tasks that pairs' values number).
    Memory-mapped from its cache (``stem``) when it was saved; pickled by that path then (a
    worker maps the same pages), else by its arrays."""

    def __init__(self, files: list[str], arrays: dict[str, np.ndarray], names: list[str] | None,
                 stem: str | None = None):
        self.files, self.arrays, self.names, self.stem = files, arrays, names, stem

    def __len__(self) -> int:
        return len(self.arrays["file"])

    def entry(self, k: int) -> Entry | PairEntry:
        a = self.arrays
        file, row = self.files[int(a["file"][k])], int(a["row"][k])
        where = f"{file}:{int(a['line'][k])}" if shards.kind(file) == "jsonl" else shards.row_where(file, row)
        value = int(a["value"][k])
        return Entry(file, row, where, value) if self.names is None else PairEntry(file, row, where, self.names[value])

    def __getstate__(self) -> dict:
        if self.stem is None:
            return self.__dict__
        return {**self.__dict__, "arrays": sorted(self.arrays)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self.arrays, list):
            self.arrays = {name: _mapped(f"{self.stem}.{name}.npy") for name in self.arrays}


def _mapped(path: str) -> np.ndarray:
    """The array of an ``.npy`` file, memory-mapped (read whole when empty: nothing to map)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a damaged header fails in numpy's parser in many ways (tokenize, ast, ...)
        raise ValueError(f"{path} is not a readable .npy file ({type(exc).__name__}: {exc})") from None


def _identity(files: list[str]) -> list:
    """What a cache key holds of each file: its absolute path, size and modification time."""
    out = []
    for file in files:
        info = os.stat(file)
        out.append([os.path.abspath(file), info.st_size, info.st_mtime_ns])
    return out


def _merged(files: list[str], results: list[_Scanned], units: list[tuple[int, int | None]], pairs: bool,
            bad: BadRecords) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The arrays of a source from its units' scans, in unit order; their bad records into ``bad``."""
    ids = np.concatenate([np.full(len(r.rows), f, dtype=np.int64) for r, (f, _) in zip(results, units)] or
                         [np.zeros(0, np.int64)])
    rows = np.concatenate([np.asarray(r.rows, dtype=np.int64) for r in results] or [np.zeros(0, np.int64)])
    values = [v for r in results for v in r.values]
    for r in results:
        bad.counts.update(r.bad.counts)
        bad.examples.extend(r.bad.examples[: 10 - len(bad.examples)])
    names = None
    if pairs:
        names = sorted(set(values))
        number = {name: i for i, name in enumerate(names)}
        values = [number[v] for v in values]
    arrays = {"file": _narrow(ids, len(files)), "row": _narrow(rows, int(rows.max(initial=0))),
              "value": _narrow(values, max(values, default=0))}
    if any(shards.kind(f) == "jsonl" for f in files):
        lines = [v for r in results for v in r.lines]
        arrays["line"] = _narrow(lines, max(lines, default=0))
    return arrays, names


def _save(stem: str, source: list, files: list[str], arrays: dict, names, bad: BadRecords) -> None:
    """The arrays as ``.npy`` files, then the manifest that vouches for them, each atomically."""
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write(f"{stem}.{name}.npy", buffer.getvalue(), shared=True)  # ranks may write the same at once
    manifest = dict(version=VERSION, source=source, files=files, count=len(arrays["file"]),
                    arrays={name: str(a.dtype) for name, a in arrays.items()}, names=names,
                    limits=[_limit(f) for f in files], bad=dict(bad.counts), examples=bad.examples)
    atomic_write(f"{stem}.json", json.dumps(manifest).encode(), shared=True)


def _limit(file: str) -> int:
    """What a row of the file must be under: its rows (a table), its size in bytes (JSON Lines)."""
    return os.path.getsize(file) if shards.kind(file) == "jsonl" else shards.rows_of(file).rows


def _verified(stem: str, source: list, most_value: int | None) -> tuple[Part, BadRecords]:
    """The cached source of ``stem`` and its bad records, checked to be what ``_save`` writes for
    ``source``: the manifest's fields, each array's type and length, files in order, rows within
    their files, lines from 1, values within range (costs in [1, ``most_value``]; task ids within
    the names). ValueError naming the cache file and what is wrong."""
    manifest = f"{stem}.json"
    try:
        saved = read_json(manifest, "index cache")
    except OSError as exc:
        raise ValueError(f"index cache {manifest} cannot be read ({exc.strerror})") from None
    keys = {"version", "source", "files", "count", "arrays", "names", "limits", "bad", "examples"}
    if not isinstance(saved, dict) or set(saved) != keys or saved["version"] != VERSION:
        raise ValueError(f"index cache {manifest} is not an index cache of this version of moca")
    if saved["source"] != source:
        raise ValueError(f"index cache {manifest} was made from other files or with other settings")
    files, count, kinds, names, limits = (saved[k] for k in ("files", "count", "arrays", "names", "limits"))
    counts, examples = saved["bad"], saved["examples"]
    wanted = {"file", "row", "value"} | ({"line"} if any(shards.kind(f) == "jsonl" for f in files) else set())
    if not (isinstance(kinds, dict) and set(kinds) == wanted and isinstance(limits, list) and len(limits) == len(files)
            and all(type(n) is int and n >= 0 for n in limits) and type(count) is int
            and isinstance(counts, dict) and all(type(n) is int and n > 0 for n in counts.values())
            and isinstance(examples, list) and all(isinstance(e, str) for e in examples)
            and (names is None) == (most_value is not None)):
        raise ValueError(f"index cache {manifest} holds values of the wrong types or out of range")
    arrays = {}
    for name, dtype in kinds.items():
        path = f"{stem}.{name}.npy"
        try:
            arrays[name] = _mapped(path)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"index cache {path} cannot be read ({exc})") from None
        if str(arrays[name].dtype) != dtype or arrays[name].shape != (count,):
            raise ValueError(f"index cache {path} is not the array its manifest describes")
    if not _in_range(arrays, limits, most_value if names is None else len(names) - 1, names is None):
        raise ValueError(f"index cache {stem}.*.npy holds values out of range")
    bad = BadRecords()
    bad.counts.update(counts)
    bad.examples.extend(examples)
    return Part(files, arrays, names, stem), bad


def _in_range(arrays: dict[str, np.ndarray], limits: list[int], most_value: int, costs: bool) -> bool:
    """Whether the arrays are what a build makes: file ids in order and in range, each file's rows
    under its limit, lines from 1, values in range (costs from 1)."""
    ids = arrays["file"]
    if len(ids) == 0:
        return True
    if int(ids[-1]) >= len(limits) or np.any(ids[1:] < ids[:-1]):
        return False
    bounds = np.searchsorted(ids, np.arange(len(limits) + 1))
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a and int(arrays["row"][a:b].max()) >= limits[f]:
            return False
    if "line" in arrays and int(arrays["line"].min()) < 1:
        return False
    values = arrays["value"]
    return int(values.max()) <= most_value and (not costs or int(values.min()) >= 1)


def _source_index(source: Source, settings: list, scan: Callable, config, bad: BadRecords, what: str,
                  rank: int, size: int, barrier, most_value: int | None) -> Part:
    """One source's index: from its cache when that holds this source as it is now with these
    ``settings``, else built (its units shared out across the ``size`` ranks, each rank's share
    across its pool; the main rank merges and saves) and cached. Every rank reaches the same two
    ``barrier`` calls, whatever it finds."""
    files = shards.source_files(source.path, what)
    identity = [VERSION, _identity(files), *settings]
    cache = config.data.index_cache or os.path.join(config.run.out, "index")
    stem = os.path.join(cache, hashlib.sha1(json.dumps(identity).encode()).hexdigest())
    strict = config.run.strict
    found = _cached(stem, identity, most_value, source.path)
    units = [] if found else _units(files)
    shares: dict[int, _Scanned] = {}
    if not found and size > 1:  # this rank's share (the main rank keeps its own; the others leave theirs)
        mine = list(range(rank, len(units), size))
        results = _run_units(scan, files, [units[u] for u in mine], index_workers(config.data.index_workers, len(mine)),
                             progress=rank == 0 and bars_shown())
        if rank == 0:
            shares.update(zip(mine, results))
        else:
            _save_share(f"{stem}.share{rank}", results, mine)
    barrier()
    if not found and rank == 0:
        shares.update(_gathered(stem, size, len(units)))
        missing = [u for u in range(len(units)) if u not in shares]  # shares another rank could not leave here
        results = _run_units(scan, files, [units[u] for u in missing],
                             index_workers(config.data.index_workers, len(missing)), progress=bars_shown())
        shares.update(zip(missing, results))
        arrays, names = _merged(files, [shares[u] for u in range(len(units))], units, most_value is None,
                                build_bad := BadRecords())
        try:
            _save(stem, identity, files, arrays, names, build_bad)
        except (ValueError, OSError) as exc:
            log.info(f"index cache {stem}.json not written ({exc}); the next run indexes {source.path} again")
            found = (Part(files, arrays, names), build_bad)
    barrier()
    if not found:
        found = _cached(stem, identity, most_value, source.path, say=False)
    if not found:  # a cache this rank cannot see (not shared) or write: its own build
        results = _run_units(scan, files, units, index_workers(config.data.index_workers, len(units)),
                             rank == 0 and bars_shown())
        arrays, names = _merged(files, results, units, most_value is None, build_bad := BadRecords())
        found = (Part(files, arrays, names), build_bad)
    part, saved_bad = found
    if strict and saved_bad.examples:
        raise DataError(saved_bad.examples[0])
    bad.counts.update(saved_bad.counts)
    bad.examples.extend(saved_bad.examples[: 10 - len(bad.examples)])
    return part


def _cached(stem: str, identity: list, most_value: int | None, path: str,
            say: bool = True) -> tuple[Part, BadRecords] | None:
    """The verified cache at ``stem``, None when absent; a bad one is said (``say``) and rebuilt."""
    if not os.path.lexists(f"{stem}.json"):
        return None
    try:
        return _verified(stem, identity, most_value)
    except ValueError as exc:
        if say:
            log.info(f"{exc}; {path} is indexed again")
        return None


def _save_share(stem: str, results: list[_Scanned], units: list[int]) -> None:
    """One rank's scans of its ``units`` for the main rank (an ``.npz`` of arrays and JSON text,
    nothing that runs code when read). Not written (the main rank scans them) when it cannot be."""
    meta = [dict(unit=u, values=r.values, bad=dict(r.bad.counts), examples=r.bad.examples)
            for u, r in zip(units, results)]
    buffer = io.BytesIO()
    np.savez(buffer, rows=np.asarray([v for r in results for v in r.rows], dtype=np.int64),
             lines=np.asarray([v for r in results for v in r.lines], dtype=np.int64),
             lengths=np.asarray([len(r.rows) for r in results], dtype=np.int64), meta=np.asarray(json.dumps(meta)))
    try:
        atomic_write(f"{stem}.npz", buffer.getvalue(), shared=True)
    except (ValueError, OSError):
        pass


def _gathered(stem: str, size: int, count: int) -> dict[int, _Scanned]:
    """The scans that the other ranks left (``_save_share``), by unit; each share file removed. A
    share that cannot be read is left out (its units are scanned again)."""
    out = {}
    for r in range(1, size):
        path = f"{stem}.share{r}.npz"
        try:
            with np.load(path, allow_pickle=False) as share:
                rows, lines, lengths = share["rows"], share["lines"], share["lengths"]
                meta = json.loads(str(share["meta"]))
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for k, m in enumerate(meta):
                bad = BadRecords()
                bad.counts.update(m["bad"])
                bad.examples.extend(m["examples"])
                a, b = int(starts[k]), int(starts[k + 1])
                if 0 <= m["unit"] < count:
                    out[m["unit"]] = _Scanned(rows[a:b].tolist(), lines[a:b].tolist(), m["values"], bad)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        finally:
            if os.path.lexists(path):
                os.remove(path)
    return out


# ---- the run's index --------------------------------------------------------------------------------

class Index:
    """The records an epoch reads, over the run's sources: ``len``, ``index[i]`` (an ``Entry`` or
    ``PairEntry``), iteration, ``costs`` (documents) and ``tasks`` (pairs). Each source is a
    ``Part``, of which ``picks`` (sorted indices, or None for all once) says what the epoch
    takes. Pickles by the parts' cache paths and the picks."""

    def __init__(self, parts: list[Part], picks: list[np.ndarray | None]):
        self.parts, self.picks = parts, picks
        self.starts = np.cumsum([0] + [len(p) if k is None else len(k) for p, k in zip(parts, picks)]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> Entry | PairEntry:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of an index of {len(self)}")
        p = bisect.bisect_right(self.starts, i) - 1
        j, pick = i - self.starts[p], self.picks[p]
        return self.parts[p].entry(j if pick is None else int(pick[j]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return isinstance(other, (Index, list)) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def _values(self) -> list[np.ndarray]:
        return [p.arrays["value"] if k is None else p.arrays["value"][k] for p, k in zip(self.parts, self.picks)]

    @functools.cached_property
    def costs(self) -> np.ndarray:
        """Each document's cost, in order (the memory-mapped array itself for one source taken
        whole; else one array of 2 or 4 bytes a document). AttributeError on an index of pairs."""
        if any(p.names is not None for p in self.parts):
            raise AttributeError("an index of pairs has tasks, not costs")
        values = self._values()
        return values[0] if len(values) == 1 else np.concatenate(values)

    @property
    def tasks(self) -> list[str]:
        """Each pair's task, in order. AttributeError on an index of documents."""
        if any(p.names is None for p in self.parts):
            raise AttributeError("an index of documents has costs, not tasks")
        return [p.names[v] for p, values in zip(self.parts, self._values()) for v in values.tolist()]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("costs", None)
        return state


def _run_index(sources: list[Source], settings: list, scan: Callable, config, default_count: int | None, what: str,
               rank: int, size: int, barrier, most_value: int | None) -> Index:
    """The index of ``sources``: each source's part, then each source's draw (``moca.data.sources``)."""
    bad, parts, picks = BadRecords(), [], []
    for place, source in enumerate(sources):
        part = _source_index(source, settings, scan, config, bad, what, rank, size, barrier, most_value)
        parts.append(part)
        picks.append(drawn(source, len(part), default_count, config.data.sample_seed, place))
    bad.report()
    index = Index(parts, picks)
    if len(sources) > 1 or any(k is not None for k in picks):
        log.info(f"{len(sources)} sources, {len(index):,} records an epoch: " + "; ".join(
            f"{s.path} {len(p) if k is None else len(k):,} of {len(p):,}" for s, p, k in zip(sources, parts, picks)))
    return index


def _no_barrier() -> None:
    return None


def index_documents(config, tokenizer, path: str, rank: int = 0, size: int = 1,
                    barrier=_no_barrier) -> Index:
    """The usable documents of the sources ``path`` names (``moca.data.sources``) with their costs
    (``config``: a ``moca.config.Config``; ``rank`` of ``size`` ranks meeting at ``barrier``)."""
    d = config.data
    limits = (d.max_doc_tokens, d.min_pixels, d.max_pixels)
    scan = functools.partial(_scan_documents, counter=tokenizer.counter(), limits=limits, strict=config.run.strict)
    index = _run_index(parse_sources(path, "data.documents"), ["documents", tokenizer.fingerprint, *limits], scan,
                       config, d.sample_per_source, "--data", rank, size, barrier, d.max_doc_tokens)
    if not len(index):
        raise ValueError(f"no usable documents in {path}")
    return index


def index_pairs(config, path: str, rank: int = 0, size: int = 1, barrier=_no_barrier) -> Index:
    """The usable pairs of the sources ``path`` names with their tasks."""
    k, root = config.cl.hard_negatives, config.data.image_root
    scan = functools.partial(_scan_pairs, hard_negatives=k, image_root=root, strict=config.run.strict)
    index = _run_index(parse_sources(path, "data.pairs"), ["pairs", k, root and os.path.abspath(root)], scan, config,
                       None, "--data", rank, size, barrier, None)
    if not len(index):
        raise ValueError(f"no usable pairs in {path}")
    return index


def embedded_file(write, folder: str, name: str, seed: int, main: bool, barrier) -> str:
    """The embedded dataset's file ``name``: the main process writes it (unless a run already did:
    the same seed gives the same files) while the others wait at ``barrier``."""
    if main and not os.path.isfile(os.path.join(folder, name)):
        write(folder, seed=seed)
    barrier()
    return os.path.join(folder, name)


def default_documents(config, main: bool, barrier) -> str:
    """The run's stage-1 documents: ``data.documents``, else the embedded dataset (written once)."""
    return config.data.documents or embedded_file(embedded.write, os.path.join(config.run.out, "data"), "cpt.jsonl",
                                                  config.data.embedded_seed, main, barrier)


def default_pairs(config, main: bool, barrier) -> str:
    """The run's stage-2 pairs: ``data.pairs``, else the embedded pairs (written once)."""
    return config.data.pairs or embedded_file(embedded.write_pairs, os.path.join(config.run.out, "data"),
                                              "pairs.jsonl", config.data.embedded_seed, main, barrier)
