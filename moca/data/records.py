"""JSON Lines records on disk (DESIGN.md section 5), read one line at a time, with bad records
counted and skipped with a warning that names file and line, or fatal in strict mode.

A CPT document is ``{"text": "... <image> ...", "images": [image, ...]}`` with one ``<image>``
placeholder per image, in order. An image is a path (relative to the file's folder, or absolute)
or base64-encoded bytes (optionally as a ``data:image/...;base64,`` URL).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image, UnidentifiedImageError

IMAGE_PLACEHOLDER = "<image>"


class DataError(ValueError):
    """A bad record in strict mode: the message names file and line."""


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

    def report(self, log) -> None:
        """One line through ``log`` saying how many records were skipped, why, and the first."""
        if self.total:
            log(f"skipped {self.total} bad records ({dict(self.counts)}); first: {self.examples[0]}")


@dataclass
class CptDocument:
    text: str
    images: list[Image.Image]  # decoded, or (read_cpt(decode=False)) only their headers: size only
    where: str                 # "file:line"
    offset: int = 0            # byte offset of the line in its file (see load_cpt)
    sources: list = field(default_factory=list)  # each image's JSON value (path or base64)
    folder: str = ""           # what relative image paths are relative to


def _image_source(value, folder: str):
    """(a path or a BytesIO of the decoded base64, the path tried) of an image's JSON value."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"an image must be a path or base64 string, got {type(value).__name__}")
    path = value if os.path.isabs(value) else os.path.join(folder, value)
    if os.path.isfile(path):
        return path, path
    try:
        return io.BytesIO(base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value,
                                           validate=True)), path
    except (binascii.Error, ValueError):
        raise ValueError(f"image {value[:60]!r} is neither a file nor base64 image data") from None


def image_bytes(value, folder: str) -> bytes:
    """The encoded bytes (PNG, JPEG, ...) of an image's JSON value, for decoders other than Pillow."""
    source, _ = _image_source(value, folder)
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    with open(source, "rb") as f:
        return f.read()


def open_image(value, folder: str, decode: bool = True) -> Image.Image:
    """A PIL image from a path or base64 bytes, decoded, or with ``decode=False`` only its header
    read (its ``size`` is all that is usable); ValueError saying why not."""
    source, path = _image_source(value, folder)
    try:
        with Image.open(source) as image:
            if decode:
                image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"image {value[:60]!r} could not be decoded: {exc}") from None


def _cpt_document(record, folder: str, where: str, offset: int = 0, decode: bool = True) -> CptDocument:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('"text" must be a non-empty string')
    images = record.get("images") or []
    if not isinstance(images, list):
        raise ValueError('"images" must be a list')
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    return CptDocument(text, [open_image(image, folder, decode) for image in images], where, offset, images, folder)


def _parse(line: bytes) -> dict:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"malformed JSON ({detail})") from None


def read_records(path: str, make, bad: BadRecords | None = None, strict: bool = False) -> Iterator:
    """``make(record, folder, where, offset)`` for each line of a JSON Lines file, in order
    (``folder``: the file's, for relative image paths; ``where``: "file:line"). A line that is
    malformed JSON or that ``make`` refuses (ValueError) is counted in ``bad`` and skipped with a
    warning naming file and line, or raises DataError when ``strict``."""
    bad = bad if bad is not None else BadRecords()
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield make(_parse(line), folder, where, start)
            except ValueError as exc:
                if strict:
                    raise DataError(f"{where}: {exc}") from None
                bad.add(where, str(exc), "malformed JSON" if str(exc).startswith("malformed JSON") else "invalid record")
                warnings.warn(f"{where}: {exc}; record skipped", stacklevel=3)


def load_record(path: str, offset: int, where: str, make):
    """``make`` of the line starting at byte ``offset`` of ``path``; ValueError (its message
    starting with ``where``) when it cannot be read."""
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.readline()
    try:
        return make(_parse(line), os.path.dirname(os.path.abspath(path)), where, offset)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_cpt(path: str, bad: BadRecords | None = None, strict: bool = False,
             decode: bool = True) -> Iterator[CptDocument]:
    """The valid CPT documents of a JSON Lines file, in order. Bad records (malformed JSON, a
    missing or corrupt image, an empty document, placeholders not matching images) are counted
    in ``bad`` and skipped with a warning, or raise DataError when ``strict``. ``decode=False``
    reads only the images' headers (for indexing a corpus by cost)."""
    return read_records(path, lambda r, folder, where, offset: _cpt_document(r, folder, where, offset, decode),
                        bad, strict)


def load_cpt(path: str, offset: int, where: str, decode: bool = True) -> CptDocument:
    """The document whose line starts at byte ``offset`` of ``path``, images decoded (or, with
    ``decode=False``, their headers only); ValueError (its message starting with ``where``) when
    it cannot be read."""
    return load_record(path, offset, where, lambda r, folder, w, o: _cpt_document(r, folder, w, o, decode))
