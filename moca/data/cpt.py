"""Stage-1 (CPT) documents to packed, corrupted micro-batches.

``encode`` turns a document into token ids (each ``<image>`` becomes ``<|vision_start|>``, one
``<|image_pad|>`` per merged image token, ``<|vision_end|>``) and pixel rows; a document longer
than the limit is truncated, and an image that would cross the limit is dropped whole, with the
rest of the document. ``collate`` packs documents into one row with their ``cu_seqlens`` and
per-document M-RoPE positions, masks text for MLM and image tokens for MAE, and keeps the targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moca_kernels.varlen import lengths_to_cu_seqlens

from .images import MAX_PIXELS, MIN_PIXELS, PATCH, ROW, fitted_size, image_rows, merged_tokens
from .masking import ROWS_PER_TOKEN, choose_image_tokens, corrupt_rows, mask_tokens, next_token_labels
from .records import IMAGE_PLACEHOLDER, CptDocument, image_bytes
from .tokenizer import Specials, maskable


@dataclass
class Encoded:
    ids: torch.Tensor     # (L,) int64
    rows: torch.Tensor    # (4 * image tokens, 1176) float32
    grids: torch.Tensor   # (images, 3) int64
    where: str


def layout(doc: CptDocument, tokenizer, max_tokens: int, min_pixels: int = MIN_PIXELS,
           max_pixels: int = MAX_PIXELS) -> tuple[list[int], list[tuple[int, int, int]]]:
    """(token ids, grids of the images kept) of a document, from the images' sizes alone: what
    ``encode`` produces, and the document's cost for packing, without decoding any pixel."""
    sp = tokenizer.specials
    ids: list[int] = []
    grids = []
    for k, piece in enumerate(doc.text.split(IMAGE_PLACEHOLDER)):
        ids += tokenizer.encode(piece)[: max_tokens - len(ids)]
        if len(ids) >= max_tokens or k == len(doc.images):
            break
        width, height = doc.images[k].size
        h, w = fitted_size(height, width, min_pixels, max_pixels)
        grid = (1, h // PATCH, w // PATCH)
        block = [sp.vision_start] + [sp.image] * merged_tokens(grid) + [sp.vision_end]
        if len(ids) + len(block) > max_tokens:
            break  # never cut an image in half: drop it and what follows
        ids += block
        grids.append(grid)
    return ids, grids


def encode(doc: CptDocument, tokenizer, max_tokens: int, min_pixels: int = MIN_PIXELS,
           max_pixels: int = MAX_PIXELS, decoder=None) -> Encoded:
    """``layout`` plus the pixel rows of the images kept: decoded by Pillow (``doc``'s images
    decoded), or by ``decoder`` (a ``moca.data.dali.DaliImages``) from their encoded bytes."""
    ids, grids = layout(doc, tokenizer, max_tokens, min_pixels, max_pixels)
    try:
        if decoder is None:
            rows = [image_rows(image, min_pixels, max_pixels)[0] for image in doc.images[: len(grids)]]
        else:
            rows = decoder.rows([image_bytes(value, doc.folder) for value in doc.sources[: len(grids)]],
                                [(h * PATCH, w * PATCH) for _, h, w in grids])
    except (ValueError, OSError) as exc:  # e.g. a mode Pillow cannot convert to RGB, a file gone since indexing
        raise ValueError(f"{doc.where}: {exc}") from None
    return Encoded(torch.tensor(ids, dtype=torch.long),
                   torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, ROW),
                   torch.tensor(grids, dtype=torch.long).reshape(-1, 3), doc.where)


def document_positions(ids: torch.Tensor, grids: torch.Tensor, image_token_id: int, merge: int = 2) -> torch.Tensor:
    """M-RoPE position ids (3, len) of one document, starting at 0: text tokens count up on all
    three axes; an image's tokens take (frame, row, column) of the merged grid, offset by the
    position reached, and the text after it continues from the largest position plus one (as
    Qwen2.5-VL's get_rope_index does for still images). ``grids`` (n_images, 3) in order."""
    values = ids.tolist()
    out, current, i, image = [], 0, 0, 0
    while i < len(values):
        if values[i] != image_token_id:
            out.append(torch.full((3, 1), current, dtype=torch.long))
            current += 1
            i += 1
            continue
        t, h, w = (int(x) for x in grids[image])
        h, w = h // merge, w // merge
        frame = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
        row = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
        col = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
        block = torch.stack([frame, row, col]) + current
        out.append(block)
        current = int(block.max()) + 1
        i += t * h * w
        image += 1
    return torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)


def pack_documents(docs: list[Encoded], image_token_id: int) -> dict:
    """Documents as one packed row, uncorrupted: ``input_ids`` (1, L), ``cu_seqlens`` int32,
    ``max_seqlen``, ``lengths``, per-document M-RoPE ``position_ids`` (3, 1, L), ``pixel_values``
    (rows, 1176) and ``image_grid_thw``. What the embedding stage feeds the model."""
    lengths = [d.ids.numel() for d in docs]
    return dict(input_ids=torch.cat([d.ids for d in docs])[None],
                cu_seqlens=lengths_to_cu_seqlens(torch.tensor(lengths)), max_seqlen=max(lengths), lengths=lengths,
                position_ids=torch.cat([document_positions(d.ids, d.grids, image_token_id) for d in docs], 1)[:, None],
                pixel_values=torch.cat([d.rows for d in docs]), image_grid_thw=torch.cat([d.grids for d in docs]))


def collate(docs: list[Encoded], specials: Specials, mlm_ratio: float, mae_ratio: float,
            generator: torch.Generator, mae_sampling: str = "count", next_token: bool = False) -> dict:
    """One packed micro-batch (``pack_documents``) corrupted for stage 1: ``input_ids`` with MLM
    masks applied, ``labels`` (L,), ``pixel_values`` with the MAE-masked tokens' rows replaced by
    one shared Gaussian row, ``mae_positions`` (the masked image tokens' places in the row, in
    order) and ``mae_targets`` (their 4 original rows each, in the same order). ``mae_sampling``:
    ``moca.data.masking.choose_image_tokens``'s. ``next_token``: the text is left whole and
    ``labels`` are each position's next token instead (``moca.data.masking.next_token_labels``)."""
    batch = pack_documents(docs, specials.image)
    ids = batch["input_ids"][0]
    text = maskable(ids, specials)
    if next_token:  # nothing masked: each text token is the target of the position before it
        inputs, labels = ids, next_token_labels(ids, batch["cu_seqlens"], text)
    else:
        inputs, labels = mask_tokens(ids, text, specials.mask, mlm_ratio, generator)
    token_mask = torch.cat([choose_image_tokens(d.rows.shape[0] // ROWS_PER_TOKEN, mae_ratio, generator,
                                                mae_sampling) for d in docs])
    noise = torch.randn(ROW, generator=generator)
    pixels, targets = corrupt_rows(batch["pixel_values"], token_mask, noise)
    image_places = (ids == specials.image).nonzero().squeeze(1)
    return dict(batch, input_ids=inputs[None], labels=labels, pixel_values=pixels,
                mae_positions=image_places[token_mask], mae_targets=targets)
