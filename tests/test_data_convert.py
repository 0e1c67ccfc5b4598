"""``moca data convert`` on tiny files in the published layouts (MMEB evaluation and training rows,
BEIR-style sets as ViDoRe and BEIR publish them), and the evaluation of what it writes: MMEB's
per-meta-task averages and nDCG with graded relevance against hand-computed values."""
import io
import json
import logging
import math
import os

import pytest
import torch
from PIL import Image

from moca import cli
from moca.data.convert import convert, task_of
from moca.data.pairs import read_pairs
from moca.data.records import BadRecords, DataError
from moca.eval import evaluate, meta_task_averages, metrics, mmeb_meta_task, read_eval
from moca.logs import console


def _png(path, color=(200, 30, 30), size=(40, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


class _Table:
    """An encoder whose embedding of a side is looked up by its text or image file name."""

    def __init__(self, table):
        self.table = table

    def encode(self, sides):
        keys = [os.path.basename(s["image"]) if "image" in s else s["text"] for s in sides]
        return torch.nn.functional.normalize(torch.tensor([self.table[k] for k in keys], dtype=torch.float32), dim=1)


def _mmeb_eval_rows(root):
    """Rows in MMEB-eval's layout: an image query against text targets (classification), and a
    text query against image targets (retrieval), the positive first."""
    _png(root / "images" / "ImageNet-1K" / "cat.png")
    for name in ("a", "b", "c"):
        _png(root / "images" / "VisualNews_t2i" / f"{name}.png")
    cls = [
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path":
         "ImageNet-1K/cat.png", "tgt_text": ["cat", "dog", "car"], "tgt_img_path": ["", "", ""]},
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path":
         "ImageNet-1K/missing.png", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]},  # bad: no image
        {"qry_text": "<|image_1|>\nRepresent the given image", "qry_img_path": "ImageNet-1K/cat.png",
         "tgt_text": ["cat", "dog"], "tgt_img_path": [""]},  # bad: lists of two lengths
        {"qry_img_path": "ImageNet-1K/cat.png", "tgt_text": ["cat"], "tgt_img_path": [""]},  # bad: no qry_text
    ]
    ret = [{"qry_text": "Find me an everyday image that matches the given caption: a red bus", "qry_img_path": "",
            "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
            "tgt_img_path": ["VisualNews_t2i/a.png", "VisualNews_t2i/b.png", "VisualNews_t2i/c.png"]}]
    return cls, ret


def test_mmeb_eval_rows_become_evaluation_records_and_bad_rows_are_named(tmp_path):
    cls, ret = _mmeb_eval_rows(tmp_path)
    first = _jsonl(tmp_path / "mmeb" / "ImageNet-1K.jsonl", cls)
    _jsonl(tmp_path / "mmeb" / "VisualNews_t2i" / "test-00000-of-00001.jsonl", ret)
    out = tmp_path / "out" / "mmeb_eval.jsonl"
    with pytest.warns(UserWarning) as warned:
        done = convert([str(tmp_path / "mmeb")], str(out), image_root=str(tmp_path / "images"))
    assert [str(w.message).split(": ", 1)[0].rsplit(":", 1)[1] for w in warned] == ["2", "3", "4"]  # each line named
    assert done.format == "mmeb-eval" and dict(done.tasks) == {"ImageNet-1K": 1, "VisualNews_t2i": 1}
    assert done.bad.total == 3 and done.bad.counts == {"bad image": 1, "invalid record": 2}
    assert any("ImageNet-1K.jsonl:2" in e and "missing.png" in e for e in done.bad.examples)
    assert any("ImageNet-1K.jsonl:4" in e and "'qry_text'" in e for e in done.bad.examples)
    image = "../images/ImageNet-1K/cat.png"  # relative to the output's folder, wherever the image is
    records = _read(out)
    assert records[0] == {"query": {"text": "<image>\nRepresent the given image for classification", "image": image},
                          "candidates": [{"text": "cat"}, {"text": "dog"}, {"text": "car"}], "task": "ImageNet-1K"}
    assert records[1]["query"] == {"text": ret[0]["qry_text"]}
    assert [c["image"] for c in records[1]["candidates"]] == [f"../images/VisualNews_t2i/{n}.png" for n in "abc"]
    assert len(read_eval(str(out))) == 2  # the evaluation reads it back whole
    with pytest.raises(DataError, match=r"ImageNet-1K.jsonl:2: the query: image .*missing.png' not found"):
        convert([first], str(tmp_path / "strict.jsonl"), image_root=str(tmp_path / "images"), strict=True)
    assert not (tmp_path / "strict.jsonl").exists()  # all or nothing


