"""Several sources in one run, each sampled as the authors sample theirs.

``data.documents`` (and ``data.pairs``) name one or more sources, comma-separated; each is a file
or a folder (``moca.data.shards.source_files``), optionally followed by how much of it an epoch
takes: ``PATH=N``, N of its usable records drawn at random without replacement (all when it has
fewer), or ``PATH=Wx``, W times its records (``=0.5x`` half of them, ``=2x`` each twice, ``=2.5x``
each twice and half of them once more). A source without either takes ``sample_per_source``
records when that is set (the authors' ``--num_sample_per_subset 500000``, the ``moca`` recipe's
value), else all of them. The draws are seeded by ``data.sample_seed`` (the authors' 1) and the
source's place in the list, so a run and its resumption draw the same records.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_AMOUNT = re.compile(r"^(?:(\d+)|(\d+(?:\.\d*)?|\.\d+)x)$")


@dataclass(frozen=True)
class Source:
    """One source: its path and how much of it an epoch takes (``count`` records, or ``weight``
    times its records; neither: ``sample_per_source``, else all)."""
    path: str
    count: int | None = None
    weight: float | None = None


def parse_sources(text: str, what: str = "data.documents") -> list[Source]:
    """The sources of a ``data.documents`` / ``data.pairs`` setting; ValueError naming ``what``
    and the part that is wrong."""
    out = []
    for part in text.split(","):
        part = part.strip()
        path, amount = part.rsplit("=", 1) if "=" in part else (part, None)
        found = _AMOUNT.match(amount.strip()) if amount is not None else None
        if amount is not None and not found:
            raise ValueError(f"{what}: {part!r}: after '=' comes a count (=500000) or a weight (=0.5x)")
        path = path.strip()
        if not path:
            raise ValueError(f"{what}: {text!r} has an empty source (sources are comma-separated paths)")
        if found and found[1]:
            if int(found[1]) < 1:
                raise ValueError(f"{what}: {part!r}: a count must be at least 1")
            out.append(Source(path, count=int(found[1])))
        elif found:
            weight = float(found[2])
            if weight <= 0:
                raise ValueError(f"{what}: {part!r}: a weight must be positive")
            out.append(Source(path, weight=weight))
        else:
            out.append(Source(path))
    return out


def drawn(source: Source, size: int, default_count: int | None, seed: int, place: int) -> np.ndarray | None:
    """Which of a source's ``size`` usable records an epoch takes, as sorted indices (uint32 below
    2**32 records: 4 bytes a drawn record), or None for all of them once each. ``default_count``:
    ``sample_per_source``; ``place``: the source's place in the list (with ``seed``, what seeds
    the draw)."""
    rng = np.random.default_rng([seed, place])
    count = source.count if source.count is not None else default_count if source.weight is None else None
    dtype = np.uint32 if size < 2**32 else np.int64
    if count is not None:
        return None if count >= size else np.sort(rng.choice(size, count, replace=False)).astype(dtype)
    if source.weight is None or source.weight == 1:
        return None
    whole, part = divmod(source.weight, 1)
    extra = rng.choice(size, round(part * size), replace=False)
    return np.sort(np.concatenate([np.tile(np.arange(size), int(whole)), extra])).astype(dtype)

