"""Embeddings from a trained model: ``moca.Encoder``.

    from moca import Encoder
    encoder = Encoder.from_pretrained("runs/moca-tiny")          # a run directory, or an export
    vectors = encoder.encode(["a red circle", {"image": "pic.png"}, {"text": "<image> a cat", "image": img}])

An input is a text, a PIL image, or a side as in the data files (``{"text": ..., "image": ...}``,
an image being a path, base64 or a PIL image). ``encode`` takes sentence-transformers' arguments
(``batch_size``, ``show_progress_bar``, ``convert_to_numpy``, ``convert_to_tensor``,
``normalize_embeddings``, ``prompt``, ``prompt_name``) and returns what it returns: by default a
float32 array (n, hidden), one L2-normalized row per input, the same whether an input is encoded
alone or in a batch (documents are packed, never padded). The attention and pooling are the
run's (``cl.attention``, ``cl.pooling``): MoCa's bidirectional mean, or the causal baseline's
last token. A run directory of both stages (``moca train``'s default) gives its last stage.

A prompt (task instruction) goes before each input's text, after its image when the image comes
first. The model's own prompts (``encoder.prompts``) are its recipe's: none for ``tiny``, MoCa's
for ``moca``, whose ``encode(images, prompt_name="document")`` embeds ``<image>Represent the given
document image.\n`` (worth about 10 nDCG@5 points on ViDoRe); ``encode(texts, prompt="Find an
image that matches the caption: ")`` gives an instruction of one's own.

``save_pretrained`` exports the model in Hugging Face form with its processor, prompts and
sentence-transformers modules (``moca.export``): ``from_pretrained``, transformers and
``sentence_transformers.SentenceTransformer`` load it back, with the same embeddings.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import warnings

import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import find, load_run
from .data.cpt import encode
from .data.images import MAX_IMAGE_PIXELS, MAX_PIXELS, MIN_PIXELS
from .data.pairs import side_document
from .data.tokenizer import ByteTokenizer, HFTokenizer
from .export import NO_PROMPTS, RECIPE_PROMPTS, check_prompts, write_export
from .files import read_json, writable_folder
from .model.embed import MocaEmbedder, embed_documents
from .model.qwen import build

EXPORT_MARKER = "moca.json"
STAGES_NEWEST_FIRST = ("cl", "cpt")  # the folders of a run of both stages, the last stage first


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


def model_folder(path: str) -> tuple[str, str | None]:
    """The folder that holds the model of ``path`` and, where it is not ``path`` itself, a line
    saying which it is: a run directory of both stages (``moca train``'s ``cpt/`` and ``cl/``)
    holds its model in its last stage that has a checkpoint (ValueError naming where it looked
    when none has one)."""
    if os.path.lexists(os.path.join(path, EXPORT_MARKER)) or os.path.isdir(os.path.join(path, "checkpoints")):
        return path, None
    stages = [os.path.join(path, stage) for stage in STAGES_NEWEST_FIRST
              if os.path.isfile(os.path.join(path, stage, "config.json"))]
    for folder in stages:
        if find(folder):
            return folder, f"{path} holds both stages: using the last one with a checkpoint, {folder}"
    if stages:
        raise ValueError(f"{path}: no checkpoint in {' or '.join(os.path.join(f, 'checkpoints') for f in stages)} "
                         "(its stages)")
    return path, None


class Encoder:
    """Embeddings of texts, images and both from a moca model (the module's docstring).

    ``prompts`` (name -> text) are the model's own: what ``prompt_name`` looks up, what ``moca
    eval`` and ``MocaEncoder`` put before queries (``"query"``) and candidates (``"document"``) by
    default, and what an export carries. A run's are its recipe's (``RECIPE_PROMPTS``: none for
    ``tiny``, MoCa's for ``moca``); an export's are in its ``moca.json``; none when not given."""

    def __init__(self, model, tokenizer, max_doc_tokens: int = 1280, min_pixels: int | None = None,
                 max_pixels: int | None = None, token_budget: int = 8192, device=None,
                 attention: str = "bidirectional", pooling: str = "mean", prompts: dict[str, str] | None = None):
        self.prompts = dict(NO_PROMPTS if prompts is None else prompts)
        check_prompts(self.prompts)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.embedder = MocaEmbedder(model, attention=attention, pooling=pooling).to(self.device).eval()
        self.tokenizer, self.max_doc_tokens, self.token_budget = tokenizer, max_doc_tokens, token_budget
        self.min_pixels, self.max_pixels = min_pixels or MIN_PIXELS, max_pixels or MAX_PIXELS
        self.folder: str | None = None  # the folder the model was read from (from_pretrained)

    @classmethod
    def from_pretrained(cls, path: str, device=None) -> Encoder:
        """A moca run directory (its latest checkpoint, stage 1 or 2; of a run of both stages, the
        last stage's: ``model_folder``) or a folder ``save_pretrained`` wrote."""
        folder, _ = model_folder(path)
        if os.path.lexists(os.path.join(folder, EXPORT_MARKER)):
            meta = read_export_meta(folder)
            tokenizer = ByteTokenizer() if meta["tokenizer"] == "bytes" else HFTokenizer(folder)
            model = build(path=folder)
            encoder = cls(model, tokenizer, meta["max_doc_tokens"], meta["min_pixels"], meta["max_pixels"],
                          device=device, attention=meta["attention"], pooling=meta["pooling"],
                          prompts=meta.get("prompts"))
        elif not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"{path}: neither a moca run directory (config.json) nor an export ({EXPORT_MARKER})")
        else:
            config, model, tokenizer = load_run(folder)
            d = config.data
            encoder = cls(model, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels, d.token_budget, device,
                          config.cl.attention, config.cl.pooling, RECIPE_PROMPTS[config.run.recipe])
        encoder.folder = folder
        return encoder

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
        """The prompt ``encode`` puts before each input's text, as sentence-transformers resolves it:
        ``prompt`` itself (``prompt_name`` then ignored, with a warning), else the one
        ``self.prompts`` holds under ``prompt_name`` ("query", "document"), else none."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if prompt_name is not None:
                warnings.warn(f"prompt and prompt_name {prompt_name!r} both given: the prompt is used", stacklevel=3)
            return prompt
        if prompt_name is not None and prompt_name not in self.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not among this model's prompts {sorted(self.prompts)}")
        return self.prompts[prompt_name] if prompt_name is not None else ""

    @torch.no_grad()
    def encode(self, inputs, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False):
        """Embeddings of ``inputs`` (one input, or a list of them), with sentence-transformers'
        arguments and return types (``SentenceTransformer.encode``):

        prompt / prompt_name   a prompt before each input's text (``prompt_text``)
        batch_size             inputs per forward pass (each pass packs its documents under the
                               run's token budget); the result does not depend on it
        show_progress_bar      a tqdm bar over the inputs on stderr; None: shown when the ``moca``
                               logger's level is INFO or DEBUG
        convert_to_tensor      a float32 tensor (n, hidden) on the CPU
        convert_to_numpy       (the default, when not convert_to_tensor) a float32 array (n, hidden);
                               with both False, a list of n tensors (hidden,)
        normalize_embeddings   L2-normalize again: moca's embeddings are unit vectors already (the
                               model's last step, as the export's ``Normalize`` module)

        One input (a text, a side dict or an image rather than a list) gives one vector (hidden,).
        An empty list gives (0, hidden)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        single = isinstance(inputs, (str, dict)) or not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        text = self.prompt_text(prompt, prompt_name)
        if show_progress_bar is None:
            show_progress_bar = logging.getLogger("moca").getEffectiveLevel() <= logging.INFO
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        parts = [torch.zeros(0, self.embedder.model.config.text_config.hidden_size)]
        with tqdm(total=len(items), desc="Embedding", unit="input", disable=not show_progress_bar) as bar:
            for start in range(0, len(items), batch_size):
                docs = [self._document(item, start + i, text) for i, item in enumerate(items[start:start + batch_size])]
                parts.append(embed_documents(self.embedder, docs, self.tokenizer.specials.image, max(
                    self.token_budget, max(d.ids.numel() for d in docs)), self.device, autocast).float().cpu())
                bar.update(len(docs))
        vectors = torch.cat(parts)
        if normalize_embeddings:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        out = vectors if convert_to_tensor else vectors.numpy() if convert_to_numpy else list(vectors)
        return out[0] if single else out

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
