"""Stage-2 (HCL) pairs and the contrastive batch.

A record: ``{"query": side, "positive": side, "negatives": [side, ...], "task": "name"}``; a side
is ``{"text": ...}``, ``{"image": image}`` or both (``<image>`` in the text places the image,
otherwise it comes first). Each side becomes a document of its own, laid out like a stage-1
document (``moca.data.cpt``), so queries, positives and negatives are packed like everything
else. A query gets exactly K hard negatives: fewer are repeated in turn; none at all leaves the
query with in-batch negatives only when K is 0, and is a bad record otherwise.

Pairs come from JSON Lines, or from Parquet and Arrow files: rows of the same fields, or
MMEB-train's (``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, and where the set has
them ``neg_text``, ``neg_image_path``: lists, or the authors' Python-literal strings of lists),
MMEB's ``<|image_1|>`` read as ``<image>``, image paths relative to an image root (MMEB's unzipped
image archive; else the file's folder), the task named by the file (``moca.data.convert.task_of``).
"""
from __future__ import annotations

import ast
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from . import shards
from .convert import MMEB_TRAIN_FIELDS, side, task_of
from .convert import _listed as listed
from .records import (
    IMAGE_PLACEHOLDER,
    BadRecords,
    CptDocument,
    RecordError,
    _cpt_document,
    load_record,
    records,
    reworded,
)


@dataclass
class Pair:
    query: CptDocument
    positive: CptDocument
    negatives: list[CptDocument]  # as many as the record has; images decoded in the first K only (those drawn)
    task: str
    where: str
    offset: int = 0


def check_side(side, what: str = "a side") -> None:
    """ValueError unless ``side`` is an object with a text and/or an image."""
    if not isinstance(side, dict) or not ({"text", "image"} & set(side)):
        raise ValueError(f'{what} must be an object with "text" and/or "image"')


def absolute_image(side: dict, folder: str) -> dict:
    """``side`` with its image path made absolute when it names a file relative to ``folder``
    (for sides embedded away from the file that holds them)."""
    image = side.get("image") if isinstance(side, dict) else None
    if isinstance(image, str) and not os.path.isabs(image) and os.path.isfile(os.path.join(folder, image)):
        return {**side, "image": os.path.join(folder, image)}
    return side


def side_document(side, folder: str, where: str, decode: bool = True) -> CptDocument:
    """One side of a pair as a document: its text, with the image placed at ``<image>`` or first."""
    check_side(side)
    text, image = side.get("text", ""), side.get("image")
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {type(text).__name__}')
    images = [] if image is None else [image]
    if images and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + text
    return _cpt_document({"text": text, "images": images}, folder, where, 0, decode)


def _pair(record, folder: str, where: str, offset: int, hard_negatives: int, decode: bool) -> Pair:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("query", "positive"):
        if key not in record:
            raise ValueError(f'missing "{key}"')
    negatives = record.get("negatives")
    negatives = [] if negatives is None else negatives
    if not isinstance(negatives, list):
        raise ValueError(f'"negatives" must be a list, got {type(negatives).__name__}')
    if hard_negatives and not negatives:
        raise ValueError(f"no negatives, and each query takes {hard_negatives} hard negatives "
                         "(set hard_negatives=0 to train on in-batch negatives only)")
    task = record.get("task", "default")
    if not isinstance(task, str) or not task:
        raise ValueError('"task" must be a non-empty string')
    try:
        sides = [side_document(record[k], folder, where, decode) for k in ("query", "positive")]
        # a batch draws the first K negatives only (chosen_negatives): the others' headers are checked, not decoded
        negs = [side_document(n, folder, where, decode and k < hard_negatives) for k, n in enumerate(negatives)]
    except ValueError as exc:
        raise reworded(exc, "a side: ") from None
    return Pair(sides[0], sides[1], negs, task, where, offset)


def _listed(value, what: str) -> list:
    """A list of MMEB's negatives: ``moca.data.convert``'s reading, after the authors' Python-literal
    string of a list is read as that list."""
    if isinstance(value, str) and value.startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise RecordError(f"{what} is not a list literal") from None
    return listed(value, what)


def mmeb_record(row: dict, task: str, root: str) -> dict:
    """An MMEB-train row as a pair record, image paths made absolute from ``root``."""
    missing = [name for name in MMEB_TRAIN_FIELDS if name not in row]
    if missing:
        raise RecordError(f"missing {', '.join(repr(n) for n in missing)} (the row has {sorted(row)})")

    def image(value):
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.join(root, value)
        return value or None
    record = {"query": side(row["qry"], image(row["qry_image_path"]), "the query"),
              "positive": side(row["pos_text"], image(row["pos_image_path"]), "the positive"), "task": task}
    texts, paths = _listed(row.get("neg_text"), '"neg_text"'), _listed(row.get("neg_image_path"), '"neg_image_path"')
    record["negatives"] = [side(texts[i] if i < len(texts) else "", image(paths[i] if i < len(paths) else None),
                                f"negative {i + 1}") for i in range(max(len(texts), len(paths)))
                           if (i < len(texts) and texts[i]) or (i < len(paths) and paths[i])]
    return record


def _maker(path: str, hard_negatives: int, decode: bool, image_root: str | None):
    """What makes a pair of a record of ``path``: MMEB-train's rows are rewritten first."""
    mmeb = shards.kind(path) != "jsonl" and set(MMEB_TRAIN_FIELDS) <= shards.rows_of(path).columns
    task = task_of(path)

    def make(record, folder, where, offset):
        if mmeb:
            record = mmeb_record(record, task, image_root or folder)
        return _pair(record, folder, where, offset, hard_negatives, decode)
    return make


def read_pairs(path: str, hard_negatives: int, bad: BadRecords | None = None, strict: bool = False,
               decode: bool = True, image_root: str | None = None, group: int | None = None) -> Iterator[Pair]:
    """The valid pairs of a JSON Lines, Parquet or Arrow file (of one row ``group`` of the latter,
    when given), in order; bad records are counted in ``bad`` and skipped with a warning naming
    file and line (or row), or raise DataError when ``strict``. ``image_root``: what MMEB-train's
    image paths are relative to (default: the file's folder)."""
    return records(path, _maker(path, hard_negatives, decode, image_root), bad, strict, group=group)


def load_pair(path: str, offset: int, where: str, hard_negatives: int, decode: bool = True,
              image_root: str | None = None) -> Pair:
    """The pair whose line starts at byte ``offset`` of ``path`` (or, in a Parquet or Arrow file,
    of row ``offset``); ValueError starting with ``where``."""
    return load_record(path, offset, where, _maker(path, hard_negatives, decode, image_root))


def chosen_negatives(count: int, k: int) -> list[int]:
    """Indices of the K hard negatives of a pair with ``count`` of them: the first K, repeated in
    turn when there are fewer."""
    return [i % count for i in range(k)] if count else []


def contrastive_batches(tasks: list[str], batch_size: int, seed: int, epoch: int,
                        mixed: bool = True) -> list[list[int]]:
    """The epoch's global batches of pair indices. ``mixed`` (MoCa's default): pairs shuffled
    together, every batch a mix of tasks. Otherwise homogeneous: each batch from one task
    (shuffled within the task, then the batches shuffled), for the ablation. A last partial
    batch (per task, when homogeneous) is dropped, so every batch has ``batch_size`` pairs."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if mixed:
        order = list(range(len(tasks)))
        rng.shuffle(order)
        return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    batches = []
    for task in sorted(by_task):
        members = by_task[task]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches
