"""Evaluation metrics on hand-made cases with known answers, eval files, and the encoder API."""
import json
import math

import pytest
import torch

from moca.eval import evaluate, metrics, ranks_of_relevant, read_eval


def test_precision_at_1_counts_a_strict_win_only():
    assert metrics("mmeb", torch.tensor([0.9, 0.1, 0.5]), 1) == {"precision_at_1": 1.0, "chance_precision_at_1": 1 / 3}
    assert metrics("mmeb", torch.tensor([0.5, 0.9, 0.1]), 1)["precision_at_1"] == 0.0
    assert metrics("mmeb", torch.tensor([0.5, 0.5]), 1)["precision_at_1"] == 0.0  # a tie is not a win


def test_recall_and_ndcg_by_hand():
    # two positives (entries 0 and 1) among five; ranking by score: 2, 0, 3, 1, 4
    scores = torch.tensor([0.8, 0.3, 0.9, 0.5, 0.1])
    assert ranks_of_relevant(scores, 2) == [2, 4]
    m = metrics("retrieval", scores, 2)
    assert m["recall_at_1"] == 0.0 and m["recall_at_5"] == 1.0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg_at_5"] == pytest.approx(dcg / ideal)
    assert m["chance_recall_at_1"] == pytest.approx(1 / 5) and m["chance_recall_at_5"] == 1.0
    assert m["chance_ndcg_at_5"] == pytest.approx(sum(2 / 5 / math.log2(r + 1) for r in range(1, 6)) / ideal)
    perfect = metrics("retrieval", torch.tensor([0.9, 0.8, 0.1, 0.0, -1.0]), 2)
    assert perfect["ndcg_at_5"] == pytest.approx(1.0) and perfect["recall_at_1"] == 0.5


def test_chance_ndcg_matches_random_rankings():
    gen = torch.Generator().manual_seed(0)
    values = [metrics("retrieval", torch.rand(7, generator=gen), 3)["ndcg_at_5"] for _ in range(20000)]
    expected = metrics("retrieval", torch.rand(7), 3)["chance_ndcg_at_5"]
    assert sum(values) / len(values) == pytest.approx(expected, abs=0.01)


