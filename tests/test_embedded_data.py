"""The embedded default measures the method: its evaluation shares no description with any
training data, no negative equals its positive, and stage 1 has an interleaved corpus."""
import json
import re

from moca.data import embedded


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _described(text: str) -> set[str]:
    return set(re.findall(r"(a \w+ \w+ on a \w+ background)", text))


def test_the_evaluation_is_disjoint_from_training_and_fair(tmp_path):
    documents = _lines(embedded.write(str(tmp_path / "cpt"), seed=0))
    pairs = _lines(embedded.write_pairs(str(tmp_path / "pairs"), seed=0))
    evaluation = _lines(embedded.write_eval(str(tmp_path / "eval"), seed=1000))
    trained = set()
    for doc in documents:
        trained |= _described(doc["text"])
    for pair in pairs:
        for side in [pair["query"], pair["positive"], *pair["negatives"]]:
            trained |= _described(side.get("text", ""))
    held = set()
    for record in evaluation:
        for side in [record["query"], *record.get("positives", []), *record["candidates"]]:
            held |= _described(side.get("text", ""))
    every = {embedded.Scene(c, s, bg).text
             for c in embedded.INKS for s in embedded.SHAPES for bg in embedded.BACKGROUNDS}
    assert trained | held == every and len(held) >= 8 and not trained & held  # 8: a retrieval query's pool
    # no negative has its positive's description, and no two candidates share one
    for record in evaluation:
        if record["task"] == "image-to-text":
            texts = [c["text"] for c in record["candidates"]]
            assert len(set(texts)) == len(texts)
    for pair in pairs:
        if pair["task"] == "image-to-text":
            assert pair["positive"]["text"] not in [n["text"] for n in pair["negatives"]]
    # enough queries for differences between runs to show: 80 a task
    tasks = [r["task"] for r in evaluation]
    assert {t: tasks.count(t) for t in set(tasks)} == {"text-to-image": 80, "image-to-text": 80, "retrieval": 80}
    # stage 1 is interleaved (documents of several pictures, each followed by its description) and
    # ten times larger in pictures than stage 2's labelled pairs
    pictures = sum(len(d.get("images", [])) for d in documents)
    assert max(len(d.get("images", [])) for d in documents) == 3 and pictures > 10 * len(pairs)
    assert all(d["text"].count("<image>") == len(d.get("images", [])) for d in documents)


def test_the_held_out_split_does_not_depend_on_the_seed(tmp_path):
    a = _lines(embedded.write_eval(str(tmp_path / "a"), queries=30, seed=1))
    b = _lines(embedded.write_pairs(str(tmp_path / "b"), pairs=60, seed=7))
    held = {c["text"] for r in a if r["task"] == "image-to-text" for c in r["candidates"]}
    trained = {p["positive"]["text"] for p in b if p["task"] == "image-to-text"}
    assert held and trained and not held & trained
    scenes = [embedded.Scene(c, s, bg) for c in embedded.INKS for s in embedded.SHAPES for bg in embedded.BACKGROUNDS]
    assert 0 < sum(s.held_out() for s in scenes) < len(scenes)


def test_the_labelled_pairs_cover_every_training_description_evenly(tmp_path):
    training = [embedded.Scene(c, s, bg).text for c in embedded.INKS for s in embedded.SHAPES
                for bg in embedded.BACKGROUNDS if not embedded.Scene(c, s, bg).held_out()]
    for seed, count in [(0, 64), (3, 50)]:
        pairs = _lines(embedded.write_pairs(str(tmp_path / f"pairs-{seed}"), pairs=count, seed=seed))
        named = [_described(p["query"]["text"]).pop() if p["task"] == "text-to-image" else p["positive"]["text"]
                 for p in pairs]
        # every description before any comes again, so counts differ by one at most
        assert sorted(named[:len(training)]) == sorted(training)
        counts = [named.count(t) for t in training]
        assert max(counts) - min(counts) <= 1 and sum(counts) == count
