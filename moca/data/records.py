"""JSON Lines records on disk, read one line at a time, with bad records counted and skipped with
a warning that names file and line, or fatal in strict mode.

Bad records are of these kinds (``BadRecords.counts``): "line too long" (over ``MAX_LINE_BYTES``,
read past without being held whole), "not UTF-8", "malformed JSON", "bad image" (missing, empty,
truncated or corrupt; or refused from its header before any pixel is decoded: over
``moca.data.images.MAX_IMAGE_PIXELS``, a document's images over ``MAX_DOCUMENT_PIXELS`` together,
a shape the processor refuses), "invalid record" (wrong fields or types), and, for readers that
keep one result per line, "blank line".

A CPT document is ``{"text": "... <image> ...", "images": [image, ...]}`` with one ``<image>``
placeholder per image, in order; the authors' marker ``<|vision_start|><|image_pad|><|vision_end|>``
(``AUTHORS_MARKER``) is read as ``<image>``, and any of those three tokens elsewhere in a text is a
bad record (the tokenizer would make image tokens of them that no image fills). An image is a path
(relative to the file's folder, or absolute), base64-encoded bytes (optionally as a
``data:image/...;base64,`` URL), or, in a Parquet or Arrow row, its bytes or Hugging Face's
``{"bytes", "path"}`` (the bytes decoded in memory, never written out).

Records come from JSON Lines (a line each, found again by its byte offset) or from the rows of
Parquet and Arrow files (``moca.data.shards``; found again by their row number), named
"file:line" or "file:row N".
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from ..files import open_regular
from . import images as _images
from . import shards
from .tokenizer import IMAGE_PAD, VISION_END, VISION_START

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
AUTHORS_MARKER = VISION_START + IMAGE_PAD + VISION_END
CPT_COLUMNS = ("text", "images")  # what a stage-1 row of a Parquet or Arrow file is read for
# The longest line read as a record (base64 images included); a longer line is a bad record, read
# past in chunks: at most this much of it is held.
MAX_LINE_BYTES = 8 * 2**20
_CHUNK = 2**20  # how much of an over-long line is read at a time while skipping it


class DataError(ValueError):
    """A bad record in strict mode: the message names file and line."""


class RecordError(ValueError):
    """Why a record is bad; ``kind`` is what ``BadRecords`` counts it as."""

    def __init__(self, reason: str, kind: str = "invalid record"):
        super().__init__(reason)
        self.kind = kind


def reworded(exc: ValueError, prefix: str) -> RecordError:
    """``exc`` with ``prefix`` before its message, of the same kind."""
    return RecordError(f"{prefix}{exc}", getattr(exc, "kind", "invalid record"))


@dataclass
class BadRecords:
    """Skipped records, by reason; ``examples`` keeps the first few "file:line: reason"."""
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, reason: str, kind: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")

    def report(self, level: int = logging.INFO) -> None:
        """One line, at ``level``, saying how many records were skipped, why, and the first."""
        if self.total:
            log.log(level, f"skipped {self.total} bad records ({dict(self.counts)}); first: {self.examples[0]}")


@dataclass
class CptDocument:
    text: str
    images: list  # decoded (PIL images), or (read_cpt(decode=False)) ImageHeader: their sizes only
    where: str                 # "file:line"
    offset: int = 0            # byte offset of the line in its file (see load_cpt)
    sources: list = field(default_factory=list)  # each image's JSON value (path or base64)
    folder: str = ""           # what relative image paths are relative to


def _image_source(value, folder: str):
    """(a path or a BytesIO of the decoded base64, the path tried) of an image's JSON value; raw
    bytes (an image embedded in a Parquet row) as a BytesIO of them; Hugging Face's ``{"bytes",
    "path"}`` by its bytes, else its path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return io.BytesIO(value), ""
    if not isinstance(value, str) or not value:
        raise RecordError(f"an image must be a path or base64 string, got {type(value).__name__}", "bad image")
    path = value if os.path.isabs(value) else os.path.join(folder, value)
    if os.path.isfile(path):
        return path, path
    try:
        return io.BytesIO(base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value,
                                           validate=True)), path
    except (binascii.Error, ValueError):
        raise RecordError(f"image {_shown(value)} is neither a file nor base64 image data", "bad image") from None


