"""The embedded default dataset: small, deterministic, generated on the spot in the same JSON
Lines format as user data, so that ``moca train`` with nothing else runs the whole method, and
``moca ablate`` can measure what stage 1 adds.

A picture is one large colored shape (6 colors, 4 shapes) on a white or black background; its
description names them ("a red circle on a black background"). A fixed quarter of the 48
descriptions (chosen by a hash of the text, whatever the seed) is held out: only the evaluation
uses them, so it scores pictures and descriptions that no training data contains, made of colors,
shapes and backgrounds that the training data does contain. The shape fills most of the picture,
so that its color and outline reach several of the picture's merged tokens.

- Stage 1 (``write``): a large interleaved corpus, documents of one to three pictures, each
  followed by its description, and a few text-only documents. Masked color and shape words are
  predictable from the pictures, and masked picture patches from the descriptions.
- Stage 2 (``write_pairs``): a small labelled set of description-picture pairs (64 by default,
  against some 1,000 captioned pictures in stage 1) that names every training description once
  before any twice: 64 pairs drawn at random leave some descriptions out, and which ones moves
  stage 2 alone by as much as stage 1 adds.
- Evaluation (``write_eval``): held-out descriptions only; every negative has another description
  than its positive.
"""
from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..files import atomic_file, regular_or_absent

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 170), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
INKS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = ("white", "black")
OPENERS = ("Here is a picture.", "Look at this image.", "This is a small drawing.", "A simple scene.")
TEXT_ONLY = ("The quick brown fox jumps over the lazy dog.", "Colors and shapes make simple pictures.",
             "A circle is round and a square has four equal sides.", "A triangle has three sides and three corners.",
             "Red, green and blue are the primary colors of light.", "A diamond is a square turned on its corner.")
HELD_OUT = 4  # one description in HELD_OUT is for the evaluation only
POOL = 16  # pictures drawn at least, so that a small file still finds its negatives among them


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    def held_out(self) -> bool:
        """Whether this description belongs to the evaluation (fixed by the text, not by a seed)."""
        return zlib.crc32(self.text.encode()) % HELD_OUT == 0


def _scene(rng: random.Random, held_out: bool) -> Scene:
    while True:
        scene = Scene(rng.choice(INKS), rng.choice(SHAPES), rng.choice(BACKGROUNDS))
        if scene.held_out() == held_out:
            return scene


def _draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    r, fill = size // 3, COLORS[scene.color]
    cx, cy = size // 2 + rng.randint(-3, 3), size // 2 + rng.randint(-3, 3)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=fill)
    return image


def _balanced(rng: random.Random, count: int, held_out: bool) -> list[Scene]:
    """``count`` scenes that go through every description (held out or training) in a shuffled
    order before any comes again, so that a small set covers them all evenly."""
    every = [Scene(c, s, b) for c in INKS for s in SHAPES for b in BACKGROUNDS]
    every = [scene for scene in every if scene.held_out() == held_out]
    scenes = []
    while len(scenes) < count:
        scenes += rng.sample(every, len(every))
    return scenes[:count]


