"""What moca logs, caught as lines: the messages of the ``moca`` logger (and its children) at
INFO and above while a block runs, as a program that routes moca's logging would get them."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def logged(name: str = "moca") -> Iterator[list[str]]:
    lines: list[str] = []
    logger, handler = logging.getLogger(name), _Lines(lines)
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
