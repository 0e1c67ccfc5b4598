"""The stage-1 trainer on the tiny model and the embedded dataset: the CLI end to end, exact
resume, bad records, the NaN guard, settings."""
import json
import logging
import math
import os

import pytest
import torch
from lines import logged

from moca import checkpoint, cli
from moca.config import Config
from moca.data.tokenizer import ByteTokenizer
from moca.model.heads import MocaCPT
from moca.train import train


def _config(out, **change):
    return Config().update({"run.stage": "cpt", "out": str(out), "cpt.max_steps": 12, "save_every": 6, "log_every": 3,
                            "token_budget": 512, **change})


def _newest(run) -> str:
    return os.path.basename(checkpoint.find(str(run)))


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--stage", "cpt", "--out", str(run), "--max-steps", "4", "save_every=2", "log_every=2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "run directory:" in out and "MLM accuracy" in out and f"(chance {1 / ByteTokenizer().vocab_size:.4f})" in out
    for name in ("config.json", "metrics.jsonl", "loss.png", "data/cpt.jsonl"):
        assert (run / name).exists(), name
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("step", "stage", "loss", "mlm_loss", "mae_loss", "mlm_accuracy", "lr", "tokens_per_s", "model_tflops"):
        assert key in rows[-1], key
    assert _newest(run) == "step-0000004"


def test_resume_continues_exactly(tmp_path):
    # lines every 4 steps, checkpoints every 6: the checkpoint at 6 falls inside the window of the
    # line at step 8, whose means need steps 5 and 6 from before the cut
    whole = train(_config(tmp_path / "whole", log_every=4))
    train(_config(tmp_path / "cut", log_every=4), stop_at=10)  # killed after step 10
    assert _newest(tmp_path / "cut") == "step-0000006"
    resumed = train(Config.read(str(tmp_path / "cut")), resume=True)
    timed = ("tokens_per_s", "model_tflops")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timed} for r in rows]  # noqa: E731
    assert strip([resumed]) == strip([whole]) and whole["mlm_chance"] == 1 / ByteTokenizer().vocab_size
    # the same losses at every logged step: 4 and 8 before the cut, 8 (logged again) and 12 after
    # the resume from step 6
    assert [r["step"] for r in _metrics(tmp_path / "cut")] == [4, 8, 12]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "whole"))


def test_bad_records_are_skipped_or_fatal_under_strict(tmp_path, capsys, caplog):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a fine document about shapes"}) + "\n{broken\n" +
                    json.dumps({"text": "another one"}) + "\n")
    caplog.set_level(logging.INFO, logger="moca")
    with pytest.warns(UserWarning, match="data.jsonl:2: malformed JSON"):
        train(_config(tmp_path / "run", documents=str(data), max_steps=2))
    assert any("skipped 1 bad records" in line for line in caplog.messages)
    code = cli.main(["train", "--stage", "cpt", "--out", str(tmp_path / "strict"), "--data", str(data), "--strict",
                     "--max-steps", "2"])
    assert code == 2 and "data.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = MocaCPT.forward
    calls = {"n": 0}

    def poisoned(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        calls["n"] += 1
        if calls["n"] > 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MocaCPT, "forward", poisoned)
    message = r"became nan at step 7; stopped\. The last good checkpoint is .*step-0000006"
    with pytest.raises(FloatingPointError, match=message):
        train(_config(tmp_path / "run"))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        Config().update({"learning_rate": "1"})
    with pytest.raises(ValueError, match="cpt.lr takes a float"):
        Config().update({"lr": "fast"})
    config = Config().update({"use_mae": "false", "lr": "1e-4", "cl.lr": "2e-5"})
    assert config.cpt.use_mae is False and config.cpt.lr == 1e-4 and config.cl.lr == 2e-5


