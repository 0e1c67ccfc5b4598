"""The tiny Qwen2.5-VL on moca's attention: bidirectional, packing-exact, and refusing padding."""
import pytest
import torch

from moca.model.qwen import build, text_positions
from moca_kernels.varlen import lengths_to_cu_seqlens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("tiny").eval()


def _hidden(model, ids, lengths):
    cu = lengths_to_cu_seqlens(torch.tensor(lengths))
    with torch.no_grad():
        return model.model(input_ids=ids, position_ids=text_positions(lengths), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=max(lengths), max_length_k=max(lengths)).last_hidden_state[0]


def test_a_later_token_changes_an_earlier_hidden_state(model):
    ids = torch.randint(0, 200, (1, 13), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 200
    before, after = _hidden(model, ids, [13]), _hidden(model, changed, [13])
    assert (before[0] - after[0]).abs().max() > 1e-3  # attention is bidirectional


def test_packed_documents_equal_each_document_alone(model):
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 200, (1, n), generator=gen) for n in (13, 1, 9)]
    packed = _hidden(model, torch.cat(docs, 1), [13, 1, 9])
    start = 0
    for doc in docs:
        alone = _hidden(model, doc, [doc.shape[1]])
        torch.testing.assert_close(packed[start:start + doc.shape[1]], alone, rtol=1e-5, atol=1e-5)
        start += doc.shape[1]


def test_a_padded_batch_is_refused(model):
    ids = torch.randint(0, 200, (2, 7))
    with pytest.raises(ValueError, match="not a padded batch: pack the documents"):
        model.model(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build("huge")
