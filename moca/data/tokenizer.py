"""Tokenizers for MoCa: a real model's own (from its local path, with ``<|mask|>`` added when it
lacks one), or, for the embedded default, a byte-level tokenizer the project defines itself, so
that nothing is downloaded. Both expose the ids the pipeline needs."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MASK_TOKEN = "<|mask|>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class Specials:
    mask: int
    image: int
    vision_start: int
    vision_end: int
    eos: int
    all: frozenset[int]  # every special id: never masked


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then one id for each of a small set of common English words
    (``WORDS``), then one for each of them with a leading space (" red"), then the special tokens.
    The embedded default's tokenizer (the ``tiny`` preset's vocabulary).

    As in a real (BPE) tokenizer, a common word is one token, so that MLM masks a whole word
    (which its bytes would give away), and the space before a word belongs to the word's token:
    with separate space tokens, four in ten of the MLM targets would be spaces, which a small
    model learns first and which keep it from learning the content words."""

    NAMES = ("<|endoftext|>", VISION_START, VISION_END, IMAGE_PAD, MASK_TOKEN, "<|video_pad|>", "<|im_start|>",
             "<|im_end|>")
    WORDS = ("a", "A", "and", "on", "of", "the", "is", "at", "this", "This", "It", "it", "shows", "show", "does",
             "What", "Find", "Here", "Look", "picture", "image", "drawing", "scene", "small", "simple", "background",
             "red", "green", "blue", "yellow", "purple", "orange", "black", "white",
             "circle", "square", "triangle", "diamond")
    _PIECES = re.compile(r" ?[A-Za-z]+|[^A-Za-z ]+| ")  # a word with the space before it; other runs; a space

    def __init__(self):
        spelled = [*self.WORDS, *(" " + word for word in self.WORDS)]
        self.words = {word: 256 + i for i, word in enumerate(spelled)}
        ids = {name: 256 + len(spelled) + i for i, name in enumerate(self.NAMES)}
        self.vocab_size = 256 + len(spelled) + len(self.NAMES)
        self.fingerprint = f"bytes+spaced-words:{self.vocab_size}"  # what an index of token counts depends on
        self.specials = Specials(mask=ids[MASK_TOKEN], image=ids[IMAGE_PAD], vision_start=ids[VISION_START],
                                 vision_end=ids[VISION_END], eos=ids["<|endoftext|>"], all=frozenset(ids.values()))
        self.ids = ids
        self._spelled = {i: word.encode() for word, i in self.words.items()}

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self._PIECES.findall(text):
            word = self.words.get(piece)
            out += [word] if word is not None else list(piece.encode("utf-8"))
        return out

    def lengths(self, texts: list[str]) -> list[int]:
        """How many tokens ``encode`` makes of each text."""
        return [len(self.encode(text)) for text in texts]

    def counter(self) -> ByteTokenizer:
        """What counts tokens in an index worker: this tokenizer itself (``lengths``)."""
        return self

    def decode(self, ids) -> str:
        return b"".join(bytes([i]) if i < 256 else self._spelled.get(i, b"") for i in ids).decode("utf-8",
                                                                                                  errors="replace")

    def to_transformers(self, max_length: int = 32768):
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast``, for exports that
        transformers and sentence-transformers load: text splits into runs of ASCII letters (with
        the space before them, if any), single spaces and runs of everything else; a run that is in
        ``words`` is its word's id, any other run is its UTF-8 bytes (ids 0..255); the special
        tokens are added tokens with this tokenizer's ids, recognised in text (``encode`` here
        never reads them from text). ``max_length`` becomes the tokenizer's ``model_max_length``.

        Built on a byte-level BPE without merges that takes a run whole when it is in the vocabulary
        (``ignore_merges``). The one-letter words without a space ("a", "A") would share their
        vocabulary entry with their byte, so a normalizer first rewrites such a word, standing
        alone and not after a space, to a private-use character that stands for it."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        stand_in = _byte_stand_ins()
        vocab = {stand_in[b]: b for b in range(256)}
        rewrites, decode_back, private = [], [], 0xE000
        for word, i in self.words.items():
            if len(word) == 1:
                proxy = chr(private)
                private += 1
                rewrites.append(normalizers.Replace(Regex(f"(?<![A-Za-z ]){word}(?![A-Za-z])"), proxy))
                decode_back.append(decoders.Replace(proxy, word))
                vocab["".join(stand_in[b] for b in proxy.encode())] = i
            else:
                vocab["".join(stand_in[b] for b in word.encode())] = i  # letters stand for themselves
        proxies = "".join(chr(c) for c in range(0xE000, private))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
        if rewrites:
            tok.normalizer = normalizers.Sequence(rewrites)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(f" ?[A-Za-z]+|[{proxies}]|[^A-Za-z {proxies}]+| "), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), *decode_back])
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in self.NAMES])
        wrong = {name: tok.token_to_id(name) for name in self.NAMES if tok.token_to_id(name) != self.ids[name]}
        if wrong:
            raise RuntimeError(f"special tokens got ids {wrong}, expected {self.ids}")
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       mask_token=MASK_TOKEN, model_max_length=max_length, padding_side="right")


