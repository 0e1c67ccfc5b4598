"""Where moca's messages go. Library code logs to module loggers under ``moca``
(``logging.getLogger(__name__)``) and configures nothing, so a program that imports moca routes,
filters or silences its messages with ``logging`` as it does any library's. The ``moca`` command
is the one place that configures them: ``console`` prints them for the length of a command, as
``print`` would, with ``--quiet`` (warnings and errors only) and ``--verbose`` (debug too).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

ROOT = "moca"
LEVELS = {"quiet": logging.WARNING, "default": logging.INFO, "verbose": logging.DEBUG}


class ConsoleHandler(logging.Handler):
    """Each message as its text alone: info and debug on stdout, warnings and errors on stderr.
    Written through ``tqdm.write``, which clears the progress bars on the terminal, writes the
    line and draws them again, so that a message never tears a bar. The streams are looked up at
    each message (a caller that swaps ``sys.stdout`` gets the lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:  # logging's contract: a failing handler reports itself, never the caller
            self.handleError(record)


@contextlib.contextmanager
def console(level: int) -> Iterator[None]:
    """moca's messages at ``level`` and above printed by a ``ConsoleHandler`` while the block runs;
    the ``moca`` logger's level and handlers are restored after it, so a program that calls
    ``moca.cli.main`` keeps its own logging configuration."""
    logger = logging.getLogger(ROOT)
    handler, before = ConsoleHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def bars_shown() -> bool:
    """Whether moca draws its progress bars: unless the ``moca`` logger was set above INFO
    (``--quiet``, or a program that silences moca), which hides the bars with the messages. A
    program that configures no logging keeps them."""
    level = logging.getLogger(ROOT).level
    return level == logging.NOTSET or level <= logging.INFO


@contextlib.contextmanager
def own_lines_only(name: str) -> Iterator[None]:
    """While the block runs, the info and debug messages of every moca logger but ``name`` are
    dropped (warnings and errors pass), and so are the progress bars: a command that runs others
    (``moca ablate``'s rows) shows its own lines alone. ``name`` keeps the level it had."""
    root, own = logging.getLogger(ROOT), logging.getLogger(name)
    levels = root.level, own.level
    own.setLevel(own.getEffectiveLevel())
    root.setLevel(max(logging.WARNING, root.getEffectiveLevel()))
    try:
        yield
    finally:
        root.setLevel(levels[0])
        own.setLevel(levels[1])