def test_mmeb_train_rows_become_pairs_that_training_reads(tmp_path):
    _png(tmp_path / "images" / "MSCOCO_i2t" / "q.png")
    _png(tmp_path / "images" / "NIGHTS" / "p.png")
    rows = [
        {"qry": "<|image_1|>\nFind a caption for the news in the given photo.", "qry_image_path": "MSCOCO_i2t/q.png",
         "pos_text": "A man rides a horse.", "pos_image_path": "", "neg_text": "A cat sleeps.", "neg_image_path": ""},
        {"qry": "Find a day-to-day image that looks similar to the provided image.", "qry_image_path": "",
         "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "NIGHTS/p.png",
         "neg_text": "", "neg_image_path": ""},
        {"qry": "<|image_1|> <|image_2|>", "qry_image_path": "MSCOCO_i2t/q.png", "pos_text": "x",
         "pos_image_path": ""},  # two image tokens, one image: the second dropped
        "[1, 2]",  # bad: not an object
        {"qry": "q", "qry_image_path": "", "pos_text": "p", "pos_image_path": "",  # mined negatives: lists
         "neg_text": ["n", "<|image_1|>"], "neg_image_path": ["", "NIGHTS/p.png"]},
    ]
    source = _jsonl(tmp_path / "MMEB-train" / "MSCOCO_i2t" / "original-00000-of-00001.jsonl", rows)
    assert task_of(source) == "MSCOCO_i2t"
    out = tmp_path / "pairs.jsonl"
    with pytest.warns(UserWarning):
        done = convert([source], str(out), image_root=str(tmp_path / "images"))
    assert done.format == "mmeb-train" and done.records == 4 and done.bad.total == 1 and done.stray_image_tokens == 1
    pairs = _read(out)
    assert pairs[2]["query"] == {"text": "<image> ", "image": "images/MSCOCO_i2t/q.png"}
    del pairs[2]
    assert pairs[0] == {"query": {"text": "<image>\nFind a caption for the news in the given photo.",
                                  "image": "images/MSCOCO_i2t/q.png"},  # under the output's folder: relative
                        "positive": {"text": "A man rides a horse."}, "negatives": [{"text": "A cat sleeps."}],
                        "task": "MSCOCO_i2t"}
    assert pairs[1]["negatives"] == [] and pairs[1]["positive"]["text"].startswith("<image>")
    assert pairs[2]["negatives"] == [{"text": "n"}, {"text": "<image>", "image": "images/NIGHTS/p.png"}]
    with pytest.warns(UserWarning, match=":2: no negatives"):  # training reads them; K=2 needs negatives
        read = list(read_pairs(str(out), 2, BadRecords(), decode=False))
    assert [len(p.negatives) for p in read] == [1, 2] and read[0].negatives[0].text == "A cat sleeps."


def _beir_text_set(folder):
    """BEIR's own layout: corpus.jsonl (_id, title, text), queries.jsonl (_id, text),
    qrels/test.tsv with graded scores."""
    _jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"} for i in range(5)])
    _jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"},
                                      {"_id": "q3", "text": "unjudged"}])
    os.makedirs(folder / "qrels")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td0\t3\nq1\td1\t1\nq1\td2\t0\nq2\td4\t1\nq2\tnowhere\t1\nq1\td3\tmuch\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\n")


