"""Stage-2 (HCL) pairs and the contrastive batch.

A record: ``{"query": side, "positive": side, "negatives": [side, ...], "task": "name"}``; a side
is ``{"text": ...}``, ``{"image": image}`` or both (``<image>`` in the text places the image,
otherwise it comes first). Each side becomes a document of its own, laid out like a stage-1
document (``moca.data.cpt``), so queries, positives and negatives are packed like everything
else. A query gets exactly K hard negatives: fewer are repeated in turn; none at all leaves the
query with in-batch negatives only when K is 0, and is a bad record otherwise.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .records import IMAGE_PLACEHOLDER, BadRecords, CptDocument, _cpt_document, load_record, read_records, reworded


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


def read_pairs(path: str, hard_negatives: int, bad: BadRecords | None = None, strict: bool = False,
               decode: bool = True) -> Iterator[Pair]:
    """The valid pairs of a JSON Lines file, in order; bad records are counted in ``bad`` and
    skipped with a warning naming file and line, or raise DataError when ``strict``."""
    return read_records(path, lambda r, folder, where, offset: _pair(r, folder, where, offset, hard_negatives, decode),
                        bad, strict)


def load_pair(path: str, offset: int, where: str, hard_negatives: int, decode: bool = True) -> Pair:
    """The pair whose line starts at byte ``offset`` of ``path``; ValueError starting with ``where``."""
    return load_record(path, offset, where, lambda r, folder, w, o: _pair(r, folder, w, o, hard_negatives, decode))


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
