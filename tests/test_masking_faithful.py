"""Stage-1 masking as the authors do it: adding ``<|mask|>`` keeps every other special token out of
MLM, MAE's per-token Bernoulli draw has the right statistics, and an objective that is off corrupts
nothing."""
import math

import pytest
import torch

from moca.data.masking import choose_image_tokens

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                 "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_style_tokenizer(folder, words=("a", "red", "circle", "on", "white")):
    """A word-level tokenizer with Qwen2.5-VL's special tokens as extra specials and
    ``<|endoftext|>`` as eos, and no ``<|mask|>``, saved under ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words), "<|endoftext|>": len(words) + 1}
    for name in QWEN_SPECIALS:
        vocab[name] = len(vocab)
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="<|endoftext|>",
                            additional_special_tokens=QWEN_SPECIALS).save_pretrained(folder)
    return vocab


def test_adding_the_mask_token_keeps_the_other_special_tokens_special(tmp_path):
    from moca.data.tokenizer import MASK_TOKEN, HFTokenizer, maskable
    vocab = _qwen_style_tokenizer(tmp_path / "tok")
    tok = HFTokenizer(str(tmp_path / "tok"))
    assert tok.specials.mask == len(vocab) and tok.tok.convert_tokens_to_ids(MASK_TOKEN) == len(vocab)
    text = "<|im_start|> a red circle <|box_start|> on <|vision_pad|> white <|im_end|> <|video_pad|>"
    ids = torch.tensor(tok.encode(text))
    assert ids.tolist() == [vocab[w] for w in text.split()]
    free = maskable(ids, tok.specials).tolist()
    assert free == [w in ("a", "red", "circle", "on", "white") for w in text.split()]
    for name in QWEN_SPECIALS + ["<|endoftext|>", MASK_TOKEN]:
        assert tok.tok.convert_tokens_to_ids(name) in tok.specials.all, name
    # saved with an export and read back, the tokenizer keeps <|mask|> and its specials
    tok.tok.save_pretrained(tmp_path / "again")
    again = HFTokenizer(str(tmp_path / "again"))
    assert again.specials == tok.specials


def test_mae_bernoulli_draws_each_token_independently_with_the_ratio():
    gen = torch.Generator().manual_seed(3)
    many = choose_image_tokens(200_000, 0.5, gen, "bernoulli")
    assert abs(many.float().mean().item() - 0.5) < 0.005
    # the count of one image of 10 tokens is Binomial(10, 0.3): its mean and variance, and not a constant
    counts = torch.tensor([choose_image_tokens(10, 0.3, gen, "bernoulli").sum().item() for _ in range(4000)],
                          dtype=torch.float)
    assert abs(counts.mean().item() - 3.0) < 0.1 and abs(counts.var().item() - 2.1) < 0.2
    # an image of one merged token is masked about half the time (never under the exact count)
    ones = [choose_image_tokens(1, 0.5, gen, "bernoulli").item() for _ in range(2000)]
    assert abs(sum(ones) / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)
    assert not any(choose_image_tokens(1, 0.5, gen, "count").item() for _ in range(50))
    assert choose_image_tokens(37, 0.5, gen, "count").sum().item() == 18
    with pytest.raises(ValueError, match="MAE sampling must be count or bernoulli"):
        choose_image_tokens(4, 0.5, gen, "poisson")


def test_the_setting_reaches_the_micro_batch(tmp_path):
    # cpt.mae_sampling=bernoulli through collate: one-token images get masked in some micro-batches
    from moca.config import Config
    from moca.data.cpt import Encoded, collate
    from moca.data.tokenizer import ByteTokenizer
    assert Config().update({"mae_sampling": "bernoulli"}).validate().cpt.mae_sampling == "bernoulli"
    with pytest.raises(ValueError, match="cpt.mae_sampling must be one of count, bernoulli"):
        Config().update({"mae_sampling": "exact"}).validate()
    sp = ByteTokenizer().specials
    doc = Encoded(torch.tensor([97, sp.vision_start, sp.image, sp.vision_end, 98]), torch.randn(4, 1176),
                  torch.tensor([[1, 2, 2]]), "doc")
    masked = [collate([doc], sp, 0.4, 0.5, torch.Generator().manual_seed(s), "bernoulli")["mae_positions"].numel()
              for s in range(200)]
    assert set(masked) == {0, 1} and 60 < sum(masked) < 140
    assert all(collate([doc], sp, 0.4, 0.5, torch.Generator().manual_seed(s))["mae_positions"].numel() == 0
               for s in range(20))


@pytest.mark.parametrize("off", ["use_mlm", "use_mae"])
def test_an_objective_that_is_off_corrupts_nothing(tmp_path, off):
    # The ablation's MLM-only row must read whole pictures and its MAE-only row whole text: a
    # corruption that no loss asks to undo only hides what the other objective reads.
    from moca.config import Config
    from moca.data import embedded, loader
    from moca.data.cpt import pack_documents
    from moca.data.index import index_documents
    from moca.data.tokenizer import ByteTokenizer
    from moca.model.qwen import build
    config = Config().update({"run.stage": "cpt", "out": str(tmp_path / "run"), "token_budget": 512,
                              f"cpt.{off}": "false"})
    tok, path = ByteTokenizer(), embedded.write(str(tmp_path / "data"), documents=12)
    entries = index_documents(config, tok, path)
    docs = loader.documents(entries, config, tok)
    stream = loader.micro_batch_stream(entries, docs, tok, build("tiny").config, config, 0, 0, 0, 0, 1)
    batch, _, _, _ = next(stream)
    whole = pack_documents(docs.get(loader.micro_batches(entries, 512, config.run.seed, 0)[0]), tok.specials.image)
    text_whole = torch.equal(batch["input_ids"], whole["input_ids"])
    pictures_whole = torch.equal(batch["pixel_values"], whole["pixel_values"])
    assert (text_whole, pictures_whole) == ((True, False) if off == "use_mlm" else (False, True))
    assert (batch["labels"] != -100).any() == (off == "use_mae")