def test_a_local_checkpoint_and_its_tokenizer(tmp_path, caplog):
    # What a user with a real checkpoint does, on a tiny one saved with save_pretrained and a word
    # tokenizer that places Qwen's special tokens at the checkpoint's ids.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moca.data import embedded
    from moca.data.tokenizer import ByteTokenizer, HFTokenizer
    from moca.model.qwen import build
    data = embedded.write(str(tmp_path / "data"), documents=40)
    with open(data) as f:
        words = sorted({w for line in f for w in json.loads(line)["text"].split() if w != "<image>"})
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words)}
    specials = ByteTokenizer().ids
    vocab.update({name: i for name, i in specials.items() if name != "<|mask|>"})  # <|mask|> gets added
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="<|endoftext|>",
                                        additional_special_tokens=[n for n in specials if n not in
                                                                   ("<|endoftext|>", "<|mask|>")])
    checkpoint = tmp_path / "checkpoint"
    torch.manual_seed(0)
    build("tiny").save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    tok = HFTokenizer(str(checkpoint))
    # <|mask|> is appended after the largest id, past the tiny model's rows: the trainer grows
    # the embedding table (Qwen2.5's padded table has room, so nothing changes there)
    rows = ByteTokenizer().vocab_size
    assert tok.specials.image == specials["<|image_pad|>"] and tok.specials.mask == rows
    caplog.set_level(logging.INFO, logger="moca")
    config = Config().update({"run.stage": "cpt", "model.path": str(checkpoint), "documents": data,
                              "out": str(tmp_path / "run"), "cpt.max_steps": 3, "log_every": 1, "save_every": 3})
    train(config)
    assert any(f"embedding table resized from {rows} rows to {rows + 1}" in line for line in caplog.messages)
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3]
    # the run embeds through its own tokenizer, and an export carries that tokenizer along
    from moca import Encoder
    encoder = Encoder.from_pretrained(str(tmp_path / "run"))
    vectors = encoder.encode([words[0], " ".join(words[:3])])
    encoder.save_pretrained(str(tmp_path / "export"))
    assert (tmp_path / "export" / "tokenizer.json").exists()
    exported = Encoder.from_pretrained(str(tmp_path / "export"))
    torch.testing.assert_close(exported.encode([words[0], " ".join(words[:3])]), vectors, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lacks .*<\\|image_pad\\|>.*: not a Qwen2-VL tokenizer"):
        bare = tmp_path / "bare"
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                unk_token="[UNK]").save_pretrained(bare)
        HFTokenizer(str(bare))


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = train(_config(tmp_path / "plain", max_steps=3, log_every=1))
    checkpointed = train(_config(tmp_path / "ckpt", max_steps=3, log_every=1, gradient_checkpointing=True))
    for key in ("loss", "mlm_loss", "mae_loss"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_a_corrupt_image_found_at_training_time_is_skipped(tmp_path, caplog):
    # The index reads image headers only; pixels that fail to decode later cost their document,
    # with a message naming file and line, not the run.
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (10, 200, 30)).save(buffer, format="PNG")
    good = buffer.getvalue()
    (tmp_path / "ok.png").write_bytes(good)
    (tmp_path / "bad.png").write_bytes(good[:60])  # a valid header, truncated pixels
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"document {i} shows <image> a green square", "images": ["ok.png"]}) for i in range(6)]
    lines.append(json.dumps({"text": "a broken <image> one", "images": ["bad.png"]}))
    data.write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.INFO, logger="moca")
    # cache_bytes=0: nothing kept, every micro-batch's documents are read again (pure streaming)
    train(_config(tmp_path / "run", documents=str(data), max_steps=4, log_every=1, cache_bytes=0))
    logs = caplog.messages
    skipped = [line for line in logs if "data.jsonl:7: image 'bad.png' could not be decoded" in line]
    assert len(skipped) == 1 and "document skipped" in skipped[0]  # said once, over several epochs
    assert any(line.startswith("7 documents") for line in logs)  # the header passed the index


def test_the_index_is_cached_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    from moca.data import index as train_module
    from moca.data.records import DataError
    from moca.data.tokenizer import ByteTokenizer
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"document number {i} about shapes"}) + "\n" for i in range(8)) +
                    "{broken\n")
    config = _config(tmp_path / "a", documents=str(data), index_cache=str(tmp_path / "index"))
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="malformed JSON"):
        first = train_module.index_documents(config, tok, str(data))
    scans = []
    original = train_module.read_cpt
    monkeypatch.setattr(train_module, "read_cpt", lambda *a, **k: scans.append(a) or original(*a, **k))
    with logged() as logs:
        again = train_module.index_documents(config.update({"out": str(tmp_path / "b")}), tok, str(data))
    assert again == first and not scans  # from the cache, with the bad record still counted
    assert any("skipped 1 bad records" in line for line in logs)
    with pytest.raises(DataError, match="data.jsonl:9: malformed JSON"):  # strict sees cached bad records too
        train_module.index_documents(config.update({"strict": "true"}), tok, str(data))
    data.write_text(json.dumps({"text": "only one document now"}) + "\n")
    assert len(train_module.index_documents(config, tok, str(data))) == 1 and scans


