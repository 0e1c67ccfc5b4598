"""Evaluation the way MMEB and ViDoRe score embedding models.

Two record kinds, one a line, in JSON Lines files (a side as in the pairs files):
- MMEB style: ``{"query": side, "candidates": [side, ...], "task": "name"}`` with the positive
  first; a query counts when its positive scores strictly above every other candidate
  (``precision_at_1``).
- Retrieval: ``{"query": side, "positives": [side, ...], "candidates": [side, ...], "task": ...}``
  and optionally ``"relevance": [grade, ...]``, one number > 0 per positive (qrels' scores; 1 each
  when absent); the pool ranked is positives plus candidates, ties ranked against the positives
  (and, among tied positives, the lower grade first); ``recall_at_1``, ``recall_at_5`` and
  ``ndcg_at_5``, whose gain is the grade (linear gains, as trec_eval and so MTEB and ViDoRe count).

Those score a query against its own record's candidates (4 in the embedded default: chance 0.25).
Every query is also ranked against its task's whole pool, the distinct candidates and positives of
all its records, as MTEB ranks a corpus (MMEB: 1,000 candidates; where a pool is larger, the
relevant ones, the record's own and others drawn at random up to 1,000): ``pool_recall_at_1``,
``pool_recall_at_10``, ``pool_ndcg_at_10``, with ``pool_size`` the candidates ranked.

``eval.json``: ``{"tasks": {name: {metric: value, ..., "chance": value, "n": count}}, "overall":
{...}}``, each metric beside its value under a random ranking (``chance`` for the task's main
metric, ``chance_<metric>`` for each), ``overall`` the unweighted mean over tasks. When tasks are
MMEB's (named as MMEB names them; case, "-" and "_" aside), ``meta_tasks`` holds MMEB's
per-meta-task averages of Precision@1: ``{"classification" | "vqa" | "retrieval" | "grounding":
{"precision_at_1", "chance", "tasks": [names]}}``. Identical sides are embedded once.

Bad records (as in training, plus a side whose text is not a string or whose image does not
decode) are counted and skipped with a warning naming file and line, or fatal under ``strict``.
Each distinct side is decoded once while the file is read, so that a bad image costs its record,
not the evaluation, and once more when it is embedded.

``embed_file`` is ``moca encode``: one row per line of an input file, with a row of NaN (and a
warning naming file and line) for a line that cannot be embedded, so rows always match lines.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re

import numpy as np
import torch

from .data.convert import refuse_unconverted
from .data.pairs import absolute_image, check_side, side_document
from .data.records import BadRecords, read_records, reworded
from .encoder import Encoder
from .files import atomic_write

log = logging.getLogger(__name__)

MAIN = {"mmeb": "precision_at_1", "retrieval": "ndcg_at_5"}
POOL = ("pool_recall_at_1", "pool_recall_at_10", "pool_ndcg_at_10")  # each query against its task's whole pool
POOL_LIMIT = 1000  # MMEB scores each query against 1,000 candidates
# MMEB's 36 tasks by meta-task, as its paper (arXiv 2410.05160) and VLM2Vec's scoring group them.
MMEB_META_TASKS = {
    "classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "vqa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
                  "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_META_OF = {_plain(task): meta for meta, tasks in MMEB_META_TASKS.items() for task in tasks}


def mmeb_meta_task(task: str) -> str | None:
    """MMEB's meta-task of a task name ("ImageNet-1K", "imagenet_1k", ...), None for another task."""
    return _META_OF.get(_plain(task))


def _record(record) -> dict:
    if not isinstance(record, dict) or "query" not in record or "candidates" not in record:
        raise ValueError('a record needs "query" and "candidates"')
    check_side(record["query"], "the query")
    positives = record.get("positives")
    candidates = record["candidates"]
    if not isinstance(candidates, list) or (positives is None and len(candidates) < 2):
        raise ValueError('"candidates" must be a list (of at least 2 when the positive is its first)')
    if positives is not None and (not isinstance(positives, list) or not positives):
        raise ValueError('"positives" must be a non-empty list')
    gains = record.get("relevance")
    if gains is not None and (positives is None or not isinstance(gains, list) or len(gains) != len(positives)
                              or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and 0 < g < math.inf
                                         for g in gains)):
        raise ValueError('"relevance" goes with "positives": one number > 0 per positive')
    for side in candidates + (positives or []):
        check_side(side, "a candidate")
    task = record.get("task", "default")
    if not isinstance(task, str) or not task:
        raise ValueError(f'"task" must be a non-empty string, got {task!r:.60}')
    kind = "mmeb" if positives is None else "retrieval"
    pool = candidates if positives is None else positives + candidates
    return dict(task=task, kind=kind, query=record["query"], pool=pool,
                relevant=1 if positives is None else len(positives), gains=gains)


