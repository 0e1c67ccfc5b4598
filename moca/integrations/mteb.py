"""A moca model as an MTEB encoder (mteb 2.x ``EncoderProtocol``), with the model's own prompts.

    import mteb
    from moca.integrations.mteb import MocaEncoder
    model = MocaEncoder("runs/moca-tiny", name="me/moca-tiny")   # a run directory or an export
    mteb.evaluate(model, mteb.get_tasks(tasks=["VidoRe..."]))

MTEB hands ``encode`` a DataLoader whose batches are dicts of lists: ``"text"`` and/or
``"image"`` (PIL images), one entry per input, and says whether they are queries or documents
(``prompt_type``). Each input is a moca side with a prompt before its text, after its image, as
``moca eval`` lays out its queries and candidates: the prompt of ``prompts`` for the task and input
kind, keys as MTEB resolves them, most specific first (``"<task>-<query|document>"``,
``"<task>"``, ``"<task type>-<query|document>"``, ``"<task type>"``, ``"query"``/``"document"``);
``prompts`` start from the model's own (``Encoder.prompts``: none for the tiny recipe, MoCa's for
the moca recipe, whose document prompt is "Represent the given document image."), so that
``moca eval`` and MTEB score the same model the same way. A query's own ``"instruction"`` goes
before its text instead.

``name`` (``"organization/model"``, as MTEB files results) defaults to ``moca/<folder name>``.
This module imports nothing from mteb until ``mteb_model_meta`` is asked for, so the protocol
works (and is tested) without mteb installed; it is structural.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from moca.encoder import Encoder
from moca.export import check_prompts


class MocaEncoder:
    """MTEB's encoder protocol over ``moca.Encoder`` (``encode``, ``similarity``,
    ``similarity_pairwise``, ``mteb_model_meta``)."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 prompts: dict[str, str] | None = None, encoder: Encoder | None = None, name: str | None = None,
                 **kwargs):
        self.model_name, self.revision = model_name, revision
        self.name = name or f"moca/{os.path.basename(os.path.normpath(model_name))}"
        if self.name.count("/") != 1 or not all(self.name.split("/")):
            raise ValueError(f"name must be \"organization/model\" (as MTEB files results), got {self.name!r}")
        self.encoder = encoder if encoder is not None else Encoder.from_pretrained(model_name, device=device)
        check_prompts(prompts if prompts is not None else {})
        self.prompts = {**self.encoder.prompts, **(prompts or {})}

    def task_prompt(self, task_metadata, prompt_type) -> str:
        """The prompt of ``self.prompts`` for this task and input kind, most specific first; "" if none."""
        kind = getattr(prompt_type, "value", prompt_type)
        name, task_type = getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)
        for key in (f"{name}-{kind}", name, f"{task_type}-{kind}", task_type, kind):
            if key is not None and key in self.prompts:
                return self.prompts[key]
        return ""

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs) -> np.ndarray:
        """float32 (inputs, hidden), normalized, in the DataLoader's order."""
        prompt = self.task_prompt(task_metadata, prompt_type)
        out = []
        for batch in inputs:
            texts, images = batch.get("text"), batch.get("image")
            if texts is None and images is None:
                raise ValueError(f"a batch of {getattr(task_metadata, 'name', 'this task')} has neither \"text\" "
                                 f"nor \"image\" (keys: {sorted(batch)})")
            n = len(texts if texts is not None else images)
            instructions = batch.get("instruction") or [None] * n
            sides = [_side(texts[i] if texts is not None else None, images[i] if images is not None else None,
                           instructions[i] or prompt) for i in range(n)]
            out.append(self.encoder.encode(sides, convert_to_tensor=True))
        if not out:
            return np.zeros((0, self.encoder.embedder.model.config.text_config.hidden_size), dtype=np.float32)
        return torch.cat(out).numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarities (n1, n2) (the embeddings are normalized; normalized again here)."""
        a, b = _unit(embeddings1), _unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity (n,) of each pair of rows."""
        return (_unit(embeddings1) * _unit(embeddings2)).sum(-1)

    @property
    def mteb_model_meta(self):
        """mteb's ``ModelMeta`` for this model (needs mteb), under ``self.name``."""
        from mteb.models.model_meta import ModelMeta, ScoringFunction
        model = self.encoder.embedder.model
        return ModelMeta.create_empty(dict(
            name=self.name, revision=self.revision, modalities=["image", "text"],
            embed_dim=model.config.text_config.hidden_size, n_parameters=sum(p.numel() for p in model.parameters()),
            max_tokens=self.encoder.max_doc_tokens, similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"],
            use_instructions=True, open_weights=True))


def _side(text, image, prompt: str) -> dict:
    """One MTEB input as a moca side: ``prompt`` before its text, after its image (the layout of
    ``Encoder.encode(..., prompt=prompt)``)."""
    side = {} if image is None else {"image": image}
    text = prompt + (text or "")
    return {**side, "text": text} if text or image is None else side


def _unit(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    return torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
