"""Stage-2 embeddings and the contrastive step on the tiny model: pooling, the loss against a
dense computation, GradCache against the plain batch."""
import math

import pytest
import torch
from documents import random_document

from moca.data.cpt import pack_documents
from moca.model.embed import MocaEmbedder, contrastive_step
from moca.model.qwen import TINY_SPECIALS, build

IMAGE = TINY_SPECIALS["image_token_id"]



@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return MocaEmbedder(build("tiny"))


def test_embeddings_are_the_normalized_mean_and_packing_does_not_change_them(embedder):
    docs = [random_document(7, 1), random_document(12, 2, (1, 4, 4)), random_document(3, 3)]
    with torch.no_grad():
        packed = embedder(pack_documents(docs, IMAGE))
        alone = torch.cat([embedder(pack_documents([d], IMAGE)) for d in docs])
        hidden = embedder.model.model(input_ids=docs[0].ids[None]).last_hidden_state[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(packed[0], torch.nn.functional.normalize(hidden.mean(0), dim=0), rtol=1e-5, atol=1e-5)


def test_loss_is_moca_infonce_against_a_dense_computation():
    embedder = MocaEmbedder(torch.nn.Identity(), temperature=0.05, learn_temperature=True)
    gen = torch.Generator().manual_seed(4)
    shapes = ((5, 8), (5, 8), (5, 2, 8))
    q, p, n = (torch.nn.functional.normalize(torch.randn(*s, generator=gen), dim=-1) for s in shapes)
    loss = embedder.loss(q, p, n)
    # each query: every positive of the batch, then its own two negatives; the positive is column i
    logits = torch.cat([q @ p.T, torch.einsum("bd,bkd->bk", q, n)], 1) / 0.05
    dense = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(loss, dense)
    loss.backward()
    assert embedder.log_temperature.grad is not None and math.isclose(embedder.temperature().item(), 0.05, rel_tol=1e-6)


def test_grad_cache_gives_the_gradients_of_the_plain_batch():
    docs = [random_document(5 + i, 10 + i, (1, 4, 4) if i % 3 == 0 else None) for i in range(12)]
    queries, positives = docs[:4], docs[4:8]
    negatives = [[docs[8 + i], docs[(9 + i) % 4 + 8]] for i in range(4)]
    grads = []
    for grad_cache in (False, True):
        torch.manual_seed(0)
        embedder = MocaEmbedder(build("tiny"), learn_temperature=True)
        out = contrastive_step(embedder, queries, positives, negatives, IMAGE, token_budget=40, device="cpu",
                               grad_cache=grad_cache)
        grads.append((out, {k: v.grad.clone() for k, v in embedder.named_parameters() if v.grad is not None}))
    (plain, g_plain), (cached, g_cached) = grads
    assert plain["loss"].item() == pytest.approx(cached["loss"].item(), rel=1e-6)
    assert g_plain.keys() == g_cached.keys() and "log_temperature" in g_plain
    assert sum(v.abs().sum() for v in g_plain.values()) > 0
    for name in g_plain:
        torch.testing.assert_close(g_cached[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_step_without_hard_negatives(embedder):
    docs = [random_document(4 + i, 30 + i) for i in range(6)]
    out = contrastive_step(embedder, docs[:3], docs[3:], [[] for _ in range(3)], IMAGE, token_budget=64, device="cpu")
    assert torch.isfinite(out["loss"]) and 0 <= out["accuracy"] <= 1
