"""Token-budget packing of whole documents into micro-batches.

Best-fit decreasing: documents by cost, largest first (ties by index, so the result depends only
on the costs), each into the open micro-batch with the least room that still holds it, a new one
when none does. No document is split: the caller truncates documents longer than the budget
first. A C++ version of the same algorithm (``csrc/cpu``) is to come for corpora of millions of
documents; this one is the reference and the fallback.
"""
from __future__ import annotations

import bisect
from typing import Sequence


def pack(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Micro-batches as lists of document indices (each list in increasing index order), their
    costs summing to at most ``budget``; micro-batches ordered by their first document."""
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
