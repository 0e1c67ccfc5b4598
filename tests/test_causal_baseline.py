"""The paper's causal baseline: ``cl.attention=causal`` gives the stock causal Qwen forward, and
``cl.pooling=last`` the state of each packed document's last token, in training, the Encoder and
the export."""
import json

import torch
from documents import random_document

from moca.data.cpt import document_positions, pack_documents
from moca.model.embed import MocaEmbedder
from moca.model.qwen import PRESETS, TINY_SPECIALS, build, packed_hidden

IMAGE = TINY_SPECIALS["image_token_id"]



def test_a_causal_model_equals_the_stock_causal_qwen_forward():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    embedder = MocaEmbedder(build("tiny"), attention="causal", pooling="last").eval()
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PRESETS["tiny"], attn_implementation="eager")).eval()
    stock.load_state_dict(embedder.model.state_dict())
    assert all(layer.self_attn.is_causal for layer in stock.model.language_model.layers)  # stock Qwen is causal
    causal = {}
    for doc in (random_document(11, 1), random_document(9, 2, grid=(1, 4, 4), at=2)):
        with torch.no_grad():
            causal[doc.where] = packed_hidden(embedder.model, pack_documents([doc], IMAGE))
            # M-RoPE positions as get_rope_index gives them (tests/test_model_qwen.py checks that)
            stock_hidden = stock.model(input_ids=doc.ids[None], pixel_values=doc.rows if doc.rows.numel() else None,
                                       image_grid_thw=doc.grids if doc.grids.numel() else None,
                                       position_ids=document_positions(doc.ids, doc.grids, IMAGE)[:, None]
                                       ).last_hidden_state[0]
        torch.testing.assert_close(causal[doc.where], stock_hidden, rtol=1e-4, atol=1e-4)
    # made bidirectional again (MoCa), the first token sees the later ones
    bidirectional = MocaEmbedder(embedder.model).eval()
    with torch.no_grad():
        moca = packed_hidden(bidirectional.model, pack_documents([random_document(11, 1)], IMAGE))
    assert (moca[0] - causal["doc1"][0]).abs().max() > 1e-3


def test_last_token_pooling_takes_each_packed_documents_last_token():
    torch.manual_seed(1)
    embedder = MocaEmbedder(build("tiny"), attention="causal", pooling="last").eval()
    docs = [random_document(7, 3), random_document(12, 4, grid=(1, 4, 4), at=2), random_document(1, 5),
            random_document(5, 6)]
    with torch.no_grad():
        batch = pack_documents(docs, IMAGE)
        packed = embedder(batch)
        hidden = packed_hidden(embedder.model, batch)
        alone = [packed_hidden(embedder.model, pack_documents([d], IMAGE))[-1] for d in docs]
    ends = torch.tensor([d.ids.numel() for d in docs]).cumsum(0) - 1
    torch.testing.assert_close(packed, torch.nn.functional.normalize(hidden[ends], dim=-1))
    torch.testing.assert_close(packed, torch.nn.functional.normalize(torch.stack(alone), dim=-1), rtol=1e-5, atol=1e-5)
    mean = MocaEmbedder(embedder.model, attention="causal", pooling="mean").eval()
    with torch.no_grad():
        assert (mean(batch) - packed).abs().max() > 1e-3


def test_stage_two_trains_the_causal_baseline_and_its_export_keeps_it(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from moca import Encoder
    from moca.config import Config
    from moca.train import train
    run = tmp_path / "cl"
    train(Config().update({"run.stage": "cl", "out": str(run), "cl.max_steps": 2, "save_every": 2, "log_every": 1,
                           "token_budget": 512, "pairs_per_batch": 4, "attention": "causal", "pooling": "last"}))
    encoder = Encoder.from_pretrained(str(run))
    assert encoder.embedder.attention == "causal" and encoder.embedder.pooling == "last"
    inputs = ["a red circle on a white background", "a blue diamond"]
    vectors = encoder.encode(inputs, convert_to_tensor=True)
    encoder.save_pretrained(str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "moca.json").read_text())
    assert meta["attention"] == "causal" and meta["pooling"] == "last"
    torch.testing.assert_close(Encoder.from_pretrained(str(tmp_path / "export")).encode(inputs, convert_to_tensor=True),
                               vectors)
    # plain transformers reads the export as causal; its last token's state is the embedding
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "export"), attn_implementation="eager")
    assert plain.config.text_config.is_causal is True
    ids = torch.tensor([encoder.tokenizer.encode(inputs[0])])
    with torch.no_grad():
        last = plain.model(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.nn.functional.normalize(last, dim=0), vectors[0], rtol=1e-4, atol=1e-4)
