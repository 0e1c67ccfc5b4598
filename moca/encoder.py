"""Embeddings from a trained model: ``moca.Encoder``.

    from moca import Encoder
    encoder = Encoder.from_pretrained("runs/moca-tiny")          # a run directory, or an export
    vectors = encoder.encode(["a red circle", {"image": "pic.png"}, {"text": "<image> a cat", "image": img}])

An input is a text, a PIL image, or a side as in the data files (``{"text": ..., "image": ...}``,
an image being a path, base64 or a PIL image). Embeddings are float32, L2-normalized, one row per
input, the same whether an input is encoded alone or in a batch (documents are packed, never
padded). The attention and pooling are the run's (``cl.attention``, ``cl.pooling``): MoCa's
bidirectional mean, or the causal baseline's last token.

A prompt (task instruction) goes before each input's text, after its image when the image comes
first: ``encode(images, prompt_name="document")`` embeds ``<image>Represent the given document
image.\n``, MoCa's document prompt (``encoder.prompts``; worth about 10 nDCG@5 points on ViDoRe),
``encode(texts, prompt="Find an image that matches the caption: ")`` an instruction of one's own.

``save_pretrained`` exports the model in Hugging Face form with its processor, prompts and
sentence-transformers modules (``moca.export``): ``from_pretrained``, transformers and
``sentence_transformers.SentenceTransformer`` load it back, with the same embeddings.
"""
from __future__ import annotations

import base64
import io
import os

import torch
from PIL import Image

from .checkpoint import load_run
from .data.cpt import encode
from .data.images import MAX_IMAGE_PIXELS, MAX_PIXELS, MIN_PIXELS
from .data.pairs import side_document
from .data.tokenizer import ByteTokenizer, HFTokenizer
from .export import MOCA_PROMPTS, check_prompts, write_export
from .files import read_json, writable_folder
from .model.embed import MocaEmbedder, embed_documents
from .model.qwen import build

EXPORT_MARKER = "moca.json"


# moca.json's fields: the values each may take (a range for a number), and the value of an
# optional one that is missing; the bounds are the settings' (moca.config), so that a crafted
# export cannot ask for images or documents of any size
_META = {"tokenizer": (("bytes", "hf"), None), "max_doc_tokens": (range(1, (1 << 20) + 1), None),
         "min_pixels": (range(1, MAX_IMAGE_PIXELS + 1), None), "max_pixels": (range(1, MAX_IMAGE_PIXELS + 1), None),
         "attention": (("bidirectional", "causal"), "bidirectional"), "pooling": (("mean", "last"), "mean")}


def read_export_meta(path: str) -> dict:
    """An export's ``moca.json``, every field checked (ValueError naming the file and the field)."""
    file = os.path.join(path, EXPORT_MARKER)
    meta = read_json(file, "the export's settings")
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: holds a {type(meta).__name__}, not an object of settings")
    for name, (allowed, default) in _META.items():
        value = meta.setdefault(name, default)
        number = isinstance(allowed, range)
        if not ((type(value) is int and value in allowed) if number else (isinstance(value, str) and value in allowed)):
            wanted = f"an integer from 1 to {allowed[-1]:,}" if number else " or ".join(allowed)
            raise ValueError(f"{file}: {name} must be {wanted}, got {value!r}")
    if meta["min_pixels"] > meta["max_pixels"]:
        raise ValueError(f"{file}: min_pixels {meta['min_pixels']} is above max_pixels {meta['max_pixels']}")
    if meta.get("prompts") is not None:
        try:
            check_prompts(meta["prompts"])
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from None
    return meta


