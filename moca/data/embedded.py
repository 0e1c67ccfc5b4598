"""The embedded default dataset: small, deterministic, generated on the spot in the same JSON
Lines format as user data, so that ``moca train`` with nothing else shows the whole pipeline work.

Documents are short English texts about rendered pictures: each image is a few colored shapes on
a plain background, and the text around it names them ("a red circle and a blue square on a
white background"), so that masked words are predictable from the image and the sentence
pattern, and MLM accuracy climbs well above chance. A share of documents are text only.
"""
from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 170), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
OPENERS = ("Here is a picture.", "Look at this image.", "This is a small drawing.", "A simple scene.")
TEXT_ONLY = ("The quick brown fox jumps over the lazy dog.", "Colors and shapes make simple pictures.",
             "A circle is round and a square has four equal sides.", "A triangle has three sides and three corners.",
             "Red, green and blue are the primary colors of light.", "Yellow and purple are far apart on the wheel.")


def _draw(shapes: list[tuple[str, str]], background: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    for k, (color, shape) in enumerate(shapes):
        r = size // 6
        cx = size // 4 + (k % 2) * size // 2 + rng.randint(-4, 4)
        cy = size // 4 + (k // 2) * size // 2 + rng.randint(-4, 4)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def _write_jsonl(path: str, records) -> str:
    """``records`` one a line into ``path``, renamed into place when whole (a file there is complete)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write(folder: str, documents: int = 240, seed: int = 0, image_size: int = 56) -> str:
    """Write ``documents`` CPT records (and their PNGs) under ``folder``; returns the .jsonl path.
    The same arguments give the same files."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)

    def records():
        for i in range(documents):
            if i % 4 == 3:
                yield {"text": " ".join(rng.sample(TEXT_ONLY, 2))}
                continue
            colors = [c for c in COLORS if c not in ("white", "black")]
            shapes = [(rng.choice(colors), rng.choice(SHAPES)) for _ in range(rng.randint(1, 2))]
            background = rng.choice(("white", "black"))
            name = f"images/{i:04d}.png"
            _draw(shapes, background, image_size, rng).save(os.path.join(folder, name))
            things = " and ".join(f"a {c} {s}" for c, s in shapes)
            yield {"text": f"{rng.choice(OPENERS)} <image> It shows {things} on a {background} background.",
                   "images": [name]}
    return _write_jsonl(os.path.join(folder, "cpt.jsonl"), records())


def _pictures(folder: str, count: int, seed: int, image_size: int) -> list[tuple[str, str]]:
    """``count`` rendered pictures under ``folder/images`` with their descriptions: (path, text)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    out = []
    colors = [c for c in COLORS if c not in ("white", "black")]
    for i in range(count):
        shapes = [(rng.choice(colors), rng.choice(SHAPES)) for _ in range(rng.randint(1, 2))]
        background = rng.choice(("white", "black"))
        name = f"images/pair-{seed}-{i:04d}.png"
        _draw(shapes, background, image_size, rng).save(os.path.join(folder, name))
        out.append((name, " and ".join(f"a {c} {s}" for c, s in shapes) + f" on a {background} background"))
    return out


def write_pairs(folder: str, pairs: int = 192, seed: int = 0, image_size: int = 56) -> str:
    """Write ``pairs`` stage-2 records of two tasks (and their PNGs) under ``folder``: find the
    picture a description names (text to image), and describe a picture (image to text), each
    with two other pictures as hard negatives. Returns the .jsonl path; deterministic."""
    pictures = _pictures(folder, pairs, seed + 1, image_size)

    def records():
        for i, (image, text) in enumerate(pictures):
            others = [pictures[(i + k) % len(pictures)] for k in (1, 2)]
            if i % 2 == 0:
                yield {"query": {"text": f"Find the picture of {text}."}, "positive": {"image": image},
                       "negatives": [{"image": o[0]} for o in others], "task": "text-to-image"}
            else:
                yield {"query": {"image": image, "text": "<image> What does this picture show?"},
                       "positive": {"text": text}, "negatives": [{"text": o[1]} for o in others],
                       "task": "image-to-text"}
    return _write_jsonl(os.path.join(folder, "pairs.jsonl"), records())


def write_eval(folder: str, queries: int = 48, seed: int = 1000, image_size: int = 56) -> str:
    """Write held-out evaluation records (new pictures, their own seed) under ``folder``: two
    MMEB-style tasks with 4 candidates, the positive first (text to image, image to text), and
    one retrieval task (a description against 8 pictures). Returns the .jsonl path."""
    pictures = _pictures(folder, queries, seed, image_size)
    n = len(pictures)

    def records():
        for i, (image, text) in enumerate(pictures):
            others = [pictures[(i + k) % n] for k in range(1, 8)]
            kind = i % 3
            if kind == 0:
                yield {"query": {"text": f"Find the picture of {text}."},
                       "candidates": [{"image": image}] + [{"image": o[0]} for o in others[:3]],
                       "task": "text-to-image"}
            elif kind == 1:
                yield {"query": {"image": image, "text": "<image> What does this picture show?"},
                       "candidates": [{"text": text}] + [{"text": o[1]} for o in others[:3]],
                       "task": "image-to-text"}
            else:
                yield {"query": {"text": f"Find the picture of {text}."}, "positives": [{"image": image}],
                       "candidates": [{"image": o[0]} for o in others], "task": "retrieval"}
    return _write_jsonl(os.path.join(folder, "eval.jsonl"), records())