class _Lookup:
    """An encoder whose embedding of a text is given by a table (one-hot directions)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def encode(self, sides, prompt=None):
        self.calls.append(len(sides) if prompt is None else (len(sides), prompt))
        return torch.stack([torch.tensor(self.table[(prompt or "") + s["text"]], dtype=torch.float32) for s in sides])


def test_evaluate_writes_per_task_scores_beside_chance(tmp_path):
    path = tmp_path / "eval.jsonl"
    records = [
        {"query": {"text": "q1"}, "candidates": [{"text": "a"}, {"text": "b"}, {"text": "c"}], "task": "cls"},
        {"query": {"text": "q2"}, "candidates": [{"text": "b"}, {"text": "a"}], "task": "cls"},
        {"query": {"text": "q1"}, "positives": [{"text": "a"}], "candidates": [{"text": "b"}, {"text": "c"}],
         "task": "ret"},
        "not a record",
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    table = {"q1": [1, 0, 0], "q2": [1, 0, 0], "a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]}
    encoder = _Lookup(table)
    with pytest.warns(UserWarning, match="eval.jsonl:4"):
        result = evaluate(encoder, [str(path)], log=lambda *_: None)
    assert encoder.calls == [5]  # q1, a, b, c, q2: each distinct side once
    cls, ret = result["tasks"]["cls"], result["tasks"]["ret"]
    assert cls["precision_at_1"] == 0.5 and cls["n"] == 2
    assert cls["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-4)
    assert ret["recall_at_1"] == 1.0 and ret["ndcg_at_5"] == 1.0 and ret["chance"] < 1
    assert result["overall"]["n"] == 3


def test_query_and_document_prompts_reach_their_roles(tmp_path):
    path = tmp_path / "eval.jsonl"
    records = [{"query": {"text": "a"}, "candidates": [{"text": "a"}, {"text": "b"}], "task": "cls"},
               {"query": {"text": "b"}, "candidates": [{"text": "b"}, {"text": "a"}], "task": "cls"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    # with the query prompt, each query points at the other candidate than its plain text does
    table = {"a": [1, 0], "b": [0, 1], "Q: a": [0, 1], "Q: b": [1, 0], "D: a": [1, 0], "D: b": [0, 1]}
    plain = _Lookup(table)
    assert evaluate(plain, [str(path)], log=lambda *_: None)["overall"]["precision_at_1"] == 1.0
    assert plain.calls == [2]  # a side that is a query and a candidate is embedded once
    prompted = _Lookup(table)
    result = evaluate(prompted, [str(path)], log=lambda *_: None, query_prompt="Q: ", document_prompt="D: ")
    assert result["overall"]["precision_at_1"] == 0.0
    assert sorted(prompted.calls) == [(2, "D: "), (2, "Q: ")]  # each role with its own prompt
    same = _Lookup(table)
    evaluate(same, [str(path)], log=lambda *_: None, query_prompt="D: ", document_prompt="D: ")
    assert same.calls == [(2, "D: ")]  # one prompt for both roles: each side once


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"query": {"text": "q"}, "candidates": [{"text": "only one"}]}) + "\n")
    from moca.data.records import DataError
    with pytest.raises(DataError, match="e.jsonl:1: .*at least 2"):
        read_eval(str(path), strict=True)


@pytest.fixture(scope="module")
def cl_run(tmp_path_factory):
    from moca.config import Config
    from moca.train import train
    out = tmp_path_factory.mktemp("runs") / "cl"
    train(Config().update({"run.stage": "cl", "out": str(out), "cl.max_steps": 2, "save_every": 2, "log_every": 1,
                           "pairs_per_batch": 4, "token_budget": 512}), log=lambda *_: None)
    return out


def test_encode_is_the_same_alone_or_in_a_batch_and_survives_export(cl_run, tmp_path):
    from PIL import Image

    from moca import Encoder
    encoder = Encoder.from_pretrained(str(cl_run))
    picture = Image.new("RGB", (60, 44), (200, 30, 30))
    inputs = ["a red circle", picture, {"text": "<image> a square", "image": picture}, {"text": "x" * 40}]
    batch = encoder.encode(inputs)
    alone = torch.cat([encoder.encode(item) for item in inputs])
    assert batch.shape == (4, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    encoder.save_pretrained(str(tmp_path / "export"))
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "export" / "moca.json").exists()
    torch.testing.assert_close(Encoder.from_pretrained(str(tmp_path / "export")).encode(inputs), batch,
                               rtol=1e-5, atol=1e-5)
    # plain transformers loads the export (bidirectional: text_config.is_causal is false) and, mean
    # pooled, gives the same embedding
    from transformers import Qwen2_5_VLForConditionalGeneration
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "export"), attn_implementation="sdpa")
    ids = torch.tensor([encoder.tokenizer.encode("a red circle")])
    with torch.no_grad():
        hidden = plain.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    torch.testing.assert_close(torch.nn.functional.normalize(hidden.mean(0), dim=0), batch[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input 1: a side must be"):
        encoder.encode(["fine", {"nothing": 1}])
    with pytest.raises(ValueError, match="neither a moca run directory"):
        Encoder.from_pretrained(str(tmp_path))


def test_cli_eval_and_encode(cl_run, tmp_path, capsys):
    import numpy as np

    from moca import cli
    from moca.data import embedded
    eval_file = embedded.write_eval(str(tmp_path / "eval"), queries=6)
    assert cli.main(["eval", "--model", str(cl_run), "--data", eval_file, "--out", str(tmp_path / "scores")]) == 0
    assert "text-to-image: precision_at_1" in capsys.readouterr().out
    scores = json.loads((tmp_path / "scores" / "eval.json").read_text())
    assert scores["overall"]["n"] == 6 and all("chance" in t for t in scores["tasks"].values())
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"text": "a blue square"}) + "\n" + json.dumps({"image": "eval/images/" + sorted(
        p.name for p in (tmp_path / "eval" / "images").iterdir())[0]}) + "\n")
    output = str(tmp_path / "v.npy")
    assert cli.main(["encode", "--model", str(cl_run), "--input", str(inputs), "--output", output]) == 0
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert cli.main(["eval", "--model", str(tmp_path / "nowhere"), "--data", eval_file]) == 2
