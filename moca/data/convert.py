"""Published benchmark layouts as moca's files (``moca data convert``).

Layouts read, with the field names the datasets publish:

- MMEB evaluation (TIGER-Lab/MMEB-eval, one subset, i.e. one task, per file): rows of
  ``qry_text``, ``qry_img_path``, ``tgt_text`` (list) and ``tgt_img_path`` (list, "" for a text
  target), the positive target first. A row becomes an MMEB-style evaluation record
  ``{"query", "candidates", "task"}`` (Precision@1).
- MMEB training (TIGER-Lab/MMEB-train): rows of ``qry``, ``qry_image_path``, ``pos_text``,
  ``pos_image_path`` and, where the set has them, ``neg_text`` and ``neg_image_path``. A row
  becomes a stage-2 pair ``{"query", "positive", "negatives", "task"}``.
- BEIR-style retrieval (BEIR's sets; ViDoRe's ``*_beir`` sets and ViDoRe v2): a folder with a
  corpus, queries and qrels, each a file (``corpus.jsonl``, ``corpus.parquet``; BEIR's
  ``qrels/<split>.tsv``) or a folder of shards as Hugging Face keeps a config
  (``corpus/test-00000-of-00001.parquet``). Corpus rows: ``corpus-id`` (or ``_id``) and an
  ``image``, or ``title``/``text`` for a text corpus; queries: ``query-id`` (or ``_id``), ``query``
  (or ``text``) and, in multilingual sets, ``language``; qrels: ``query-id``, ``corpus-id``,
  ``score``. Each query with a relevant document becomes a retrieval record over the whole
  corpus: the documents of score > 0 as ``positives``, best first, their scores as ``relevance``
  (for graded nDCG), every other document a candidate. Queries without one are counted and left
  out, as BEIR's scoring leaves them out.

Rows come from Parquet (which needs pyarrow: ``pip install "moca[formats]"``) or JSON Lines (no
extra package). A task is named by ``task``, else by its file (a Hugging Face shard,
``<split>-00000-of-00001``, by its folder: the subset's name) or, for a BEIR set, its folder.

An image is a path, relative to ``image_root`` (MMEB's paths are relative to its unzipped image
archive) or to the row's file when no root is given, or absolute; or an image as Hugging Face
datasets stores one, ``{"bytes": ..., "path": ...}``, whose bytes are written to
``<output stem>_images/``, named by a hash of their content (an image named twice is written
once). Each image's header is read (no pixels) to prove that it opens. Paths in the output are
relative to the output's folder (``../images/cat.png``), as the readers resolve them, so that a
folder holding both moves whole. MMEB marks where an image goes with Phi-3's ``<|image_1|>``; it
becomes moca's ``<image>``. A token whose row has no image for it (the queries of MMEB's WebQA)
is dropped and the text kept, as VLM2Vec's loader does, counted in the report.

Bad rows (a missing field or one of the wrong type, an image that is missing or does not open, a
qrel naming an unknown query or document) are counted and skipped with a warning naming file and
line (or row), or stop the conversion under ``strict``, as every reader of records does.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..files import atomic_file, atomic_write, data_files, open_regular, real_folder, regular_or_absent
from .records import IMAGE_PLACEHOLDER, BadRecords, RecordError, open_image, read_records, reject

FORMATS = ("mmeb-eval", "mmeb-train", "beir")
ROW_FILES = (".jsonl", ".parquet")
MMEB_EVAL_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
MMEB_TRAIN_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
_MMEB_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")
_STRAY_TOKEN = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"[ \t]*\n?")  # a token with the spaces after it
_SHARD = re.compile(r"^.+-\d{5}-of-\d{5}$")  # Hugging Face's shard files: <split>-00000-of-00001


@dataclass
class Converted:
    """What a conversion wrote: records per task, images written out, rows skipped."""
    output: str
    format: str
    tasks: Counter = field(default_factory=Counter)
    bad: BadRecords = field(default_factory=BadRecords)
    images_written: int = 0
    unjudged: int = 0  # BEIR queries with no relevant document, left out
    stray_image_tokens: int = 0  # MMEB image tokens of a text whose row lacks the image: dropped, the text kept

    @property
    def records(self) -> int:
        return sum(self.tasks.values())


# ---- rows -------------------------------------------------------------------------------------

def read_rows(path: str, bad: BadRecords, strict: bool) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSON Lines, Parquet or (qrels) TSV file, ``where`` naming
    the file and its line or row. A line that is not a JSON object is a bad row (counted in
    ``bad`` with a warning, or DataError under ``strict``); a file that cannot be read at all
    (not Parquet, no pyarrow, a TSV without its header) raises ValueError."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif path.endswith(".tsv"):
        yield from _tsv_rows(path)
    else:
        def make(record, folder, where, offset):
            if not isinstance(record, dict):
                raise ValueError(f"a row must be a JSON object, got {type(record).__name__}")
            return where, record
        yield from read_records(path, make, bad, strict)


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f'{path}: reading Parquet needs pyarrow (pip install "moca[formats]"); JSON Lines '
                         "needs nothing") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)
    except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, OSError) on a file it cannot read
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row


def _tsv_rows(path: str) -> Iterator[tuple[str, dict]]:
    """BEIR's qrels: a header ``query-id corpus-id score``, then one judgement a line. A line the
    csv module cannot read (a field over its size limit) is a ValueError naming it."""
    with open_regular(path, "qrels", "r", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            if not {"query-id", "corpus-id", "score"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: a qrels TSV starts with the header query-id, corpus-id, score; "
                                 f"got {reader.fieldnames}")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise ValueError(f"{path}: not a TSV file past line {reader.line_num} ({exc})") from None


def task_of(path: str) -> str:
    """A file's task: the folder of a Hugging Face shard (a subset's name), else the file's name."""
    stem = os.path.basename(path).split(".", 1)[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if _SHARD.match(stem) else stem


# ---- images and sides --------------------------------------------------------------------------

class Images:
    """Where the output's images are: paths proven to open, embedded bytes written to files."""

    def __init__(self, output: str, image_root: str | None = None):
        self.root = os.path.abspath(image_root) if image_root else None
        self.out_folder = os.path.dirname(os.path.abspath(output))
        self.folder = os.path.splitext(os.path.abspath(output))[0] + "_images"
        self.written = 0
        self._verdicts: dict[str, Exception | None] = {}  # image path: why it does not open, or None
        self._embedded: dict[str, str | Exception] = {}  # embedded image's hash: its file extension, or why not

    def __call__(self, value, base: str, what: str) -> str | None:
        """The output's path of an image value (None when the value is empty): a path relative
        to the image root (else ``base``) or absolute, or ``{"bytes", "path"}``. RecordError
        (kind "bad image") when it is missing or does not open."""
        if value is None or value == "":
            return None
        if isinstance(value, dict):
            if value.get("bytes"):
                return self._shown(self._written(value["bytes"], value.get("path"), what))
            value = value.get("path")
            if not value:
                raise RecordError(f"{what}: an image with neither bytes nor a path", "bad image")
        if not isinstance(value, str):
            raise RecordError(f"{what}: an image must be a path or {{\"bytes\", \"path\"}}, got "
                              f"{type(value).__name__}", "bad image")
        path = value if os.path.isabs(value) else os.path.join(self.root or base, value)
        if not os.path.isfile(path):
            raise RecordError(f"{what}: image {path!r} not found" + ("" if self.root else
                              " (paths are relative to the row's file; give the image root)"), "bad image")
        self._check(path, what)
        return self._shown(path)

    def _check(self, path: str, what: str) -> None:
        if path not in self._verdicts:
            try:
                open_image(path, "", decode=False)  # its header only: it opens, its size is usable
                self._verdicts[path] = None
            except ValueError as exc:
                self._verdicts[path] = exc
        if self._verdicts[path] is not None:
            raise RecordError(f"{what}: {self._verdicts[path]}", "bad image")

    def _written(self, data: bytes, name, what: str) -> str:
        """The file holding ``data`` (proven to open), written unless an earlier row wrote it."""
        if not isinstance(data, bytes):
            raise RecordError(f"{what}: image bytes must be bytes, got {type(data).__name__}", "bad image")
        digest = hashlib.sha256(data).hexdigest()[:32]
        if digest not in self._embedded:
            try:
                with open_image(data, "", decode=False) as image:  # its header only
                    self._embedded[digest] = "." + (image.format or "img").lower()
            except ValueError as exc:
                self._embedded[digest] = exc
        verdict = self._embedded[digest]
        if isinstance(verdict, Exception):
            raise RecordError(f"{what}: embedded {verdict}", "bad image")
        ext = os.path.splitext(name)[1].lower() if isinstance(name, str) else ""
        path = os.path.join(self.folder, digest + (ext or verdict))
        if not regular_or_absent(path):
            atomic_write(path, data)
            self.written += 1
        return path

    def _shown(self, path: str) -> str:
        """``path`` relative to the output's folder, so that the output and its images move together."""
        return os.path.relpath(os.path.abspath(path), self.out_folder)


def side(text, image: str | None, what: str, counts: Converted | None = None) -> dict:
    """A side of text and/or an image path, MMEB's image token as ``<image>``. A token beyond the
    images the row has (MMEB's WebQA queries name an image they lack) is dropped with the spaces
    after it, the text kept, as VLM2Vec's loader does; counted in ``counts.stray_image_tokens``.
    RecordError when the side has neither text nor image, or when the text is not a string."""
    if text is not None and not isinstance(text, str):
        raise RecordError(f"{what}: text must be a string, got {type(text).__name__}")
    text = _MMEB_IMAGE_TOKEN.sub(IMAGE_PLACEHOLDER, text or "")
    stray = text.count(IMAGE_PLACEHOLDER) - (1 if image else 0)
    if stray > 0:
        kept = text.find(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER) if image else 0
        text = text[:kept] + _STRAY_TOKEN.sub("", text[kept:])
        if counts is not None:
            counts.stray_image_tokens += stray
    out = {}
    if text.strip():
        out["text"] = text
    if image:
        out["image"] = image
    if not out:
        raise RecordError(f"{what}: neither text nor an image")
    return out


def _fields(row: dict, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise RecordError(f"missing {', '.join(repr(n) for n in missing)} (the row has {sorted(row)})")


def _listed(value, what: str) -> list:
    """A list field, or one value as a list of one ("" and None as none)."""
    if isinstance(value, list):
        return value
    if value is None or value == "":
        return []
    if isinstance(value, (str, dict)):
        return [value]
    raise RecordError(f"{what} must be a string or a list, got {type(value).__name__}")


# ---- MMEB ---------------------------------------------------------------------------------------

def mmeb_eval_record(row: dict, task: str, images: Images, base: str, counts: Converted | None = None) -> dict:
    """An MMEB evaluation row as an MMEB-style evaluation record (the positive first)."""
    _fields(row, MMEB_EVAL_FIELDS)
    query = side(row["qry_text"], images(row["qry_img_path"], base, "the query"), "the query", counts)
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    if not isinstance(texts, list) or not isinstance(paths, list):
        raise RecordError('"tgt_text" and "tgt_img_path" must be lists')
    if len(texts) != len(paths) or len(texts) < 2:
        raise RecordError(f'"tgt_text" ({len(texts)}) and "tgt_img_path" ({len(paths)}) must be lists of one '
                          "length, at least 2 (the positive, then the others)")
    candidates = [side(t, images(p, base, f"target {i + 1}"), f"target {i + 1}", counts)
                  for i, (t, p) in enumerate(zip(texts, paths))]
    return {"query": query, "candidates": candidates, "task": task}


def mmeb_train_pair(row: dict, task: str, images: Images, base: str, counts: Converted | None = None) -> dict:
    """An MMEB training row as a stage-2 pair; its negatives, when it has any, as hard negatives."""
    _fields(row, MMEB_TRAIN_FIELDS)
    pair = {"query": side(row["qry"], images(row["qry_image_path"], base, "the query"), "the query", counts),
            "positive": side(row["pos_text"], images(row["pos_image_path"], base, "the positive"), "the positive",
                             counts),
            "negatives": [], "task": task}
    texts = _listed(row.get("neg_text"), '"neg_text"')
    paths = _listed(row.get("neg_image_path"), '"neg_image_path"')
    for i in range(max(len(texts), len(paths))):
        text, path = (texts[i] if i < len(texts) else ""), (paths[i] if i < len(paths) else None)
        if text or path:
            pair["negatives"].append(side(text, images(path, base, f"negative {i + 1}"), f"negative {i + 1}", counts))
    return pair


# ---- BEIR ---------------------------------------------------------------------------------------

def beir_part(folder: str, name: str, split: str) -> list[str]:
    """The files of a BEIR set's corpus, queries or qrels: ``name.jsonl`` or ``name.parquet``, or
    the files in the folder ``name/`` (those named after ``split`` when some are; for qrels, only
    those)."""
    for ext in ROW_FILES:
        if os.path.isfile(path := os.path.join(folder, name + ext)):
            return [path]
    part = os.path.join(folder, name)
    if os.path.isdir(part):
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(part), "**", "*"), recursive=True)
                       if f.endswith((*ROW_FILES, ".tsv")))
        of_split = [f for f in files if re.match(rf"{re.escape(split)}[-.]", os.path.basename(f))]
        if of_split or (files and name != "qrels"):
            return of_split or files
        if files:
            raise ValueError(f"{part}: no qrels of split {split!r} (files: "
                             f"{', '.join(os.path.basename(f) for f in files)}); choose the split")
    raise ValueError(f"{folder}: no {name} ({name}.jsonl, {name}.parquet, or a folder {name}/ of .parquet, .jsonl "
                     "or .tsv files)")


