"""moca.data.images reproduces Qwen2-VL's image processor: sizes, row layout, values."""
import numpy as np
import pytest
from PIL import Image

from moca.data.images import FACTOR, MAX_PIXELS, MIN_PIXELS, ROW, fitted_size, image_rows, merged_tokens

SIZES = [(300, 200), (50, 40), (2000, 1500), (28, 28), (97, 333), (1, 150)]


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", SIZES)
def test_matches_the_transformers_processor(width, height):
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    image = _image(width, height)
    rows, grid = image_rows(image)
    ref = pil.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=[image],
                                                                                     return_tensors="np")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(rows, ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("width,height", SIZES)
def test_sizes_are_multiples_of_28_within_the_bounds(width, height):
    h, w = fitted_size(height, width)
    assert h % FACTOR == 0 and w % FACTOR == 0
    assert MIN_PIXELS <= h * w <= MAX_PIXELS


def test_rows_are_merge_groups_of_patches():
    # A 56 x 56 image at its own size: a 4 x 4 grid of patches, one merged token per 2 x 2 group.
    # Row r holds channel-major (3, 2 frames, 14, 14) values of its patch; the patch of row r is
    # group (r // 4) in row-major order over the 2 x 2 groups, position (r % 4) inside it.
    image = _image(56, 56, seed=3)
    rows, grid = image_rows(image, min_pixels=56 * 56, max_pixels=56 * 56)
    assert grid == (1, 4, 4) and rows.shape == (16, ROW) and merged_tokens(grid) == 4
    pixels = (np.asarray(image, dtype=np.float32) / 255 - [0.48145466, 0.4578275, 0.40821073]) / \
        [0.26862954, 0.26130258, 0.27577711]
    for r in range(16):
        group, inside = divmod(r, 4)
        y = (group // 2) * 2 + inside // 2
        x = (group % 2) * 2 + inside % 2
        patch = pixels[y * 14:(y + 1) * 14, x * 14:(x + 1) * 14].transpose(2, 0, 1)  # (3, 14, 14)
        expected = np.stack([patch, patch], 1).reshape(-1)
        np.testing.assert_allclose(rows[r], expected, atol=1e-5)


@pytest.mark.parametrize("width,height,message", [(0, 10, "image of 0 x 10 pixels"),
                                                  (1, 300, "aspect ratio over 200")])
def test_bad_sizes(width, height, message):
    with pytest.raises(ValueError, match=message):
        fitted_size(height, width)