def image_bytes(value, folder: str) -> bytes:
    """The encoded bytes (PNG, JPEG, ...) of an image's JSON value, for decoders other than Pillow."""
    source, _ = _image_source(value, folder)
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    with open(source, "rb") as f:
        return f.read()


def _shown(value: str | bytes | dict) -> str:
    """An image's JSON value for a message: a path whole, base64 data cut short, bytes counted."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or ""
    if isinstance(value, bytes):
        return f"of {len(value):,} bytes"
    return repr(value if len(value) <= 200 else value[:60] + "...")


def _too_large(value: str, pixels: str) -> RecordError:
    return RecordError(f"image {_shown(value)} has {pixels} pixels, over the limit of {_images.MAX_IMAGE_PIXELS:,} "
                       "(moca.data.images.MAX_IMAGE_PIXELS); refused before decoding", "bad image")


def _undecodable(value: str, exc: Exception) -> RecordError:
    return RecordError(f"image {_shown(value)} could not be decoded: {exc or type(exc).__name__}", "bad image")


@dataclass(frozen=True)
class ImageHeader:
    """An image known by its header alone: its size, all that indexing and ``layout`` read."""
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _check_shape(value, width: int, height: int) -> None:
    """RecordError unless an image of this size may be decoded and used: at most
    ``MAX_IMAGE_PIXELS``, and of a shape that ``fitted_size`` accepts (aspect ratio up to 200)."""
    if width * height > _images.MAX_IMAGE_PIXELS:
        raise _too_large(value, f"{width} x {height}")
    try:
        _images.fitted_size(height, width)
    except ValueError as exc:
        raise RecordError(f"image {_shown(value)} cannot be used: {exc}", "bad image") from None


def image_header(value, folder: str) -> ImageHeader:
    """An image's size from its header alone, checked as ``open_image`` checks it: read by
    ``moca.data.images.header_size`` from embedded JPEG or PNG bytes (the rows of the authors'
    shards), else by Pillow. RecordError (kind "bad image") saying why not."""
    source, _ = _image_source(value, folder)
    size = _images.header_size(source.getbuffer()) if isinstance(source, io.BytesIO) else None
    if size is None:
        return ImageHeader(*open_image(value, folder, decode=False).size)
    _check_shape(value, *size)
    return ImageHeader(*size)


def open_image(value, folder: str, decode: bool = True) -> Image.Image:
    """A PIL image from a path or base64 bytes: its header read, its pixel count checked against
    ``moca.data.images.MAX_IMAGE_PIXELS`` (a decompression bomb is refused before any decoding)
    and its shape against what ``fitted_size`` accepts, then decoded, or with ``decode=False`` not
    (its ``size`` is all that is usable). Every reader of images comes here. RecordError (kind
    "bad image") saying why not."""
    source, _ = _image_source(value, folder)
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check, at a higher limit than ours (the warning when warnings are errors)
        count = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(value, f"{int(count[1]):,}" if count else "too many") from None
    except Exception as exc:  # Pillow's plugins raise many types on corrupt data (SyntaxError, EOFError, ...)
        raise _undecodable(value, exc) from None
    with image:
        _check_shape(value, image.width, image.height)
        if decode:
            try:
                image.load()
            except Exception as exc:  # as above; a frame over Pillow's limit included
                raise _undecodable(value, exc) from None
    return image


def _cpt_document(record, folder: str, where: str, offset: int = 0, decode: bool = True) -> CptDocument:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('"text" must be a non-empty string')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON escapes can spell a lone surrogate, which no tokenizer takes
        raise ValueError(f'"text" holds {text[exc.start]!r}, a lone surrogate, at character {exc.start}') from None
    text = text.replace(AUTHORS_MARKER, IMAGE_PLACEHOLDER)
    stray = [token for token in (VISION_START, IMAGE_PAD, VISION_END) if token in text]
    if stray:
        raise ValueError(f'"text" holds {stray[0]} outside the image marker {AUTHORS_MARKER}')
    images = record.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise ValueError(f'"images" must be a list, got {type(images).__name__}')
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    headers = [image_header(image, folder) for image in images]  # every header before any decoding
    pixels = sum(header.width * header.height for header in headers)
    if pixels > _images.MAX_DOCUMENT_PIXELS:  # e.g. one large image named many times
        raise RecordError(f"{len(images)} images of {pixels:,} pixels in all, over the limit of "
                          f"{_images.MAX_DOCUMENT_PIXELS:,} (moca.data.images.MAX_DOCUMENT_PIXELS); refused before "
                          "decoding", "bad image")
    opened = [open_image(image, folder) for image in images] if decode else headers
    return CptDocument(text, opened, where, offset, images, folder)


def _parse(line: bytes):
    """The JSON value of one line (a UTF-8 byte order mark allowed); RecordError saying why not."""
    try:
        text = line.rstrip(b"\r\n").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecordError(f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})", "not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                          "malformed JSON") from None
    except RecursionError:
        raise RecordError("malformed JSON (nested too deeply)", "malformed JSON") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RecordError(f"malformed JSON ({exc})", "malformed JSON") from None


def _too_long(limit: int) -> RecordError:
    return RecordError(f"line longer than {limit:,} bytes (moca.data.records.MAX_LINE_BYTES)", "line too long")


def _lines(f, limit: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number from 1, byte offset, line) of each line of the binary file ``f``; the line is
    None when it is longer than ``limit`` bytes, the rest of it read past in chunks, never held."""
    number, offset = 0, 0
    while line := f.readline(limit + 1):
        number += 1
        start, offset = offset, offset + len(line)
        if len(line) > limit and not line.endswith(b"\n"):
            line = None
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                offset += len(rest)
            offset += len(rest)
        yield number, start, line


