"""Random encoded documents for the tiny model's tests (byte-level ids, pixel rows, grids)."""
import torch

from moca.data.cpt import Encoded
from moca.model.qwen import TINY_SPECIALS

IMAGE = TINY_SPECIALS["image_token_id"]


def random_document(n_text: int, seed: int, grid: tuple[int, int, int] | None = None, at: int = 0) -> Encoded:
    """``n_text`` random text ids; with ``grid`` (t, h, w patches) one image of t*h*w/4 merged
    tokens and its random pixel rows, placed before text id ``at``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n_text,), generator=gen)
    rows, grids = torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long)
    if grid:
        t, h, w = grid
        image = torch.cat([torch.tensor([TINY_SPECIALS["vision_start_token_id"]]), torch.full((t * h * w // 4,), IMAGE),
                           torch.tensor([TINY_SPECIALS["vision_end_token_id"]])])
        ids = torch.cat([ids[:at], image, ids[at:]])
        rows, grids = torch.randn(t * h * w, 1176, generator=gen), torch.tensor([grid])
    return Encoded(ids, rows, grids, f"doc{seed}")