def side_key(side):
    """A key equal for equal sides (any JSON value, as read): an object's items, else (not an
    object, or a value not hashable) its JSON. Sides repeat by the hundred thousand in a retrieval
    file (the corpus in every record): the items are the cheap key."""
    if isinstance(side, dict):
        try:
            key = tuple(sorted(side.items()))
            hash(key)  # a list or object among the values: not hashable
            return key
        except TypeError:
            pass
    return json.dumps(side, sort_keys=True)


def _usable(side, folder: str, what: str, checked: dict) -> dict:
    """``side`` with its image path made absolute, after proving that it becomes a document (its
    text a string, its image decoded); ``checked`` remembers each distinct side's verdict."""
    usable = absolute_image(side, folder)
    key = side_key(usable)
    if key not in checked:
        try:
            side_document(side, folder, "")
            checked[key] = None
        except ValueError as exc:
            checked[key] = exc
    if checked[key] is not None:
        raise reworded(checked[key], f"{what}: ")
    return usable


def read_eval(path: str, bad: BadRecords | None = None, strict: bool = False) -> list[dict]:
    """The valid evaluation records of a file (bad ones counted and skipped with a warning naming
    file and line, or DataError under ``strict``); image paths resolved against the file's folder.
    A file in a published layout (MMEB rows, Parquet) is a ValueError naming ``moca data convert``."""
    refuse_unconverted(path, "moca eval")
    checked: dict = {}

    def make(record, folder, where, offset):
        record = _record(record)
        return dict(record, query=_usable(record["query"], folder, "the query", checked),
                    pool=[_usable(side, folder, "a candidate", checked) for side in record["pool"]], where=where)
    return list(read_records(path, make, bad, strict))


def read_inputs(path: str, bad: BadRecords | None = None, strict: bool = False) -> list[tuple[int, dict]]:
    """(line number, side) of each usable line of a ``moca encode`` input file, one side a line
    (``{"text": ...}`` and/or ``{"image": ...}``, the image decoded once to prove it usable);
    every other line, blank ones included, is counted in ``bad`` with a warning, or DataError
    under ``strict``."""
    checked: dict = {}

    def make(side, folder, where, offset):
        return int(where.rsplit(":", 1)[1]), _usable(side, folder, "the input", checked)
    return list(read_records(path, make, bad, strict, blank_is_bad=True))


def embed_file(encoder, path: str, strict: bool = False, show_progress_bar: bool = False) -> np.ndarray:
    """``moca encode``: float32 (lines, hidden), row i the embedding of line i + 1 of ``path``, or
    NaN when that line could not be embedded (a warning says how many, and the first few
    as file:line and why); DataError under ``strict`` at the first such line. ValueError when
    no line is usable."""
    bad = BadRecords()
    good = read_inputs(path, bad, strict)
    lines = len(good) + bad.total  # every line is either usable or counted
    if not good:
        raise ValueError(f"{path}: no line could be embedded ({lines} lines)")
    options = {"show_progress_bar": True} if show_progress_bar else {}
    vectors = np.asarray(encoder.encode([side for _, side in good], **options), dtype=np.float32)
    out = np.full((lines, vectors.shape[1]), np.nan, dtype=np.float32)
    out[[number - 1 for number, _ in good]] = vectors
    if bad.total:
        log.warning(f"{bad.total} of {lines} input lines could not be embedded ({dict(bad.counts)}): their rows are "
                    "NaN; " + "; ".join(bad.examples[:3]))
    return out


def positive_ranks(scores: torch.Tensor, gains: list[float]) -> list[int]:
    """1-based rank of each of the first ``len(gains)`` entries of ``scores`` (the positives, of
    those grades) when sorted by score; a tie places the other entries first, and among tied
    positives the lower grade first (a tie never counts as a success)."""
    values = scores.tolist()
    grade = gains + [0] * (len(values) - len(gains))
    order = sorted(range(len(values)), key=lambda i: (-values[i], i < len(gains), grade[i]))
    rank = {entry: place + 1 for place, entry in enumerate(order)}
    return [rank[i] for i in range(len(gains))]


def ranks_of_relevant(scores: torch.Tensor, relevant: int) -> list[int]:
    """1-based ranks, sorted, of the first ``relevant`` entries of ``scores`` (ties as above)."""
    return sorted(positive_ranks(scores, [1] * relevant))


