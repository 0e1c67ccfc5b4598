"""MoCa's stage-1 corruption.

MLM: every token that is not special is masked independently with probability ``ratio`` (0.4)
and always replaced by ``<|mask|>``; its label is the original id, -100 elsewhere. MAE: merged
image tokens are chosen, either exactly round(ratio * n) of each document's (``count``) or each
independently with probability ``ratio`` (``bernoulli``, the authors' draw, which can mask an
image of one token); each owns 4 consecutive pixel rows, which are all replaced by one Gaussian
row shared by the micro-batch; the original rows are the targets.
"""
from __future__ import annotations

from typing import Literal

import torch

IGNORE = -100
ROWS_PER_TOKEN = 4  # 2 x 2 patches merge into one language-model token


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, ratio: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids with the chosen tokens replaced by ``mask_id``, labels: the original id where
    masked, -100 elsewhere). ``maskable`` is False for special tokens, which are never masked."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MLM ratio must be in [0, 1], got {ratio}")
    chosen = (torch.rand(ids.shape, generator=generator) < ratio) & maskable
    return torch.where(chosen, mask_id, ids), torch.where(chosen, ids, IGNORE)


def next_token_labels(ids: torch.Tensor, cu_seqlens: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction over a packed row: at each position the id of the next
    token of the same document where that token is ``maskable`` (not special), -100 elsewhere."""
    labels = torch.full_like(ids, IGNORE)
    follows = maskable[1:].clone()
    follows[cu_seqlens[1:-1].long() - 1] = False  # a document's last token has no next token
    labels[:-1] = torch.where(follows, ids[1:], IGNORE)
    return labels


def choose_image_tokens(n_tokens: int, ratio: float, generator: torch.Generator,
                        sampling: Literal["count", "bernoulli"] = "count") -> torch.Tensor:
    """A bool mask over ``n_tokens`` merged image tokens: exactly round(ratio * n) chosen
    (``count``), or each chosen independently with probability ``ratio`` (``bernoulli``)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MAE ratio must be in [0, 1], got {ratio}")
    if sampling == "bernoulli":
        return torch.rand(n_tokens, generator=generator) < ratio
    if sampling != "count":
        raise ValueError(f"MAE sampling must be count or bernoulli, got {sampling!r}")
    chosen = torch.zeros(n_tokens, dtype=torch.bool)
    chosen[torch.randperm(n_tokens, generator=generator)[: round(ratio * n_tokens)]] = True
    return chosen


def corrupt_rows(rows: torch.Tensor, token_mask: torch.Tensor,
                 noise_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows with every row of a chosen token replaced by ``noise_row``, the original rows of the
    chosen tokens in order: the MAE targets). ``rows`` is (4 * n_tokens, P)."""
    if rows.shape[0] != ROWS_PER_TOKEN * token_mask.shape[0]:
        raise ValueError(f"{rows.shape[0]} pixel rows for {token_mask.shape[0]} merged tokens "
                         f"({ROWS_PER_TOKEN} rows each)")
    row_mask = token_mask.repeat_interleave(ROWS_PER_TOKEN)
    corrupted = rows.clone()
    corrupted[row_mask] = noise_row.to(rows.dtype)
    return corrupted, rows[row_mask]
