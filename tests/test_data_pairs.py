"""Stage-2 pairs: sides as documents, hard negatives, task-aware batching, bad records."""
import json

import pytest

from moca.data.cpt import encode
from moca.data.pairs import chosen_negatives, contrastive_batches, load_pair, read_pairs, side_document
from moca.data.records import IMAGE_PLACEHOLDER, DataError
from moca.data.tokenizer import ByteTokenizer


def _png(tmp_path, name="p.png"):
    from PIL import Image
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / name)
    return name


def test_a_side_places_its_image_first_or_at_the_placeholder(tmp_path):
    name = _png(tmp_path)
    tok = ByteTokenizer()
    first = side_document({"text": "a green box", "image": name}, str(tmp_path), "x:1")
    placed = side_document({"text": f"look: {IMAGE_PLACEHOLDER} a green box", "image": name}, str(tmp_path), "x:1")
    assert first.text.startswith(IMAGE_PLACEHOLDER) and placed.text.startswith("look: ")
    ids = encode(first, tok, 512, 28 * 28, 56 * 56).ids.tolist()
    assert ids[0] == tok.specials.vision_start and tok.specials.image in ids
    text_only = encode(side_document({"text": "words"}, str(tmp_path), "x:1"), tok, 512)
    assert text_only.rows.shape[0] == 0 and text_only.ids.tolist() == list(b"words")
    with pytest.raises(ValueError, match='"text" and/or "image"'):
        side_document({"caption": "no"}, str(tmp_path), "x:1")


def test_negatives_are_repeated_in_turn():
    assert chosen_negatives(1, 3) == [0, 0, 0] and chosen_negatives(3, 2) == [0, 1]
    assert chosen_negatives(2, 5) == [0, 1, 0, 1, 0]
    assert chosen_negatives(0, 0) == []


def test_mixed_batches_mix_tasks_and_homogeneous_ones_do_not():
    tasks = ["a"] * 20 + ["b"] * 20
    mixed = contrastive_batches(tasks, 8, seed=0, epoch=0)
    assert len(mixed) == 5 and sorted(i for b in mixed for i in b) == list(range(40))
    assert any(len({tasks[i] for i in b}) == 2 for b in mixed)
    alone = contrastive_batches(tasks, 8, seed=0, epoch=0, mixed=False)
    assert len(alone) == 4 and all(len({tasks[i] for i in b}) == 1 for b in alone)  # 4 left over per task, dropped
    assert contrastive_batches(tasks, 8, seed=0, epoch=1) != mixed  # reshuffled each epoch


def test_bad_pairs_are_counted_and_skipped_or_fatal_under_strict(tmp_path):
    name = _png(tmp_path)
    lines = [
        {"query": {"text": "q"}, "positive": {"image": name}, "negatives": [{"text": "n"}], "task": "t"},
        {"query": {"text": "q"}, "positive": {"image": "missing.png"}, "negatives": [{"text": "n"}]},
        {"query": {"text": "q"}, "positive": {"text": "p"}},  # no negatives while 2 are wanted
        {"positive": {"text": "p"}, "negatives": [{"text": "n"}]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    from moca.data.records import BadRecords
    bad = BadRecords()
    with pytest.warns(UserWarning):
        good = list(read_pairs(str(path), 2, bad, decode=False))
    assert len(good) == 1 and good[0].task == "t" and bad.total == 4
    assert any("pairs.jsonl:2" in e and "missing.png" in e for e in bad.examples)
    assert any("pairs.jsonl:3" in e and "hard_negatives=0" in e for e in bad.examples)
    with pytest.raises(DataError, match="pairs.jsonl:2: a side: image 'missing.png'"):
        list(read_pairs(str(path), 2, strict=True))
    assert len(list(read_pairs(str(path), 0, BadRecords()))) == 2  # in-batch negatives only: line 3 is fine
    again = load_pair(str(path), good[0].offset, good[0].where, 2)
    assert again.query.text == "q" and len(again.negatives) == 1