def read_records(path: str, make, bad: BadRecords | None = None, strict: bool = False,
                 blank_is_bad: bool = False) -> Iterator:
    """``make(record, folder, where, offset)`` for each line of a JSON Lines file, in order
    (``folder``: the file's, for relative image paths; ``where``: "file:line"). A line longer
    than ``MAX_LINE_BYTES``, not UTF-8, not JSON, or that ``make`` refuses (ValueError) is
    counted in ``bad`` and skipped with a warning naming file and line, or raises DataError when
    ``strict``. Blank lines are passed over, or with ``blank_is_bad`` are bad records too."""
    bad = bad if bad is not None else BadRecords()
    folder = os.path.dirname(os.path.abspath(path))
    limit = MAX_LINE_BYTES
    with open_regular(path, "") as f:
        for number, start, line in _lines(f, limit):
            if line is not None and not line.strip() and not blank_is_bad:
                continue
            where = f"{path}:{number}"
            try:
                if line is None:
                    raise _too_long(limit)
                if not line.strip():
                    raise RecordError("blank line", "blank line")
                item = make(_parse(line), folder, where, start)
            except ValueError as exc:
                reject(where, exc, bad, strict)
                continue
            yield item


def table_records(path: str, make, bad: BadRecords | None = None, strict: bool = False,
                  columns: tuple[str, ...] | None = None, required: tuple[str, ...] = (),
                  group: int | None = None) -> Iterator:
    """``make(row, folder, where, number)`` for each row of a Parquet or Arrow file, in order (of
    row group ``group`` only, when given; ``columns``: those read, None for all; ``number``: the
    row's, from 0), bad rows counted and skipped as ``read_records`` does. ValueError naming the
    file when it is not such a file or lacks one of the ``required`` columns."""
    bad = bad if bad is not None else BadRecords()
    reader = shards.rows_of(path)
    missing = [name for name in required if name not in reader.columns]
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r} column (it has {', '.join(sorted(reader.columns))})")
    columns = tuple(sorted(reader.columns)) if columns is None else columns
    folder = os.path.dirname(os.path.abspath(path))
    for g in range(shards.groups(path)) if group is None else [group]:
        for number, row in shards.group_rows(path, g, columns):
            where = shards.row_where(path, number)
            try:
                item = make(row, folder, where, number)
            except ValueError as exc:
                reject(where, exc, bad, strict)
                continue
            yield item