def test_beir_set_becomes_retrieval_records_with_graded_relevance(tmp_path):
    folder = tmp_path / "scifact"
    _beir_text_set(folder)
    out = tmp_path / "beir.jsonl"
    with pytest.warns(UserWarning) as warned:
        done = convert([str(folder)], str(out), query_prompt="Q: ")
    assert ["test.tsv:6: the qrel names document 'nowhere'" in str(w.message) for w in warned] == [True, False]
    assert done.format == "beir" and dict(done.tasks) == {"scifact": 2} and done.unjudged == 1
    assert done.bad.total == 2  # a qrel naming an unknown document, and one whose score is not a number
    q1, q2 = _read(out)
    assert q1["query"] == {"text": "Q: first"} and q1["relevance"] == [3, 1]
    assert q1["positives"] == [{"text": "T0 doc 0"}, {"text": "T1 doc 1"}]  # best first; score 0 is not relevant
    assert [c["text"] for c in q1["candidates"]] == ["T2 doc 2", "T3 doc 3", "T4 doc 4"]
    assert q2["positives"] == [{"text": "T4 doc 4"}] and len(q2["candidates"]) == 4  # train.tsv is not read
    # The whole corpus ranked for q1: d2, d1, d4, d0, d3 (hand-made embeddings, cosine)
    table = {"Q: first": [1, 0], "Q: second": [0, 1], "T0 doc 0": [0.6, 0.8], "T1 doc 1": [0.9, 0.1],
             "T2 doc 2": [1, 0], "T3 doc 3": [-1, 0], "T4 doc 4": [0.8, 0.6]}
    result = evaluate(_Table(table), [str(out)])
    # q1: d1 (grade 1) at rank 2, d0 (grade 3) at rank 4; ideal: grade 3 at rank 1, grade 1 at rank 2
    q1_ndcg = (1 / math.log2(3) + 3 / math.log2(5)) / (3 + 1 / math.log2(3))
    # q2: d0 (0.8) ranks above d4 (0.6, grade 1): rank 2; ideal: rank 1
    q2_ndcg = (1 / math.log2(3)) / 1
    assert result["tasks"]["scifact"]["ndcg_at_5"] == pytest.approx((q1_ndcg + q2_ndcg) / 2, abs=1e-4)
    assert "meta_tasks" not in result


def test_graded_ndcg_by_hand():
    # positives p0 (grade 3) and p1 (grade 1), then three candidates; by score: p1, c0, p0, c2, c1
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1, 0.3])
    m = metrics("retrieval", scores, 2, [3, 1])
    dcg = 1 / math.log2(2) + 3 / math.log2(4)  # = 2.5
    ideal = 3 / math.log2(2) + 1 / math.log2(3)  # = 3.6309
    assert m["ndcg_at_5"] == pytest.approx(dcg / ideal) and m["ndcg_at_5"] == pytest.approx(0.68853, abs=1e-5)
    assert m["recall_at_1"] == 0.5 and m["recall_at_5"] == 1.0
    assert m["chance_ndcg_at_5"] == pytest.approx(sum(4 / 5 / math.log2(r + 1) for r in range(1, 6)) / ideal)
    assert metrics("retrieval", scores, 2, [1, 3])["ndcg_at_5"] == pytest.approx(
        (3 + 1 / math.log2(4)) / ideal)  # the grades swapped: the better document ranks first
    # tied positives: the lower grade is placed first
    tied = metrics("retrieval", torch.tensor([0.5, 0.5, 0.1]), 2, [3, 1])["ndcg_at_5"]
    assert tied == pytest.approx((1 + 3 / math.log2(3)) / ideal)
    # graded nDCG with equal grades is binary nDCG
    assert metrics("retrieval", scores, 2, [2, 2])["ndcg_at_5"] == pytest.approx(metrics("retrieval", scores, 2)
                                                                                    ["ndcg_at_5"])


def test_graded_chance_ndcg_matches_random_rankings():
    gen = torch.Generator().manual_seed(1)
    gains = [3, 1, 2]
    values = [metrics("retrieval", torch.rand(8, generator=gen), 3, gains)["ndcg_at_5"] for _ in range(20000)]
    expected = metrics("retrieval", torch.rand(8), 3, gains)["chance_ndcg_at_5"]
    assert sum(values) / len(values) == pytest.approx(expected, abs=0.01)


def test_bad_relevance_is_a_bad_record(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"query": {"text": "q"}, "positives": [{"text": "a"}],
                                          "candidates": [{"text": "b"}], "relevance": [0]}])
    with pytest.raises(DataError, match='e.jsonl:1: "relevance" goes with "positives"'):
        read_eval(path, strict=True)