def _pictures(folder: str, count: int, seed: int, image_size: int, held_out: bool,
              prefix: str, balanced: bool = False) -> list[tuple[str, Scene]]:
    """``count`` rendered pictures under ``folder/images``: (path, scene), of held-out or of
    training descriptions, drawn independently or ``balanced`` (see ``_balanced``)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    scenes = _balanced(rng, count, held_out) if balanced else None
    out = []
    for i in range(count):
        scene = scenes[i] if balanced else _scene(rng, held_out)
        name = f"images/{prefix}-{seed}-{i:04d}.png"
        regular_or_absent(os.path.join(folder, name))  # never drawn through a link
        _draw(scene, image_size, rng).save(os.path.join(folder, name))
        out.append((name, scene))
    return out


def _others(i: int, pictures: list[tuple[str, Scene]], k: int, rng: random.Random) -> list[tuple[str, Scene]]:
    """``k`` pictures other than ``i`` whose descriptions all differ from ``i``'s and each other's."""
    chosen, seen = [], {pictures[i][1].text}
    for j in rng.sample(range(len(pictures)), len(pictures)):
        if pictures[j][1].text not in seen:
            chosen.append(pictures[j])
            seen.add(pictures[j][1].text)
            if len(chosen) == k:
                return chosen
    raise ValueError(f"{len(pictures)} pictures hold fewer than {k + 1} distinct descriptions")


def _write_jsonl(path: str, records) -> str:
    """``records`` one a line into ``path``, renamed into place when whole (a file there is complete)."""
    with atomic_file(path) as f:
        for record in records:
            f.write((json.dumps(record) + "\n").encode())
    return path


def write(folder: str, documents: int = 600, seed: int = 0, image_size: int = 56) -> str:
    """Write ``documents`` stage-1 records (and their PNGs) under ``folder``: one in eight text
    only, the others one to three pictures each followed by its description (training
    descriptions only). Returns the .jsonl path; the same arguments give the same files."""
    rng = random.Random(seed)
    sizes = [0 if i % 8 == 7 else rng.randint(1, 3) for i in range(documents)]
    pictures = iter(_pictures(folder, sum(sizes), seed, image_size, held_out=False, prefix="cpt"))

    def records():
        for size in sizes:
            if size == 0:
                yield {"text": " ".join(rng.sample(TEXT_ONLY, 2))}
                continue
            shown = [next(pictures) for _ in range(size)]
            parts = [rng.choice(OPENERS)] + [f"<image> It shows {scene.text}." for _, scene in shown]
            yield {"text": " ".join(parts), "images": [name for name, _ in shown]}
    return _write_jsonl(os.path.join(folder, "cpt.jsonl"), records())


def write_pairs(folder: str, pairs: int = 64, seed: int = 0, image_size: int = 56) -> str:
    """Write ``pairs`` stage-2 records of two tasks (and their PNGs) under ``folder``: find the
    picture a description names (text to image), and describe a picture (image to text), each
    with two pictures of other descriptions as hard negatives (training descriptions only).
    Returns the .jsonl path; deterministic."""
    pictures = _pictures(folder, max(pairs, POOL), seed + 1, image_size, held_out=False, prefix="pair",
                         balanced=True)
    rng = random.Random(seed + 2)

    def records():
        for i, (image, scene) in enumerate(pictures[:pairs]):
            others = _others(i, pictures, 2, rng)
            if i % 2 == 0:
                yield {"query": {"text": f"Find the picture of {scene.text}."}, "positive": {"image": image},
                       "negatives": [{"image": o[0]} for o in others], "task": "text-to-image"}
            else:
                yield {"query": {"image": image, "text": "<image> What does this picture show?"},
                       "positive": {"text": scene.text}, "negatives": [{"text": o[1].text} for o in others],
                       "task": "image-to-text"}
    return _write_jsonl(os.path.join(folder, "pairs.jsonl"), records())


def write_eval(folder: str, queries: int = 240, seed: int = 1000, image_size: int = 56) -> str:
    """Write held-out evaluation records (held-out descriptions, new pictures) under ``folder``:
    two MMEB-style tasks with 4 candidates, the positive first (text to image, image to text), and
    one retrieval task (a description against 8 pictures, one of them its own), a third of the
    queries each. Returns the .jsonl path. Training runs of every seed are scored on the default
    seed's set, as on a benchmark: what differs between seeds is then the training alone."""
    pictures = _pictures(folder, max(queries, POOL), seed, image_size, held_out=True, prefix="eval")
    rng = random.Random(seed + 1)

    def records():
        for i, (image, scene) in enumerate(pictures[:queries]):
            others = _others(i, pictures, 7, rng)
            kind = i % 3
            if kind == 0:
                yield {"query": {"text": f"Find the picture of {scene.text}."},
                       "candidates": [{"image": image}] + [{"image": o[0]} for o in others[:3]],
                       "task": "text-to-image"}
            elif kind == 1:
                yield {"query": {"image": image, "text": "<image> What does this picture show?"},
                       "candidates": [{"text": scene.text}] + [{"text": o[1].text} for o in others[:3]],
                       "task": "image-to-text"}
            else:
                yield {"query": {"text": f"Find the picture of {scene.text}."}, "positives": [{"image": image}],
                       "candidates": [{"image": o[0]} for o in others], "task": "retrieval"}
    return _write_jsonl(os.path.join(folder, "eval.jsonl"), records())