class Encoder:
    def __init__(self, model, tokenizer, max_doc_tokens: int = 1280, min_pixels: int | None = None,
                 max_pixels: int | None = None, token_budget: int = 8192, device=None,
                 attention: str = "bidirectional", pooling: str = "mean", prompts: dict[str, str] | None = None):
        self.prompts = dict(MOCA_PROMPTS if prompts is None else prompts)  # name -> text, for prompt_name
        check_prompts(self.prompts)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.embedder = MocaEmbedder(model, attention=attention, pooling=pooling).to(self.device).eval()
        self.tokenizer, self.max_doc_tokens, self.token_budget = tokenizer, max_doc_tokens, token_budget
        self.min_pixels, self.max_pixels = min_pixels or MIN_PIXELS, max_pixels or MAX_PIXELS

    @classmethod
    def from_pretrained(cls, path: str, device=None) -> Encoder:
        """A moca run directory (its latest checkpoint, stage 1 or 2) or a folder ``save_pretrained`` wrote."""
        if os.path.lexists(os.path.join(path, EXPORT_MARKER)):
            meta = read_export_meta(path)
            tokenizer = ByteTokenizer() if meta["tokenizer"] == "bytes" else HFTokenizer(path)
            model = build(path=path)
            return cls(model, tokenizer, meta["max_doc_tokens"], meta["min_pixels"], meta["max_pixels"], device=device,
                       attention=meta["attention"], pooling=meta["pooling"], prompts=meta.get("prompts"))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: neither a moca run directory (config.json) nor an export ({EXPORT_MARKER})")
        config, model, tokenizer = load_run(path, log=lambda *_: None)
        d = config.data
        return cls(model, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels, d.token_budget, device,
                   config.cl.attention, config.cl.pooling)

    def _document(self, item, index: int, prompt: str = ""):
        if isinstance(item, str):
            item = {"text": item}
        elif not isinstance(item, dict):
            item = {"image": item}
        if prompt:
            text = item.get("text", "")
            item = {**item, "text": prompt + text if isinstance(text, str) else text}
        if isinstance(item.get("image"), Image.Image):
            buffer = io.BytesIO()
            item["image"].save(buffer, format="PNG")
            item = {**item, "image": base64.b64encode(buffer.getvalue()).decode()}
        try:
            doc = side_document(item, os.getcwd(), f"input {index}")
        except ValueError as exc:
            raise ValueError(f"input {index}: {exc}") from None
        encoded = encode(doc, self.tokenizer, self.max_doc_tokens, self.min_pixels, self.max_pixels)
        if encoded.ids.numel() == 0:
            raise ValueError(f"input {index}: nothing to embed")
        return encoded

    def prompt_text(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The prompt ``encode`` puts before each input's text: ``prompt`` itself, or the one
        ``self.prompts`` holds under ``prompt_name`` ("query", "document"), or none."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not among this model's prompts "
                                 f"{sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt or ""

    @torch.no_grad()
    def encode(self, inputs, prompt: str | None = None, prompt_name: str | None = None) -> torch.Tensor:
        """Normalized float32 embeddings (n, hidden) on the CPU, one per input; ``prompt`` (or the
        prompt named ``prompt_name`` in ``self.prompts``) goes before each input's text."""
        if isinstance(inputs, (str, dict)) or not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        text = self.prompt_text(prompt, prompt_name)
        if not inputs:
            return torch.zeros(0, self.embedder.model.config.text_config.hidden_size)
        docs = [self._document(item, i, text) for i, item in enumerate(inputs)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        return embed_documents(self.embedder, docs, self.tokenizer.specials.image, max(self.token_budget,
                               max(d.ids.numel() for d in docs)), self.device, autocast).cpu()

    def save_pretrained(self, folder: str, prompts: dict[str, str] | None = None) -> None:
        """The model in Hugging Face form with its tokenizer and processor, the sentence-transformers
        modules, and ``moca.json`` (how inputs are laid out); ``prompts`` (default ``self.prompts``)
        become the export's named prompts (sentence-transformers' ``prompts``)."""
        writable_folder(folder)
        os.makedirs(folder, exist_ok=True)
        model = self.embedder.model
        model.save_pretrained(folder)
        meta = dict(tokenizer="bytes" if isinstance(self.tokenizer, ByteTokenizer) else "hf",
                    max_doc_tokens=self.max_doc_tokens, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                    attention=self.embedder.attention, pooling=self.embedder.pooling, normalize=True)
        write_export(folder, model, self.tokenizer, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                     pooling=self.embedder.pooling, prompts=self.prompts if prompts is None else prompts, meta=meta)
