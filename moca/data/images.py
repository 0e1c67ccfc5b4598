"""Images the way Qwen2-VL's processor prepares them, without transformers or torchvision.

An image is resized (bicubic) so that both sides are multiples of 28 and its pixel count lies in
[min_pixels, max_pixels], keeping the aspect ratio as closely as possible; rescaled by 1/255;
normalized with the CLIP mean and std; and cut into 14 x 14 patches. Each patch becomes one row
of 1,176 values (3 channels x 2 temporal copies x 14 x 14: a still image is its own second
frame), and the rows are ordered by 2 x 2 merge group, so rows 4k..4k+3 are the k-th merged
image token the language model sees (MoCa's unit of MAE masking).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

PATCH = 14
MERGE = 2
TEMPORAL = 2
FACTOR = PATCH * MERGE
ROW = 3 * TEMPORAL * PATCH * PATCH  # 1,176 values per patch row
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# MoCa's processor bounds: 256 to 1,024 merged tokens per image.
MIN_PIXELS = 256 * FACTOR * FACTOR
MAX_PIXELS = 1024 * FACTOR * FACTOR
# The largest image decoded at all, checked on its header before any pixel is read (by
# moca.data.records.open_image, which every reader uses): a few bytes of compressed data can declare
# billions of pixels (a decompression bomb). 8192 x 8192 (64 Mi pixels, 192 MiB as RGB) is below
# Pillow's own limit (Image.MAX_IMAGE_PIXELS), which must be raised too to go past it.
MAX_IMAGE_PIXELS = 8192 * 8192
# The most pixels the images of one document may declare together (one image may be named many times).
MAX_DOCUMENT_PIXELS = 4 * MAX_IMAGE_PIXELS


def header_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG (from its baseline, extended or progressive frame header) or a
    PNG (its IHDR), read from the encoded bytes in a few microseconds (Pillow's open takes about a
    hundred, most of it in Python): what indexing a corpus of embedded images needs. None for
    any other format or a header this does not follow to its frame: Pillow reads those."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return (width, height) if width and height else None
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xC0, 0xC1, 0xC2):
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA or length < 2 or (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return None  # a scan before any frame, a broken length, or a frame Pillow reads its own way
        i += 2 + length
    return None


def fitted_size(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after resizing: multiples of 28, pixel count within the bounds."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {width} x {height} pixels")
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"image of {width} x {height} pixels: aspect ratio over 200")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(FACTOR, math.floor(height / shrink / FACTOR) * FACTOR)
        w = max(FACTOR, math.floor(width / shrink / FACTOR) * FACTOR)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / FACTOR) * FACTOR
        w = math.ceil(width * grow / FACTOR) * FACTOR
    return h, w


def image_rows(image: Image.Image, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(pixel rows float32 (patches, 1176), grid (1, patches_h, patches_w)) of one image; the
    language model sees patches / 4 merged tokens."""
    image = image.convert("RGB")
    h, w = fitted_size(image.height, image.width, min_pixels, max_pixels)
    if (image.height, image.width) != (h, w):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    return patchify((np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)


def patchify(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``image_rows`` from a resized, normalized (h, w, 3) float32 image (sides multiples of 28)."""
    h, w = x.shape[:2]
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, 3)
    # -> (merge row, merge col, row in group, col in group, channel, patch row, patch col)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (TEMPORAL,) + x.shape[5:])
    return np.ascontiguousarray(x).reshape(gh * gw, ROW), (1, gh, gw)


def merged_tokens(grid: tuple[int, int, int]) -> int:
    """Language-model tokens of an image of this grid."""
    t, gh, gw = grid
    return t * gh * gw // (MERGE * MERGE)