def ranking_metrics(scores: torch.Tensor, gains: list[float], recall_at: tuple[int, ...] = (1, 5),
                    ndcg_at: int = 5) -> dict:
    """Recall@k for each of ``recall_at`` and nDCG@``ndcg_at`` of one query, with their values under
    a random ranking (``chance_*``): ``scores`` (n,) over a pool whose first ``len(gains)`` entries
    are the relevant ones, of those grades (linear gains)."""
    n, ranks = scores.numel(), positive_ranks(scores, gains)
    out = {}
    for k in recall_at:
        out[f"recall_at_{k}"] = sum(r <= k for r in ranks) / len(gains)
        out[f"chance_recall_at_{k}"] = min(k, n) / n
    ideal = sum(g / math.log2(r + 1) for r, g in enumerate(sorted(gains, reverse=True)[:ndcg_at], 1))
    out[f"ndcg_at_{ndcg_at}"] = sum(g / math.log2(r + 1) for r, g in zip(ranks, gains) if r <= ndcg_at) / ideal
    # a random ranking puts the pool's mean grade at every place
    out[f"chance_ndcg_at_{ndcg_at}"] = sum(sum(gains) / n / math.log2(r + 1) for r in range(1, min(ndcg_at, n) + 1)) \
        / ideal
    return out


def metrics(kind: str, scores: torch.Tensor, relevant: int, gains: list[float] | None = None) -> dict:
    """The record's metrics over its own candidates and their values under a random ranking
    (``chance_*``); ``gains``: the positives' grades for nDCG (1 each when None)."""
    gains = [1] * relevant if gains is None else gains
    if kind == "mmeb":
        hit = positive_ranks(scores, gains)[0] == 1
        return dict(precision_at_1=float(hit), chance_precision_at_1=1 / scores.numel())
    return ranking_metrics(scores, gains)


def pool_metrics(query: torch.Tensor, pool: torch.Tensor, relevant: dict[int, float], own: list[int],
                 seed: int, itself: int | None = None) -> dict:
    """``pool_recall_at_1``, ``pool_recall_at_10``, ``pool_ndcg_at_10`` (and ``chance_pool_*``,
    ``pool_size``) of one query (hidden,) ranked against its task's whole pool (P, hidden) of
    distinct candidates, as MTEB ranks a corpus: ``relevant`` maps pool rows to grades; where the
    pool is larger than ``POOL_LIMIT`` (MMEB's 1,000), the relevant rows, the record's ``own``
    candidates and others drawn with ``seed`` up to the limit. ``itself``: the pool row that is the
    query's own input (a candidate of another record), left out unless relevant or its own
    candidate, as MTEB leaves a query's own id out of its corpus."""
    rows = list(relevant) + [r for r in dict.fromkeys(own) if r not in relevant]
    taken = set(rows) | {itself}
    rest = [r for r in range(pool.shape[0]) if r not in taken]
    if pool.shape[0] > POOL_LIMIT:
        rest = random.Random(seed).sample(rest, max(0, min(len(rest), POOL_LIMIT - len(rows))))
    rows += rest
    scores = pool[torch.tensor(rows)] @ query
    found = ranking_metrics(scores, list(relevant.values()), recall_at=(1, 10), ndcg_at=10)
    return {**{(f"chance_pool_{k[7:]}" if k.startswith("chance_") else f"pool_{k}"): v for k, v in found.items()},
            "pool_size": len(rows)}


