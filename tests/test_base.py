"""The causal base (``cpt.objective=next-token``) that the tiny preset's ablation rows start from,
and ``model.init``, which starts a run from another run's backbone."""
import torch

from moca import checkpoint
from moca.config import Config
from moca.data import embedded, loader
from moca.data.cpt import pack_documents
from moca.data.index import index_documents
from moca.data.masking import IGNORE, next_token_labels
from moca.data.tokenizer import ByteTokenizer, maskable
from moca.model.qwen import build, packed_hidden
from moca.parallel import Single
from moca.stages import CptStage
from moca.train import train

SPECIALS = ByteTokenizer().specials


def test_next_token_labels_stay_inside_each_document_and_skip_special_tokens():
    s = SPECIALS
    ids = torch.tensor([10, 11, s.vision_start, s.image, s.vision_end, 12, 20, 21, 22])
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    labels = next_token_labels(ids, cu, maskable(ids, s))
    i = IGNORE
    # 10 -> 11; 11 -> <vision_start> (special: none); the picture's tokens -> none; <vision_end> -> 12;
    # 12 ends its document; 20 -> 21 -> 22; 22 ends the row
    assert labels.tolist() == [11, i, i, i, 12, i, 21, 22, i]


def _config(tmp_path, **settings) -> Config:
    return Config().update({"run.stage": "cpt", "out": str(tmp_path / "run"), "token_budget": 512,
                            "cpt.objective": "next-token", **settings}).validate()


def test_a_next_token_stage_reads_whole_documents_and_attends_causally(tmp_path):
    config = _config(tmp_path)
    tok, path = ByteTokenizer(), embedded.write(str(tmp_path / "data"), documents=12)
    entries = index_documents(config, tok, path)
    docs = loader.documents(entries, config, tok)
    torch.manual_seed(0)
    model = build("tiny")
    batch, _, _, _ = next(loader.micro_batch_stream(entries, docs, tok, model.config, config, 0, 0, 0, 0, 1))
    whole = pack_documents(docs.get(loader.micro_batches(entries, 512, config.run.seed, 0)[0]), tok.specials.image)
    assert torch.equal(batch["input_ids"], whole["input_ids"]) and torch.equal(batch["pixel_values"],
                                                                               whole["pixel_values"])
    ids = whole["input_ids"][0]
    assert torch.equal(batch["labels"], next_token_labels(ids, whole["cu_seqlens"], maskable(ids, tok.specials)))
    assert batch["mae_positions"].numel() == 0

    stage = CptStage(config, model, tok, Single())
    assert stage.module.mae_decoder is None and stage.module.use_mlm
    # causal: changing a document's last token leaves every earlier state of it unchanged
    end = int(whole["cu_seqlens"][1]) - 1
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, end] = tok.words[" red"] if int(ids[end]) != tok.words[" red"] else tok.words[" blue"]
    with torch.no_grad():
        before, after = packed_hidden(model, batch), packed_hidden(model, changed)
    assert torch.equal(before[:end], after[:end]) and not torch.equal(before[end], after[end])
    with torch.no_grad():
        out = stage.module(batch)
    assert torch.isfinite(out["loss"]) and float(out["mae_loss"]) == 0.0


def test_model_init_starts_a_run_from_another_runs_backbone(tmp_path):
    base = _config(tmp_path, **{"out": str(tmp_path / "base"), "max_steps": 2, "log_every": 1})
    train(base)
    # stage 2 at learning rate 0 from the base: its saved backbone is the base's, not a fresh one
    run = Config().update({"run.stage": "cl", "out": str(tmp_path / "cl"), "token_budget": 512, "cl.lr": 0.0,
                           "cl.max_steps": 1, "cl.pairs_per_batch": 4, "run.seed": 5,
                           "model.init": str(tmp_path / "base")}).validate()
    train(run)
    _, from_base, _ = checkpoint.load_run(str(tmp_path / "base"))
    _, started, _ = checkpoint.load_run(str(tmp_path / "cl"))
    for (name, a), (_, b) in zip(from_base.model.named_parameters(), started.model.named_parameters()):
        assert torch.equal(a, b), name
    torch.manual_seed(5)
    fresh = build("tiny")
    assert not torch.equal(fresh.model.language_model.layers[0].mlp.up_proj.weight,
                           started.model.language_model.layers[0].mlp.up_proj.weight)