def test_background_loading_gives_the_same_run(tmp_path):
    # prefetch (by default 2 on a GPU) prepares micro-batches in a thread; the run must equal the inline one.
    inline = train(_config(tmp_path / "inline", max_steps=6, prefetch=0))
    ahead = train(_config(tmp_path / "ahead", max_steps=6, prefetch=3))
    timed = ("tokens_per_s", "model_tflops")
    assert {k: v for k, v in inline.items() if k not in timed} == {k: v for k, v in ahead.items() if k not in timed}


def test_a_loader_error_reaches_the_training_loop(tmp_path):
    from moca.data.loader import background

    def items():
        yield 1
        raise ValueError("bad record at data.jsonl:7")
    stream = background(items(), 2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="data.jsonl:7"):
        next(stream)


def test_documents_longer_than_a_packed_row_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_doc_tokens \(2048\) must be between 1 and token_budget \(1024\)"):
        train(_config(tmp_path / "run", max_doc_tokens=2048, token_budget=1024))


def test_an_unknown_image_decoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.image_decoder must be one of pil, dali-cpu, dali-gpu"):
        train(_config(tmp_path / "run", image_decoder="opencv"))


def _cl_config(out, **change):
    return Config().update({"run.stage": "cl", "out": str(out), "cl.max_steps": 6, "save_every": 3, "log_every": 2,
                            "token_budget": 512, "pairs_per_batch": 8, "cl.lr": 1e-3, **change})


def test_stage_two_trains_on_the_embedded_pairs(tmp_path):
    result = train(_cl_config(tmp_path / "cl", max_steps=12, log_every=3))
    rows = _metrics(tmp_path / "cl")
    assert [r["step"] for r in rows] == [3, 6, 9, 12] and all(r["stage"] == "cl" for r in rows)
    for key in ("loss", "accuracy", "temperature", "tokens_per_s", "lr"):
        assert key in rows[-1], key
    assert rows[-1]["temperature"] == pytest.approx(0.03)
    assert result["accuracy_chance"] == pytest.approx(1 / 10)
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)


def test_stage_two_resumes_exactly_and_grad_cache_changes_nothing(tmp_path):
    whole = train(_cl_config(tmp_path / "whole"))
    train(_cl_config(tmp_path / "cut"), stop_at=5)
    resumed = train(Config.read(str(tmp_path / "cut")), resume=True)
    timed = ("tokens_per_s",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timed} for r in rows]  # noqa: E731
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "whole")) and resumed["step"] == 6
    cached = train(_cl_config(tmp_path / "cache", grad_cache="true"))
    assert cached["loss"] == pytest.approx(whole["loss"], rel=1e-4)


def test_stage_two_starts_from_a_stage_one_run(tmp_path, caplog):
    train(_config(tmp_path / "cpt", max_steps=3, save_every=3))
    caplog.set_level(logging.INFO, logger="moca")
    train(_cl_config(tmp_path / "cl", init=str(tmp_path / "cpt"), max_steps=2))
    loaded = [line.split("(")[0].rstrip() for line in caplog.messages if "loaded the backbone from" in line]
    assert loaded and loaded[0].endswith("step-0000003")
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(_cl_config(tmp_path / "cl2", init=str(tmp_path / "nothing")))


def test_cli_runs_stage_two(tmp_path, capsys):
    run = tmp_path / "cl"
    assert cli.main(["train", "--stage", "cl", "--out", str(run), "--max-steps", "2", "pairs_per_batch=4",
                     "log_every=1"]) == 0
    out = capsys.readouterr().out
    assert "in-batch accuracy" in out and "(chance 0.167)" in out and (run / "data" / "pairs.jsonl").exists()
    # the settings of a stage that does not run are refused, not silently ignored
    assert cli.main(["train", "--stage", "cl", "--out", str(tmp_path / "x"), "cpt.max_steps=2"]) == 2
    assert "cpt.max_steps sets stage cpt, which --stage cl does not run" in capsys.readouterr().err


