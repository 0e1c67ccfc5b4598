"""The files of a corpus, read in place: JSON Lines, Parquet shards and ``datasets.save_to_disk``
folders, as the Hugging Face datasets are distributed (nothing converted or copied).

A source is a file or a folder. A folder holding ``state.json`` (what ``Dataset.save_to_disk``
writes) is that dataset: its Arrow files in their order. Any other folder is its ``.jsonl``,
``.parquet`` and ``.arrow`` files at any depth, sorted (``data/train-00000-of-00004.parquet``).

Rows are read by random access, memory-mapped: a Parquet file by its row groups (the group that
holds a row is read, only the columns asked for, and the last few groups read are kept per
process, so neighbouring rows cost one read); an Arrow file of ``save_to_disk`` is mapped whole
and sliced. A JSON Lines row is found by its byte offset (``moca.data.records``). A file that is
not what its name says is one ValueError naming it (pyarrow's reason after it).
"""
from __future__ import annotations

import bisect
import functools
import json
import os
from collections import OrderedDict
from collections.abc import Iterator

from ..files import data_files, read_bounded

SUFFIXES = (".jsonl", ".parquet", ".arrow")
_KEPT_GROUPS = 4  # row groups kept per open Parquet file: a shuffled epoch rarely comes back to one sooner


def kind(path: str) -> str:
    """"jsonl", "parquet" or "arrow", by the file's name."""
    return "parquet" if path.endswith(".parquet") else "arrow" if path.endswith(".arrow") else "jsonl"


def source_files(path: str, what: str = "--data") -> list[str]:
    """The files of one source (see the module's docstring); ValueError naming ``what`` and the
    path when there are none."""
    state = os.path.join(path, "state.json")
    if os.path.isdir(path) and os.path.isfile(state):
        try:
            names = [f["filename"] for f in json.loads(read_bounded(state, "datasets state"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{what} {state}: not the state.json that datasets' save_to_disk writes ({exc})") from None
        files = [os.path.join(path, name) for name in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing or not files:
            raise ValueError(f"{what} {path}: a save_to_disk folder without its data files "
                             f"({missing or 'none listed'})")
        return files
    return data_files(path, what, SUFFIXES, recursive=True)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError('reading Parquet and Arrow files needs pyarrow (pip install "moca[formats]"); JSON Lines '
                         "needs nothing") from None
    return pyarrow


class ParquetRows:
    """One Parquet file, memory-mapped: its row count, its row groups' first rows, and rows read
    by their number (from 0) through the row group that holds them."""

    def __init__(self, path: str):
        pa = _pyarrow()
        self.path = path
        try:
            self.file = pa.parquet.ParquetFile(path, memory_map=True)
        except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, OSError) on a file it cannot read
            raise ValueError(f"{path}: not a Parquet file ({exc})") from None
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.rows = self.starts[-1]
        self.columns = set(self.file.schema_arrow.names)
        self._groups: OrderedDict = OrderedDict()

    def group(self, g: int, columns: tuple[str, ...]):
        """Row group ``g`` (a pyarrow Table of ``columns``), kept among the last few read."""
        key = (g, columns)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        try:
            table = self.file.read_row_group(g, columns=list(columns))
        except Exception as exc:  # a shard damaged past its footer
            raise ValueError(f"{self.path}: row group {g} cannot be read ({exc})") from None
        self._groups[key] = table
        while len(self._groups) > _KEPT_GROUPS:
            self._groups.popitem(last=False)
        return table

    def row(self, number: int, columns: tuple[str, ...]) -> dict:
        """Row ``number`` (from 0) as a dict of ``columns``."""
        if not 0 <= number < self.rows:
            raise ValueError(f"{self.path}: no row {number + 1} (the file has {self.rows})")
        g = _group_of(self.starts, number)
        return self.group(g, columns).slice(number - self.starts[g], 1).to_pylist()[0]


class ArrowRows:
    """One Arrow file of ``save_to_disk`` (the IPC stream format), memory-mapped whole: nothing is
    copied, a row is a slice."""

    def __init__(self, path: str):
        pa = _pyarrow()
        self.path = path
        try:
            self.table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
        except Exception as exc:  # as ParquetRows
            raise ValueError(f"{path}: not an Arrow stream file as datasets' save_to_disk writes ({exc})") from None
        self.rows = self.table.num_rows
        self.columns = set(self.table.column_names)
        self.starts = [0]
        for batch in self.table.to_batches():
            self.starts.append(self.starts[-1] + batch.num_rows)

    def group(self, g: int, columns: tuple[str, ...]):
        return self.table.select(list(columns)).slice(self.starts[g], self.starts[g + 1] - self.starts[g])

    def row(self, number: int, columns: tuple[str, ...]) -> dict:
        if not 0 <= number < self.rows:
            raise ValueError(f"{self.path}: no row {number + 1} (the file has {self.rows})")
        return self.table.select(list(columns)).slice(number, 1).to_pylist()[0]


def _group_of(starts: list[int], number: int) -> int:
    """The group whose rows [starts[g], starts[g + 1]) hold row ``number``."""
    return bisect.bisect_right(starts, number) - 1


@functools.lru_cache(maxsize=256)
def _opened(path: str, pid: int) -> ParquetRows | ArrowRows:
    return ParquetRows(path) if kind(path) == "parquet" else ArrowRows(path)


def rows_of(path: str) -> ParquetRows | ArrowRows:
    """The open reader of a Parquet or Arrow file, one per file and process (a forked worker
    opens its own)."""
    return _opened(path, os.getpid())


def groups(path: str) -> int:
    """How many row groups (Parquet) or record batches (Arrow) the file has: the units that the
    index is built in."""
    return len(rows_of(path).starts) - 1


def group_rows(path: str, g: int, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(row number from 0, row as a dict of the ``columns`` the file has) of group ``g``."""
    reader = rows_of(path)
    present = tuple(c for c in columns if c in reader.columns)
    table = reader.group(g, present)
    for k, row in enumerate(table.to_pylist()):
        yield reader.starts[g] + k, row


def row_where(path: str, number: int) -> str:
    """How a row is named in messages: "file:row N", N from 1."""
    return f"{path}:row {number + 1}"