def records(path: str, make, bad: BadRecords | None = None, strict: bool = False,
            columns: tuple[str, ...] | None = None, required: tuple[str, ...] = (),
            group: int | None = None) -> Iterator:
    """``read_records`` of a JSON Lines file, ``table_records`` of a Parquet or Arrow file."""
    if shards.kind(path) == "jsonl":
        return read_records(path, make, bad, strict)
    return table_records(path, make, bad, strict, columns, required, group)


def reject(where: str, exc: ValueError, bad: BadRecords, strict: bool, stacklevel: int = 3) -> None:
    """A bad record at ``where`` (``exc`` saying why): DataError under ``strict``, else counted in
    ``bad`` and warned about; every reader of records handles them here."""
    if strict:
        raise DataError(f"{where}: {exc}") from None
    bad.add(where, str(exc), getattr(exc, "kind", "invalid record"))
    warnings.warn(f"{where}: {exc}; record skipped", stacklevel=stacklevel)


def load_record(path: str, offset: int, where: str, make, columns: tuple[str, ...] | None = None):
    """``make`` of the line starting at byte ``offset`` of ``path`` or, in a Parquet or Arrow file,
    of row ``offset`` (its ``columns``, None for all); ValueError (its message starting with
    ``where``) when it cannot be read."""
    if shards.kind(path) != "jsonl":
        try:
            reader = shards.rows_of(path)
            row = reader.row(offset, tuple(sorted(reader.columns if columns is None else
                                                  set(columns) & reader.columns)))
            return make(row, os.path.dirname(os.path.abspath(path)), where, offset)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    with open_regular(path, "") as f:
        f.seek(offset)
        line = f.readline(MAX_LINE_BYTES + 1)
    try:
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise _too_long(MAX_LINE_BYTES)
        return make(_parse(line), os.path.dirname(os.path.abspath(path)), where, offset)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_cpt(path: str, bad: BadRecords | None = None, strict: bool = False,
             decode: bool = True, group: int | None = None) -> Iterator[CptDocument]:
    """The valid CPT documents of a JSON Lines, Parquet or Arrow file (of one row ``group`` of the
    latter, when given), in order. Bad records (malformed JSON, a missing or corrupt image, an
    empty document, placeholders not matching images) are counted in ``bad`` and skipped with a
    warning, or raise DataError when ``strict``. ``decode=False`` reads only the images' headers
    (for indexing a corpus by cost). A Parquet or Arrow file without a "text" column is a
    ValueError naming it."""
    return records(path, lambda r, folder, where, offset: _cpt_document(r, folder, where, offset, decode),
                   bad, strict, CPT_COLUMNS, ("text",), group)


def load_cpt(path: str, offset: int, where: str, decode: bool = True) -> CptDocument:
    """The document whose line starts at byte ``offset`` of ``path`` (or, in a Parquet or Arrow
    file, of row ``offset``), images decoded (or, with ``decode=False``, their headers only);
    ValueError (its message starting with ``where``) when it cannot be read."""
    return load_record(path, offset, where, lambda r, folder, w, o: _cpt_document(r, folder, w, o, decode),
                       CPT_COLUMNS)