def test_mmeb_meta_task_averages_by_hand():
    assert mmeb_meta_task("ImageNet-1K") == mmeb_meta_task("imagenet_1k") == "classification"
    assert mmeb_meta_task("MSCOCO") == "grounding" and mmeb_meta_task("MSCOCO_i2t") == "retrieval"
    assert mmeb_meta_task("Visual7W") == "vqa" and mmeb_meta_task("Visual7W-Pointing") == "grounding"
    assert mmeb_meta_task("my-task") is None
    tasks = {"ImageNet-1K": {"precision_at_1": 0.5, "chance": 0.001}, "N24News": {"precision_at_1": 0.25,
                                                                                  "chance": 0.25},
             "MSCOCO": {"precision_at_1": 1.0, "chance": 0.1}, "own": {"precision_at_1": 0.0, "chance": 0.5},
             "ViDoRe": {"ndcg_at_5": 0.7, "chance": 0.1}}
    meta = meta_task_averages(tasks)
    assert list(meta) == ["classification", "grounding"]
    assert meta["classification"] == {"precision_at_1": 0.375, "chance": 0.1255, "tasks": ["ImageNet-1K", "N24News"]}
    assert meta["grounding"]["precision_at_1"] == 1.0


def test_evaluate_reports_mmeb_meta_tasks(tmp_path, capsys):
    cls, ret = _mmeb_eval_rows(tmp_path)
    _jsonl(tmp_path / "mmeb" / "ImageNet-1K" / "test-00000-of-00001.jsonl", cls[:1])
    _jsonl(tmp_path / "mmeb" / "VisualNews_t2i" / "test-00000-of-00001.jsonl", ret)
    out = tmp_path / "mmeb.jsonl"
    convert([str(tmp_path / "mmeb")], str(out), image_root=str(tmp_path / "images"))
    # the cat image is nearest "cat" (right); the caption is nearest image b, not a (wrong)
    table = {"cat.png": [1, 0, 0], "cat": [1, 0, 0], "dog": [0, 1, 0], "car": [0, 0, 1],
             ret[0]["qry_text"]: [0, 1, 0], "a.png": [1, 0, 0], "b.png": [0, 1, 0], "c.png": [0, 0, 1]}
    result = evaluate(_Table(table), [str(out)])
    assert result["meta_tasks"] == {
        "classification": {"precision_at_1": 1.0, "chance": round(1 / 3, 4), "tasks": ["ImageNet-1K"]},
        "retrieval": {"precision_at_1": 0.0, "chance": round(1 / 3, 4), "tasks": ["VisualNews_t2i"]}}
    with console(logging.INFO):  # as moca eval prints it
        cli._scores(result)
    assert "MMEB classification: precision_at_1 1.000 (chance 0.333, mean of 1 tasks)" in capsys.readouterr().out


def test_vidore_parquet_with_embedded_images(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder = tmp_path / "esg_reports_v2"
    for part in ("corpus", "queries", "qrels"):
        os.makedirs(folder / part)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    # ViDoRe v2's configs as Hugging Face stores them: an image struct per page, integer ids
    pq.write_table(pa.table({"corpus-id": [10, 11, 12, 13],
                             "image": pa.array([{"bytes": _png_bytes(c), "path": None} for c in colors]
                                               + [{"bytes": b"not an image", "path": "x.png"}], type=image)}),
                   folder / "corpus" / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"query-id": [1, 2, 3], "query": ["red page", "green page", "rouge"],
                             "language": ["english", "english", "french"]}),
                   folder / "queries" / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"query-id": [1, 1, 2, 3], "corpus-id": [10, 11, 11, 12], "score": [2, 1, 1, 1]}),
                   folder / "qrels" / "test-00000-of-00001.parquet")
    out = tmp_path / "out" / "vidore.jsonl"
    with pytest.warns(UserWarning, match="corpus/test-00000-of-00001.parquet:row 4"):
        code = cli.main(["data", "convert", str(folder), "--output", str(out), "--language", "english",
                         "--document-prompt", "Understand the content of the provided document image."])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 evaluation records (beir; esg_reports_v2 2)" in printed and "3 embedded images" in printed
    q1, q2 = _read(out)
    assert q1["query"] == {"text": "red page"} and q1["relevance"] == [2, 1] and len(q1["candidates"]) == 1
    names = [p["image"] for p in q1["positives"]] + [c["image"] for c in q1["candidates"]]
    assert all(n.startswith("vidore_images/") and n.endswith(".png") for n in names)  # beside the output
    assert Image.open(out.parent / names[0]).getpixel((0, 0)) == (255, 0, 0)
    assert q1["positives"][0]["text"] == "Understand the content of the provided document image."
    assert q2["positives"] == [q1["positives"][1]]
    records = read_eval(str(out))
    assert [r["relevant"] for r in records] == [2, 1] and records[0]["gains"] == [2, 1]