def is_beir(path: str) -> bool:
    """Whether ``path`` is a folder holding a corpus, queries and qrels."""
    return os.path.isdir(path) and all(
        any(os.path.exists(os.path.join(path, name + ext)) for ext in ("", *ROW_FILES))
        for name in ("corpus", "queries", "qrels"))


def _id(row: dict, names: tuple[str, ...], what: str) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != "":
            return str(value)
    raise RecordError(f"{what} needs an id ({' or '.join(repr(n) for n in names)}, a string or integer)")


def _score(value) -> float:
    """A qrel's score: a number, or a numeral (TSV)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RecordError(f'"score" must be a number, got {value!r:.40}')
    return int(value) if float(value).is_integer() else float(value)


def usable(files: list[str], make: Callable[[str, dict, str], object], bad: BadRecords, strict: bool) -> Iterator:
    """``make(where, row, path)`` of each row of ``files`` (None results left out); a row that
    ``make`` refuses (ValueError) is counted in ``bad`` with a warning, or DataError under ``strict``."""
    for path in files:
        for where, row in read_rows(path, bad, strict):
            try:
                out = make(where, row, path)
            except ValueError as exc:
                reject(where, exc, bad, strict)
                continue
            if out is not None:
                yield out


def beir_records(folder: str, task: str, images: Images, bad: BadRecords, strict: bool = False, split: str = "test",
                 query_prompt: str = "", document_prompt: str = "", language: str | None = None,
                 counts: Converted | None = None) -> Iterator[dict]:
    """The retrieval records of a BEIR-style set, one per query that has a relevant document."""
    left_out: set[tuple[str, str]] = set()  # documents and queries whose rows were bad, or of another language

    def document(where, row, path):
        doc = _id(row, ("corpus-id", "_id"), "a document")
        try:
            image = images(row.get("image"), images.root or os.path.dirname(path), "the document")
            text = "" if image else " ".join(s for s in (row.get("title"), row.get("text"))
                                             if isinstance(s, str) and s.strip())
            return doc, side(document_prompt + text, image, "the document")
        except ValueError:
            left_out.add(("document", doc))
            raise
    corpus = dict(usable(beir_part(folder, "corpus", split), document, bad, strict))

    def query(where, row, path):
        qid = _id(row, ("query-id", "_id"), "a query")
        text = row.get("query", row.get("text"))
        if not isinstance(text, str) or not text.strip():
            left_out.add(("query", qid))
            raise RecordError('a query needs a non-empty "query" (or "text")')
        if language is not None and row.get("language") != language:
            left_out.add(("query", qid))
            return None
        return qid, {"text": query_prompt + text}
    queries = dict(usable(beir_part(folder, "queries", split), query, bad, strict))

    def qrel(where, row, path):
        qid, doc = _id(row, ("query-id",), "a qrel"), _id(row, ("corpus-id",), "a qrel")
        score = _score(row.get("score"))
        for kind, key, known in (("query", qid, queries), ("document", doc, corpus)):
            if key not in known:
                if (kind, key) in left_out:
                    return None  # its own row was reported already, or is of another language
                raise RecordError(f"the qrel names {kind} {key!r}, which is not in the set")
        return (qid, doc, score) if score > 0 else None
    judged: dict[str, dict[str, float]] = {}
    for qid, doc, score in usable(beir_part(folder, "qrels", split), qrel, bad, strict):
        judged.setdefault(qid, {})[doc] = score

    order = {doc: i for i, doc in enumerate(corpus)}
    for qid, q in queries.items():
        relevant = sorted(judged.get(qid, {}).items(), key=lambda item: (-item[1], order[item[0]]))
        if not relevant:
            if counts is not None:
                counts.unjudged += 1
            continue
        chosen = {doc for doc, _ in relevant}
        yield {"query": q, "positives": [corpus[doc] for doc, _ in relevant],
               "relevance": [score for _, score in relevant],
               "candidates": [s for doc, s in corpus.items() if doc not in chosen], "task": task}


# ---- inputs that need converting -------------------------------------------------------------------

_FIRST_LINE_BYTES = 1 << 22  # enough for a row of MMEB (its text and paths), not a whole file


def _published_layout(path: str) -> str | None:
    """What published layout the file or folder ``path`` is in, if it is one that ``moca data
    convert`` reads and the evaluation does not: a BEIR-style set, Parquet, or MMEB rows in JSON
    Lines (told by the first line's fields)."""
    if is_beir(path):
        return "a BEIR-style set (corpus, queries, qrels)"
    if os.path.isdir(path):
        files = glob.glob(os.path.join(glob.escape(path), "*"))
        if not any(f.endswith(".jsonl") for f in files) and any(f.endswith(".parquet") for f in files):
            return "a folder of Parquet files"
        return None
    if not os.path.isfile(path):
        return None
    with open_regular(path, "the data") as f:
        head = f.readline(_FIRST_LINE_BYTES)
    if head.startswith(b"PAR1") or path.endswith(".parquet"):
        return "a Parquet file"
    try:
        row = json.loads(head)
    except ValueError:
        return None  # the reader names the line
    fields = set(row) if isinstance(row, dict) else set()
    if set(MMEB_EVAL_FIELDS) <= fields:
        return "MMEB evaluation rows"
    if set(MMEB_TRAIN_FIELDS) <= fields:
        return "MMEB training rows"
    return None


def refuse_unconverted(path: str, command: str) -> None:
    """ValueError naming ``path``, its layout and the command that converts it, when ``path`` is
    in a published layout that ``command`` (an evaluation: ``moca eval``, ``moca train``'s) does
    not read."""
    layout = _published_layout(path)
    if layout is not None:
        raise ValueError(f"{path}: {layout}, which {command} does not read; moca data convert reads it: "
                         f"moca data convert {path} --output converted.jsonl")


# ---- the conversion -----------------------------------------------------------------------------

def detect(inputs: list[str]) -> str:
    """The layout of the inputs: a BEIR folder, or MMEB evaluation or training rows (by the
    fields of the first row)."""
    if all(is_beir(p) for p in inputs):
        return "beir"
    first = data_files(inputs[0], "", ROW_FILES, recursive=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad rows are reported by the conversion itself
        row = next((r for _, r in read_rows(first, BadRecords(), False)), None)
    fields = set(row or ())
    if set(MMEB_EVAL_FIELDS) <= fields:
        return "mmeb-eval"
    if set(MMEB_TRAIN_FIELDS) <= fields:
        return "mmeb-train"
    raise ValueError(f"{first}: not a layout moca converts (its first row has {sorted(fields)}; MMEB evaluation rows "
                     f"have {', '.join(MMEB_EVAL_FIELDS)}, MMEB training rows {', '.join(MMEB_TRAIN_FIELDS)}, and a "
                     "BEIR set is a folder with corpus, queries and qrels); or name it with --format")


def convert(inputs: list[str], output: str, fmt: str = "auto", image_root: str | None = None,
            task: str | None = None, split: str = "test", query_prompt: str = "", document_prompt: str = "",
            language: str | None = None, strict: bool = False) -> Converted:
    """Convert MMEB or BEIR-style files (``inputs``: files, or folders of them, or BEIR folders)
    into one JSON Lines file ``output``: evaluation records (``mmeb-eval``, ``beir``) or stage-2
    pairs (``mmeb-train``). ``query_prompt`` and ``document_prompt`` go before a BEIR set's query
    and document texts (MMEB's rows carry their instructions). ``language`` keeps a multilingual
    set's queries of that language. The output is written whole or not at all, and only as a
    regular file into real folders: an ``output`` or ``<stem>_images/`` that exists as anything
    else (a link, a device, a FIFO) is refused before any work."""
    if not inputs:
        raise ValueError("nothing to convert: give MMEB files or folders, or BEIR folders")
    images = Images(output, image_root)
    regular_or_absent(output)  # before any work: never written through a link or onto a device
    real_folder(images.folder)
    fmt = detect(inputs) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of auto, {', '.join(FORMATS)}")
    result = Converted(output, fmt)
    if fmt == "beir":
        for folder in inputs:
            if not is_beir(folder):
                raise ValueError(f"{folder}: not a BEIR-style folder (corpus, queries and qrels)")
    else:
        sources = [f for path in inputs for f in data_files(path, "", ROW_FILES, recursive=True)]
        if os.path.abspath(output) in map(os.path.abspath, sources):
            raise ValueError(f"{output}: the output is one of the inputs")

    def records() -> Iterator[dict]:
        if fmt == "beir":
            for folder in inputs:
                name = task or os.path.basename(os.path.abspath(folder))
                yield from beir_records(folder, name, images, result.bad, strict, split, query_prompt,
                                        document_prompt, language, result)
            return
        make = mmeb_eval_record if fmt == "mmeb-eval" else mmeb_train_pair
        yield from usable(sources, lambda where, row, path: make(row, task or task_of(path), images,
                                                                 os.path.dirname(os.path.abspath(path)), result),
                          result.bad, strict)

    with atomic_file(output) as f:
        for record in records():
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            result.tasks[record["task"]] += 1
        if not result.records:
            raise ValueError(f"no usable rows in {', '.join(inputs)}; nothing written")
    result.images_written = images.written
    return result