def test_the_embedded_default_runs_both_stages_and_the_evaluation(tmp_path, capsys, monkeypatch):
    # moca train with no stage: stage 1, stage 2 from its checkpoint, the held-out evaluation (reduced size)
    import moca.train
    plotted = []
    original = moca.train.plot_both
    monkeypatch.setattr(moca.train, "plot_both", lambda *a, **k: plotted.append(a) or original(*a, **k))
    run = tmp_path / "both"
    assert cli.main(["train", "--out", str(run), "--max-steps", "4", "cl.max_steps=3", "pairs_per_batch=4",
                     "save_every=2", "log_every=2"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: MLM accuracy" in out and "stage 2: in-batch accuracy" in out
    assert "evaluation, text-to-image: precision_at_1" in out and "evaluation, retrieval: ndcg_at_5" in out
    assert _newest(run / "cpt") == "step-0000004"
    assert _newest(run / "cl") == "step-0000003"
    scores = json.loads((run / "cl" / "eval.json").read_text())
    assert set(scores["tasks"]) == {"text-to-image", "image-to-text", "retrieval"} and scores["overall"]["n"] == 240
    # run/loss.png: both stages' logged rows, with their accuracies' chance levels, and the scores
    assert len(plotted) == 1
    stages, evaluation, path = plotted[0][:3]
    assert [(name, folder) for name, folder, _ in stages] == [("cpt", str(run / "cpt")), ("cl", str(run / "cl"))]
    assert stages[0][2]["mlm_chance"] > 0 and stages[1][2]["accuracy_chance"] == 1 / (4 + 2)
    assert evaluation == scores and path == str(run / "loss.png") and (run / "loss.png").stat().st_size > 20_000
    # resuming a finished run does nothing again; a user's CPT data without pairs is refused
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "stage cpt already finished" in out and "stage cl already finished" in out and "stage 1: MLM" in out
    assert cli.main(["train", "--data", str(run / "cpt" / "data" / "cpt.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "needs pairs=PAIRS" in capsys.readouterr().err


def test_stage_two_stops_on_a_nan_loss(tmp_path, monkeypatch):
    from moca.model.embed import MocaEmbedder
    original = MocaEmbedder.loss
    monkeypatch.setattr(MocaEmbedder, "loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(FloatingPointError, match=r"became nan at step 0; stopped\. The last good checkpoint is none"):
        train(_cl_config(tmp_path / "cl"))


def test_the_pairs_index_is_cached(tmp_path, monkeypatch):
    from moca.data import embedded
    from moca.data import index as stages
    config = _cl_config(tmp_path / "a", index_cache=str(tmp_path / "index"))
    pairs = embedded.write_pairs(str(tmp_path / "data"))
    first = stages.index_pairs(config, pairs)
    scans = []
    original = stages.read_pairs
    monkeypatch.setattr(stages, "read_pairs", lambda *a, **k: scans.append(a) or original(*a, **k))
    again = stages.index_pairs(config, pairs)
    assert again == first and not scans and {e.task for e in first} == {"text-to-image", "image-to-text"}
    stages.index_pairs(config.update({"hard_negatives": 0}), pairs)  # other settings: a new scan
    assert scans


def test_both_stages_on_user_files(tmp_path, capsys):
    # a user's stage-1 documents, stage-2 pairs and evaluation file (here written by the embedded
    # generators into a folder of their own)
    from moca.data import embedded
    folder = tmp_path / "user"
    documents = embedded.write(str(folder / "cpt"), documents=24)
    pairs = embedded.write_pairs(str(folder / "pairs"), pairs=16)
    evaluation = embedded.write_eval(str(folder / "eval"), queries=6)
    run = tmp_path / "run"
    assert cli.main(["train", "--stage", "both", "--data", documents, f"pairs={pairs}", f"evaluation={evaluation}",
                     "--out", str(run), "--max-steps", "2", "pairs_per_batch=4", "log_every=1"]) == 0
    out = capsys.readouterr().out
    assert "evaluation, text-to-image" in out
    assert not (run / "cpt" / "data").exists() and not (run / "cl" / "data").exists()
    assert json.loads((run / "cl" / "eval.json").read_text())["overall"]["n"] == 6