def test_json_lines_need_no_pyarrow_and_parquet_says_what_it_needs(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    folder = tmp_path / "set"
    _beir_text_set(folder)
    with pytest.warns(UserWarning):
        assert convert([str(folder)], str(tmp_path / "a.jsonl")).records == 2
    (tmp_path / "mmeb").mkdir()
    (tmp_path / "mmeb" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r'needs pyarrow \(pip install "moca\[formats\]"\)'):
        convert([str(tmp_path / "mmeb")], str(tmp_path / "b.jsonl"), fmt="mmeb-eval")


def test_webqa_rows_keep_their_text_without_the_image_they_lack(tmp_path, capsys):
    # MMEB's WebQA: each query's text carries <|image_1|> but the row has no query image; VLM2Vec's
    # loader drops the token. The rows stay, counted, so the retrieval meta-task keeps WebQA.
    for name in ("a", "b"):
        _png(tmp_path / "images" / "WebQA" / f"{name}.png")
    rows = [{"qry_text": f"<|image_1|>\nFind a Wikipedia image that answers this question: question {i}?",
             "qry_img_path": "", "tgt_text": ["<|image_1|>\nRepresent the given Wikipedia image with caption: x"] * 2,
             "tgt_img_path": ["WebQA/a.png", "WebQA/b.png"]} for i in range(3)]
    source = _jsonl(tmp_path / "MMEB-eval" / "WebQA" / "test-00000-of-00001.jsonl", rows)
    out = tmp_path / "out" / "webqa.jsonl"
    assert cli.main(["data", "convert", source, "--output", str(out), "--image-root", str(tmp_path / "images")]) == 0
    printed = capsys.readouterr().out
    assert "3 evaluation records (mmeb-eval; WebQA 3)" in printed
    assert "3 image tokens naming an image their row lacks dropped (their text kept)" in printed
    records = _read(out)
    assert records[0]["query"] == {"text": "Find a Wikipedia image that answers this question: question 0?"}
    assert records[0]["candidates"][0] == {"text": "<image>\nRepresent the given Wikipedia image with caption: x",
                                           "image": "../images/WebQA/a.png"}
    assert len(read_eval(str(out))) == 3 and mmeb_meta_task("WebQA") == "retrieval"


def test_converted_files_move_with_their_images(tmp_path):
    # the output names its images relative to its own folder (not absolute): a folder holding the
    # output and the images, moved elsewhere, reads back whole
    cls, ret = _mmeb_eval_rows(tmp_path / "data")
    _jsonl(tmp_path / "data" / "mmeb" / "VisualNews_t2i.jsonl", ret)
    out = tmp_path / "data" / "converted" / "eval.jsonl"
    convert([str(tmp_path / "data" / "mmeb")], str(out), image_root=str(tmp_path / "data" / "images"))
    assert all(not os.path.isabs(c["image"]) for r in _read(out) for c in r["candidates"])
    os.rename(tmp_path / "data", tmp_path / "moved")
    records = read_eval(str(tmp_path / "moved" / "converted" / "eval.jsonl"))
    assert [os.path.normpath(c["image"]) for c in records[0]["pool"]] == [
        str(tmp_path / "moved" / "images" / "VisualNews_t2i" / f"{n}.png") for n in "abc"]
    assert all(os.path.isfile(c["image"]) for c in records[0]["pool"])


def test_moca_eval_names_the_command_that_reads_a_published_layout(tmp_path, capsys):
    cls, ret = _mmeb_eval_rows(tmp_path)
    rows = _jsonl(tmp_path / "mmeb" / "VisualNews_t2i.jsonl", ret)
    parquet = tmp_path / "parquet" / "test-00000-of-00001.parquet"
    os.makedirs(parquet.parent)
    parquet.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    _beir_text_set(tmp_path / "beir")
    for given, layout in ((rows, "MMEB evaluation rows"), (str(parquet), "a Parquet file"),
                          (str(parquet.parent), "a folder of Parquet files"),
                          (str(tmp_path / "beir"), "a BEIR-style set (corpus, queries, qrels)")):
        assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", given]) == 2
        err = capsys.readouterr().err
        assert f"moca eval: {given}: {layout}, which moca eval does not read; moca data convert reads it: moca data " \
               f"convert {given} --output converted.jsonl" in err, err
    # moca train's evaluation files, refused before any training
    assert cli.main(["train", "--stage", "both", f"evaluation={rows}", "--out", str(tmp_path / "run")]) == 2
    assert "which moca train's evaluation does not read" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
