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


@dataclass
class CptDocument:
    text: str
    images: list[Image.Image]
    where: str  # "file:line"


def open_image(value, folder: str) -> Image.Image:
    """A PIL image (decoded) from a path or base64 bytes; ValueError saying why not."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"an image must be a path or base64 string, got {type(value).__name__}")
    path = value if os.path.isabs(value) else os.path.join(folder, value)
    try:
        if os.path.isfile(path):
            with Image.open(path) as image:
                image.load()
                return image
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            image.load()
            return image
    except (binascii.Error, ValueError) as exc:
        if os.path.isfile(path):
            raise ValueError(f"image {value!r} could not be decoded: {exc}") from None
        raise ValueError(f"image {value[:60]!r} is neither a file nor base64 image data") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {value[:60]!r} could not be decoded: {exc}") from None


def _cpt_document(record, folder: str, where: str) -> CptDocument:
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
    return CptDocument(text, [open_image(image, folder) for image in images], where)


def read_cpt(path: str, bad: BadRecords | None = None, strict: bool = False) -> Iterator[CptDocument]:
    """The valid CPT documents of a JSON Lines file, in order. Bad records (malformed JSON, a
    missing or corrupt image, an empty document, placeholders not matching images) are counted
    in ``bad`` and skipped with a warning, or raise DataError when ``strict``."""
    bad = bad if bad is not None else BadRecords()
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
                yield _cpt_document(record, folder, where)
            except ValueError as exc:
                if strict:
                    raise DataError(f"{where}: {exc}") from None
                bad.add(where, str(exc), "malformed JSON" if str(exc).startswith("malformed JSON") else "invalid record")
                warnings.warn(f"{where}: {exc}; record skipped", stacklevel=2)
