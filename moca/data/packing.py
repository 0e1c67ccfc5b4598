"""Token-budget packing of whole documents into micro-batches.

Best-fit decreasing: documents by cost, largest first (ties by index, so the result depends only
on the costs), each into the open micro-batch with the least room that still holds it, a new one
when none does. No document is split: the caller truncates documents longer than the budget
first. ``pack`` runs the C++ version (``csrc/cpu/packer.cpp``, built by setup.py) where it is
built, for corpora of millions of documents; ``pack_python`` is the reference and the fallback.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

try:
    from ._packer import pack as _pack_cpp
except ImportError:  # not built here: the Python version serves
    _pack_cpp = None


def pack(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Micro-batches as lists of document indices (each list in increasing index order), their
    costs summing to at most ``budget``; micro-batches ordered by their first document."""
    if _pack_cpp is None:
        return pack_python(costs, budget)
    try:
        return _pack_cpp(list(costs), budget)
    except ValueError:
        raise
    except TypeError as exc:  # costs that do not convert to 64-bit integers
        raise ValueError(f"costs must be integers: {exc}") from None


def pack_python(costs: Sequence[int], budget: int) -> list[list[int]]:
    """``pack`` in Python."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    for i, cost in enumerate(costs):
        if not 1 <= cost <= budget:
            raise ValueError(f"document {i} costs {cost} tokens; costs must be in [1, budget={budget}] "
                             "(truncate long documents first)")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(room, (costs[i], -1))
        if at == len(room):
            bins.append([i])
            left, b = budget - costs[i], len(bins) - 1
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            left -= costs[i]
        if left > 0:
            bisect.insort(room, (left, b))
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def utilization(batches: Sequence[Sequence[int]], costs: Sequence[int], budget: int) -> float:
    """Share of the micro-batches' token budget that documents fill."""
    return sum(costs[i] for b in batches for i in b) / (budget * len(batches)) if batches else 0.0
