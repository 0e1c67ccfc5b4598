"""MoCa's stage-1 heads on the tiny model: the losses are the ones defined, switchable, and they
fall when trained on a fixed batch."""
import numpy as np
import pytest
import torch
from PIL import Image

from moca.data.cpt import collate, encode
from moca.data.records import CptDocument
from moca.data.tokenizer import ByteTokenizer
from moca.model.heads import MocaCPT
from moca.model.qwen import build, packed_hidden
from moca_kernels import linear_cross_entropy

SMALL = dict(min_pixels=56 * 56, max_pixels=56 * 56)


def _docs(tok):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    return [encode(CptDocument("the cat sat on the mat <image> and more", [image], "f:1"), tok, 200, **SMALL),
            encode(CptDocument("another document of plain text", [], "f:2"), tok, 200, **SMALL)]


def test_losses_are_mlm_plus_weighted_mae():
    tok = ByteTokenizer()
    torch.manual_seed(0)
    heads = MocaCPT(build("tiny"), mae_weight=0.5)
    batch = collate(_docs(tok), tok.specials, 0.4, 0.5, torch.Generator().manual_seed(3))
    out = heads(batch, accuracy=True)
    rows = (batch["labels"] != -100).nonzero().squeeze(1)
    hidden = packed_hidden(heads.model, batch)
    mlm = linear_cross_entropy(hidden[rows], heads.model.lm_head.weight, batch["labels"][rows])
    predicted = (hidden[rows] @ heads.model.lm_head.weight.T).argmax(1)
    assert out["mlm_accuracy"] == pytest.approx((predicted == batch["labels"][rows]).float().mean().item())
    torch.testing.assert_close(out["mlm_loss"], mlm.detach())
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + 0.5 * out["mae_loss"])
    assert out["mae_loss"] > 0 and batch["mae_targets"].shape == (4 * 2, 1176)  # 2 of the image's 4 tokens


@pytest.mark.parametrize("use_mlm,use_mae", [(True, False), (False, True)])
def test_switches(use_mlm, use_mae):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    heads = MocaCPT(build("tiny"), use_mlm=use_mlm, use_mae=use_mae)
    out = heads(collate(_docs(tok), tok.specials, 0.4, 0.5, torch.Generator().manual_seed(3)), accuracy=True)
    assert (out["mlm_loss"] > 0) == use_mlm and (out["mae_loss"] > 0) == use_mae
    assert ("mlm_accuracy" in out) == use_mlm  # no accuracy of a head that is not trained
    with pytest.raises(ValueError, match="at least one of MLM and MAE"):
        MocaCPT(build("tiny"), use_mlm=False, use_mae=False)


@pytest.mark.parametrize("use_mlm,use_mae,mlm_ratio", [(False, True, 0.4), (True, True, 0.0), (True, False, 0.0)])
def test_a_micro_batch_with_nothing_to_learn_backpropagates_zero(use_mlm, use_mae, mlm_ratio):
    """Text only under MAE alone (nothing masked to reconstruct), or no masked token under MLM:
    the loss is a zero whose backward runs and leaves every gradient zero."""
    tok = ByteTokenizer()
    torch.manual_seed(0)
    heads = MocaCPT(build("tiny"), use_mlm=use_mlm, use_mae=use_mae)
    docs = _docs(tok)[1:]  # the text-only document
    out = heads(collate(docs, tok.specials, mlm_ratio, 0.5, torch.Generator().manual_seed(3)))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    grads = [p.grad for p in heads.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


def test_loss_falls_over_a_few_dozen_steps():
    tok = ByteTokenizer()
    torch.manual_seed(0)
    heads = MocaCPT(build("tiny"))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    docs, losses = _docs(tok), []
    for step in range(30):
        out = heads(collate(docs, tok.specials, 0.4, 0.5, torch.Generator().manual_seed(step)))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