def _byte_stand_ins() -> dict[int, str]:
    """The printable character that byte-level BPE vocabularies (GPT-2's convention, which
    ``tokenizers``' ByteLevel steps use) write for each byte: the byte's own character where it is
    printable Latin-1, else the next unused character from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out


class HFTokenizer:
    """A checkpoint's tokenizer (``AutoTokenizer`` from a local path, offline), with ``<|mask|>``
    added as a special token when missing (Qwen2.5's then gets id 151665, inside the padded
    embedding table)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # whatever a broken tokenizer.json or tokenizer_config.json makes transformers raise
            raise ValueError(f"{path}: its tokenizer cannot be loaded: {type(exc).__name__}: {exc}") from exc
        if MASK_TOKEN not in self.tok.get_vocab():
            self._add_mask_token()
        vocab = self.tok.get_vocab()
        missing = [t for t in (IMAGE_PAD, VISION_START, VISION_END) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer at {path} lacks {missing}: not a Qwen2-VL tokenizer")
        self.vocab_size = len(self.tok)
        tokenizer_json = os.path.join(path, "tokenizer.json")
        digest = "none"
        if os.path.exists(tokenizer_json):
            with open(tokenizer_json, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        self.fingerprint = f"hf:{digest}:{self.vocab_size}"  # what an index of token counts depends on
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else vocab[IMAGE_PAD]
        self.specials = Specials(mask=vocab[MASK_TOKEN], image=vocab[IMAGE_PAD], vision_start=vocab[VISION_START],
                                 vision_end=vocab[VISION_END], eos=eos, all=frozenset(self.tok.all_special_ids)
                                 | {vocab[MASK_TOKEN], vocab[IMAGE_PAD], vocab[VISION_START], vocab[VISION_END]})

    def _add_mask_token(self) -> None:
        """``<|mask|>`` as the tokenizer's mask token (the authors' way) or, where it has another
        one, as an added special token; either way the other special tokens stay special (setting
        the extra special tokens' list would replace it, making ``<|im_start|>`` and the like
        MLM targets)."""
        from tokenizers import AddedToken
        if self.tok.mask_token is None:
            self.tok.add_special_tokens({"mask_token": MASK_TOKEN})
        else:
            self.tok.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def counter(self) -> TokenCounter:
        """What counts tokens in an index worker: the fast tokenizer alone (no transformers)."""
        return TokenCounter(self.tok.backend_tokenizer)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


class TokenCounter:
    """Token counts of texts, a batch at a time, by a fast (Rust) tokenizer: what ``encode`` of
    ``HFTokenizer`` gives, without loading transformers (it pickles as the tokenizer's JSON, for
    the processes that build the index)."""

    def __init__(self, backend):
        self.backend = backend

    def lengths(self, texts: list[str]) -> list[int]:
        # encode_batch_fast (tokenizers >= 0.21) leaves out the character offsets, which a count never reads
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [len(e) for e in encode(texts, add_special_tokens=False)]


def maskable(ids: torch.Tensor, specials: Specials) -> torch.Tensor:
    """True where a token may be masked for MLM (it is not special)."""
    import torch  # here, so that reading records (which needs the special tokens' names) imports no torch
    return ~torch.isin(ids, torch.tensor(sorted(specials.all), dtype=ids.dtype))