def evaluate(encoder, paths: list[str], strict: bool = False, query_prompt: str | None = None,
             document_prompt: str | None = None, show_progress_bar: bool = False) -> dict:
    """Scores (the ``eval.json`` object) of ``encoder`` on the evaluation files: over each record's
    own candidates (``metrics``), and over its task's whole pool (``pool_metrics``). ``query_prompt``
    and ``document_prompt`` go before each query's and each candidate's text (``Encoder.encode``'s
    ``prompt``; ``moca eval`` gives the model's own), so a side that is both a query and a
    candidate is then embedded once per role."""
    bad, records = BadRecords(), []
    for path in paths:
        records += read_eval(path, bad, strict)
    bad.report()
    if not records:
        raise ValueError(f"no usable evaluation records in {', '.join(paths)}")
    prompts = {"query": query_prompt or None, "document": document_prompt or None}
    split = prompts["query"] != prompts["document"]  # one role per input when the roles' prompts differ
    keys, unique, places = {}, {"query": [], "document": []}, []  # identical sides are embedded once
    for record in records:
        place = []
        for i, side in enumerate([record["query"]] + record["pool"]):
            role = "query" if i == 0 and split else "document"
            key = (role, side_key(side))
            if key not in keys:
                keys[key] = (role, len(unique[role]))
                unique[role].append(side)
            place.append(keys[key])
        places.append(place)  # the query's (role, row), then its pool's
    log.info(f"{len(records)} queries, {sum(map(len, unique.values()))} distinct inputs to embed")
    options = {"show_progress_bar": True} if show_progress_bar else {}
    parts = {role: torch.as_tensor(encoder.encode(sides, **options, **({"prompt": prompts[role]} if prompts[role]
                                                                        else {})))
             for role, sides in unique.items() if sides}
    offset = {"document": 0, "query": len(unique["document"])}
    embeddings = torch.cat([parts[role] for role in ("document", "query") if role in parts])
    places = [[offset[role] + row for role, row in place] for place in places]
    pools: dict[str, dict[int, int]] = {}  # task -> {embedding row: place in the task's pool}
    for record, (_, *pool) in zip(records, places):
        task_pool = pools.setdefault(record["task"], {})
        for row in pool:
            task_pool.setdefault(row, len(task_pool))
    pool_vectors = {task: embeddings[torch.tensor(list(rows))] for task, rows in pools.items()}
    per_task: dict[str, list[dict]] = {}
    for index, (record, (query, *pool)) in enumerate(zip(records, places)):
        q, task_pool = embeddings[query], pools[record["task"]]
        grades: dict[int, float] = {}
        for row, gain in zip(pool[:record["relevant"]], record["gains"] or [1] * record["relevant"]):
            grades[task_pool[row]] = max(gain, grades.get(task_pool[row], 0))
        whole = pool_metrics(q, pool_vectors[record["task"]], grades, [task_pool[r] for r in pool], index,
                             task_pool.get(query))
        per_task.setdefault(record["task"], []).append(
            dict(metrics(record["kind"], embeddings[torch.tensor(pool)] @ q, record["relevant"], record["gains"]),
                 **whole, kind=record["kind"]))
    tasks = {}
    for task, rows in sorted(per_task.items()):
        if len({r["kind"] for r in rows}) > 1:
            raise ValueError(f"task {task!r} mixes MMEB-style and retrieval records; give them different task names")
        names = [k for k in rows[0] if k != "kind"]
        means = {k: sum(r[k] for r in rows) / len(rows) for k in names}
        main = MAIN[rows[0]["kind"]]
        tasks[task] = {**{k: round(v, 4) for k, v in means.items() if not k.startswith("chance")},
                       "chance": round(means[f"chance_{main}"], 4),
                       **{k: round(v, 4) for k, v in means.items() if k.startswith("chance_")}, "n": len(rows)}
    overall_keys = sorted({k for t in tasks.values() for k in t if k not in ("n", "pool_size")})
    overall = {k: round(sum(t[k] for t in tasks.values() if k in t) / sum(k in t for t in tasks.values()), 4)
               for k in overall_keys}
    result = dict(tasks=tasks, overall={**overall, "n": sum(t["n"] for t in tasks.values())})
    meta = meta_task_averages(tasks)
    return {**result, "meta_tasks": meta} if meta else result


def meta_task_averages(tasks: dict) -> dict:
    """MMEB's per-meta-task means of Precision@1 (and its chance) over the MMEB tasks scored."""
    groups: dict[str, list[str]] = {}
    for name, scores in tasks.items():
        meta = mmeb_meta_task(name)
        if meta and "precision_at_1" in scores:
            groups.setdefault(meta, []).append(name)
    return {meta: {"precision_at_1": round(sum(tasks[t]["precision_at_1"] for t in names) / len(names), 4),
                   "chance": round(sum(tasks[t]["chance"] for t in names) / len(names), 4), "tasks": names}
            for meta, names in sorted(groups.items(), key=lambda item: list(MMEB_META_TASKS).index(item[0]))}


def evaluate_run(run_dir: str, paths: list[str], strict: bool = False) -> dict:
    """Scores of the model of the run in ``run_dir`` (its newest checkpoint, with its own prompts)
    on the evaluation files, also written to ``run_dir/eval.json``."""
    encoder = Encoder.from_pretrained(run_dir)
    result = evaluate(encoder, paths, strict=strict, query_prompt=encoder.prompts.get("query"),
                      document_prompt=encoder.prompts.get("document"))
    atomic_write(os.path.join(run_dir, "eval.json"), json.dumps(result, indent=1).encode())
    return result
