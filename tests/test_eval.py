"""Evaluation metrics on hand-made cases with known answers, eval files, and the encoder API."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import moca.eval as eval_module
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
        result = evaluate(encoder, [str(path)])
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
    assert evaluate(plain, [str(path)])["overall"]["precision_at_1"] == 1.0
    assert plain.calls == [2]  # a side that is a query and a candidate is embedded once
    prompted = _Lookup(table)
    result = evaluate(prompted, [str(path)], query_prompt="Q: ", document_prompt="D: ")
    assert result["overall"]["precision_at_1"] == 0.0
    assert sorted(prompted.calls) == [(2, "D: "), (2, "Q: ")]  # each role with its own prompt
    same = _Lookup(table)
    evaluate(same, [str(path)], query_prompt="D: ", document_prompt="D: ")
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
                           "pairs_per_batch": 4, "token_budget": 512}))
    return out


def test_encode_is_the_same_alone_or_in_a_batch_and_survives_export(cl_run, tmp_path):
    from PIL import Image

    from moca import Encoder
    encoder = Encoder.from_pretrained(str(cl_run))
    picture = Image.new("RGB", (60, 44), (200, 30, 30))
    inputs = ["a red circle", picture, {"text": "<image> a square", "image": picture}, {"text": "x" * 40}]
    batch = encoder.encode(inputs, convert_to_tensor=True)
    alone = torch.stack([encoder.encode(item, convert_to_tensor=True) for item in inputs])  # one input: (hidden,)
    assert batch.shape == (4, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    encoder.save_pretrained(str(tmp_path / "export"))
    assert (tmp_path / "export" / "config.json").exists() and (tmp_path / "export" / "moca.json").exists()
    torch.testing.assert_close(Encoder.from_pretrained(str(tmp_path / "export")).encode(inputs, convert_to_tensor=True),
                               batch, rtol=1e-5, atol=1e-5)
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


def test_each_query_is_also_ranked_against_its_tasks_whole_pool(tmp_path, monkeypatch):
    # three queries of one task, each record with 2 candidates; the task's pool holds all 4 distinct
    # sides: "c" outranks q1's positive "a" over the pool though not over q1's own candidates
    path = tmp_path / "eval.jsonl"
    records = [{"query": {"text": "q1"}, "candidates": [{"text": "a"}, {"text": "b"}], "task": "t"},
               {"query": {"text": "q2"}, "candidates": [{"text": "b"}, {"text": "c"}], "task": "t"},
               {"query": {"text": "q3"}, "positives": [{"text": "d"}], "candidates": [{"text": "a"}], "task": "r"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    s = 2 ** -0.5
    table = {"q1": [1, 0, 0], "q2": [0, 1, 0], "q3": [0, 0, 1], "a": [s, 0, s], "b": [0, 1, 0], "c": [1, 0, 0],
             "d": [0, 0, 1]}
    result = evaluate(_Lookup(table), [str(path)])
    t, r = result["tasks"]["t"], result["tasks"]["r"]
    assert t["precision_at_1"] == 1.0 and t["pool_size"] == 3  # a, b, c
    # q1: c, then a (rank 2); q2: b (rank 1)
    assert t["pool_recall_at_1"] == 0.5 and t["pool_recall_at_10"] == 1.0
    assert t["pool_ndcg_at_10"] == pytest.approx((1 / math.log2(3) + 1) / 2, abs=1e-4)
    assert t["chance_pool_recall_at_1"] == pytest.approx(1 / 3, abs=1e-4) and t["chance_pool_recall_at_10"] == 1.0
    assert r["pool_size"] == 2 and r["pool_recall_at_1"] == 1.0  # d, a
    # a pool larger than the limit: the relevant rows, the record's own and others drawn, up to the limit
    monkeypatch.setattr(eval_module, "POOL_LIMIT", 2)
    limited = evaluate(_Lookup(table), [str(path)])["tasks"]["t"]
    assert limited["pool_size"] == 2 and limited["pool_recall_at_1"] == 1.0  # each query over its own two
    with_own = eval_module.pool_metrics(torch.tensor([1.0, 0, 0]), torch.eye(3)[[2, 1, 0, 0]], {0: 1}, [0, 1, 2], 0)
    assert with_own["pool_size"] == 3 and with_own["pool_recall_at_1"] == 0.0  # own candidates kept over the limit


def test_a_query_is_not_ranked_against_itself_in_its_tasks_pool(tmp_path):
    # q2's text is a candidate of q1's record: over the task's pool q2 would find itself first
    path = tmp_path / "eval.jsonl"
    records = [{"query": {"text": "q1"}, "candidates": [{"text": "a"}, {"text": "q2"}], "task": "t"},
               {"query": {"text": "q2"}, "candidates": [{"text": "b"}, {"text": "a"}], "task": "t"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    table = {"q1": [1, 0, 0], "q2": [0, 1, 0], "a": [1, 0, 0], "b": [0.6, 0.8, 0]}
    t = evaluate(_Lookup(table), [str(path)])["tasks"]["t"]
    assert t["pool_recall_at_1"] == 1.0 and t["pool_size"] == 2.5  # q1 over a, q2, b; q2 over b, a


def test_the_model_travels_with_its_prompts_to_moca_eval_and_the_mteb_encoder(cl_run, tmp_path, capsys):
    """One model, one evaluation set: ``moca eval`` (the CLI, the model's own prompts) and MTEB's
    path (``MocaEncoder.encode`` as mteb's retrieval evaluator calls it: queries, then the task's
    corpus as documents, in DataLoader batches) give the same embeddings, so the same ranking of
    every query over the corpus: nDCG@10 and Recall@1 computed here as pytrec_eval (MTEB's scorer)
    computes them agree with ``eval.json``'s pool scores. A run of the tiny recipe has no prompts;
    an export made with MoCa's carries the document prompt, which changes the scores."""
    import numpy as np

    from moca import Encoder, cli
    from moca.data import embedded
    from moca.export import MOCA_PROMPTS
    from moca.integrations.mteb import MocaEncoder
    assert Encoder.from_pretrained(str(cl_run)).prompts == {"query": "", "document": ""}
    folder = str(tmp_path / "export")
    Encoder.from_pretrained(str(cl_run)).save_pretrained(folder, prompts=MOCA_PROMPTS)
    eval_file = embedded.write_eval(str(tmp_path / "eval"), queries=12)
    for model, out in ((str(cl_run), "plain"), (folder, "moca")):
        assert cli.main(["eval", "--model", model, "--data", eval_file, "--out", str(tmp_path / out)]) == 0
    capsys.readouterr()
    scores = {out: json.loads((tmp_path / out / "eval.json").read_text())["tasks"] for out in ("plain", "moca")}
    assert scores["plain"]["text-to-image"]["pool_ndcg_at_10"] != scores["moca"]["text-to-image"]["pool_ndcg_at_10"]
    mteb_model = MocaEncoder(folder, device="cpu")
    records = [json.loads(line) for line in open(eval_file)]
    task = SimpleNamespace(name="text-to-image", type="Any2AnyRetrieval")
    rows = [r for r in records if r["task"] == "text-to-image"]
    corpus = list({json.dumps(side): side for r in rows for side in r["candidates"]}.values())

    def batches(sides):  # mteb's columns: "text" and "image" (PIL) lists
        from PIL import Image
        loaded = [{"text": s.get("text"), "image": Image.open(os.path.join(os.path.dirname(eval_file), s["image"]))
                   if "image" in s else None} for s in sides]
        return torch.utils.data.DataLoader(loaded, batch_size=5, collate_fn=lambda b: {
            k: [x[k] for x in b] for k in ("text", "image") if any(x[k] is not None for x in b)})

    queries = mteb_model.encode(batches([r["query"] for r in rows]), task_metadata=task, hf_split="test",
                                hf_subset="default", prompt_type="query")
    documents = mteb_model.encode(batches(corpus), task_metadata=task, hf_split="test", hf_subset="default",
                                  prompt_type="document")
    ndcg, recall = [], []
    for r, q in zip(rows, queries):
        relevant = corpus.index(r["candidates"][0])
        order = np.argsort(-(documents @ q), kind="stable")
        rank = int(np.nonzero(order == relevant)[0][0]) + 1
        ndcg.append(1 / math.log2(rank + 1) if rank <= 10 else 0.0)
        recall.append(float(rank == 1))
    ours = scores["moca"]["text-to-image"]
    assert ours["pool_size"] == len(corpus)
    assert ours["pool_ndcg_at_10"] == pytest.approx(sum(ndcg) / len(ndcg), abs=1e-4)
    assert ours["pool_recall_at_1"] == pytest.approx(sum(recall) / len(recall), abs=1e-4)


def test_a_run_of_both_stages_is_found_and_its_commands_are_printed(tmp_path, capsys):
    """``moca train`` (both stages) ends with the commands that use its model; they run as printed,
    ``--model RUN`` taking the last stage and saying so; the evaluation lines score each query over
    its own candidates and over its task's whole pool, each beside chance."""
    import shlex

    import numpy as np

    from moca import cli
    run = tmp_path / "tiny"
    assert cli.main(["train", "--out", str(run), "--max-steps", "1", "pairs_per_batch=4", "save_every=1"]) == 0
    out = capsys.readouterr().out
    assert "evaluation, text-to-image: precision_at_1" in out and "each over its own candidates" in out
    assert "evaluation, text-to-image: recall_at_1" in out and "each query over 183 candidates (the task's pool)" in out
    evaluate_it = next(line for line in out.splitlines() if line.startswith("evaluate it: "))
    assert evaluate_it == f"evaluate it: moca eval --model {run} --data {run / 'eval-data'}"
    embed = next(line for line in out.splitlines() if line.startswith("embed with it: "))
    (run / "cl" / "eval.json").unlink()
    assert cli.main(shlex.split(evaluate_it.split(": ", 1)[1])[1:]) == 0
    captured = capsys.readouterr()
    assert f"model: {run} holds both stages: using the last one with a checkpoint, {run / 'cl'}" in captured.err
    assert "Embedding: 100%" in captured.err  # the progress bar
    assert (run / "cl" / "eval.json").exists()  # beside the model, as moca train writes it
    inputs = tmp_path / "INPUTS.jsonl"
    inputs.write_text('{"text": "a red circle"}\n')
    command = shlex.split(embed.split(": ", 1)[1].split("   (")[0].replace("INPUTS.jsonl", str(inputs)).replace(
        "vectors.npy", str(tmp_path / "vectors.npy")))
    assert cli.main(command[1:]) == 0
    assert np.load(tmp_path / "vectors.npy").shape == (1, 64)
    # a run directory with no checkpoint in any stage is still refused, naming it
    (run / "cl" / "checkpoints").rename(run / "cl" / "set-aside")
    (run / "cpt" / "checkpoints").rename(run / "cpt" / "set-aside")
    assert cli.main(command[1:]) == 2
    assert f"{run}: no checkpoint in {run / 'cl' / 'checkpoints'} or {run / 'cpt' / 'checkpoints'} (its stages)" \
        in capsys.readouterr().err


def test_moca_eval_and_mtebs_evaluate_give_the_same_scores(cl_run, tmp_path, capsys):
    """Where mteb is installed (the `mteb` extra; not in CI's `test`): a text-to-image task built in
    memory from an evaluation file, the task's pictures as the corpus, scored by mteb.evaluate
    through ``MocaEncoder``, gives ``moca eval``'s pool nDCG@10 and Recall@1 on the same model."""
    mteb = pytest.importorskip("mteb")
    Dataset = pytest.importorskip("datasets").Dataset  # mteb's own dependency
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from PIL import Image

    from moca import Encoder, cli
    from moca.data import embedded
    from moca.export import MOCA_PROMPTS
    from moca.integrations.mteb import MocaEncoder
    folder = str(tmp_path / "export")
    Encoder.from_pretrained(str(cl_run)).save_pretrained(folder, prompts=MOCA_PROMPTS)
    eval_file = embedded.write_eval(str(tmp_path / "eval"), queries=12)
    assert cli.main(["eval", "--model", folder, "--data", eval_file, "--out", str(tmp_path / "scores")]) == 0
    ours = json.loads((tmp_path / "scores" / "eval.json").read_text())["tasks"]["text-to-image"]
    rows = [r for r in map(json.loads, open(eval_file)) if r["task"] == "text-to-image"]
    pictures = list(dict.fromkeys(c["image"] for r in rows for c in r["candidates"]))

    class TextToImage(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="MocaTextToImage", type="Any2AnyRetrieval", main_score="ndcg_at_10", description="moca's held-out set",
            reference=None, dataset={"path": "NA", "revision": "NA"}, category="t2i", eval_splits=["test"],
            eval_langs=["eng-Latn"], date=("2026-01-01", "2026-01-01"), dialect=[], domains=[], task_subtypes=[],
            license="cc-by-4.0", annotations_creators="derived", modalities=["image", "text"],
            sample_creation="created", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            base = os.path.dirname(eval_file)
            self.dataset = {"default": {"test": RetrievalSplitData(
                queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(rows))],
                                           "text": [r["query"]["text"] for r in rows]}),
                corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(len(pictures))],
                                          "image": [Image.open(os.path.join(base, p)).convert("RGB")
                                                    for p in pictures]}),
                relevant_docs={f"q{i}": {f"d{pictures.index(r['candidates'][0]['image'])}": 1}
                               for i, r in enumerate(rows)},
                top_ranked=None)}}
            self.data_loaded = True

    results = mteb.evaluate(MocaEncoder(folder, device="cpu", name="moca/tiny"), [TextToImage()], cache=None,
                            show_progress_bar=False)
    theirs = results.task_results[0].scores["test"][0]
    assert ours["pool_size"] == len(pictures)
    assert ours["pool_ndcg_at_10"] == pytest.approx(theirs["ndcg_at_10"], abs=1e-3)
    assert ours["pool_recall_at_1"] == pytest.approx(theirs["recall_at_1"], abs=1e-3)
    assert ours["pool_recall_at_10"] == pytest.approx(theirs["recall_at_10"], abs=1e-3)
