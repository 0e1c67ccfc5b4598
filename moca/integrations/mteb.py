"""A moca model as an MTEB encoder (mteb 2.x ``EncoderProtocol``), with MoCa's prompts.

    import mteb
    from moca.integrations.mteb import MocaEncoder
    model = MocaEncoder("runs/moca-tiny")              # a run directory or an export
    mteb.evaluate(model, mteb.get_tasks(tasks=["VidoRe..."]))

MTEB hands ``encode`` a DataLoader whose batches are dicts of lists: ``"text"`` and/or
``"image"`` (PIL images), one entry per input, and says whether they are queries or documents
(``prompt_type``). Inputs are laid out as MoCa's authors evaluate them: a text as it is; an image
alone followed by the document prompt ("Represent the given document image."); an image with a
text as "Represent the given image with the following question: <text>". A prompt given for the
task (``prompts``: keys as MTEB resolves them, most specific first: ``"<task>-<query|document>"``,
``"<task>"``, ``"<task type>-<query|document>"``, ``"<task type>"``, ``"query"``/``"document"``)
goes before every input's text instead, and so does a query's own ``"instruction"``.

This module imports nothing from mteb until ``mteb_model_meta`` is asked for, so the protocol
works (and is tested) without mteb installed; it is structural.
"""
from __future__ import annotations

import numpy as np
import torch

from moca.encoder import Encoder
from moca.export import DOCUMENT_IMAGE_PROMPT, check_prompts

IMAGE_QUESTION_PROMPT = "Represent the given image with the following question: "


class MocaEncoder:
    """MTEB's encoder protocol over ``moca.Encoder`` (``encode``, ``similarity``,
    ``similarity_pairwise``, ``mteb_model_meta``)."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 prompts: dict[str, str] | None = None, encoder: Encoder | None = None, **kwargs):
        self.model_name, self.revision = model_name, revision
        self.encoder = encoder if encoder is not None else Encoder.from_pretrained(model_name, device=device)
        self.prompts = dict(prompts or {})
        check_prompts(self.prompts)

    def task_prompt(self, task_metadata, prompt_type) -> str | None:
        """The prompt of ``self.prompts`` for this task and input kind, most specific first; None if none."""
        kind = getattr(prompt_type, "value", prompt_type)
        name, task_type = getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)
        keys = [f"{name}-{kind}", name, f"{task_type}-{kind}", task_type, kind]
        for key in keys:
            if key is not None and key in self.prompts:
                return self.prompts[key]
        return None

    def _side(self, text, image, prompt: str | None, instruction: str | None) -> dict:
        """One input as a moca side, laid out with MoCa's prompts (see the module's docstring)."""
        text = text or ""
        if prompt is not None or instruction:
            return {**({"image": image} if image is not None else {}), "text": (instruction or prompt or "") + text}
        if image is None:
            return {"text": text}
        if text:
            return {"image": image, "text": IMAGE_QUESTION_PROMPT + text + "\n"}
        return {"image": image, "text": DOCUMENT_IMAGE_PROMPT}

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
            sides = [self._side(texts[i] if texts is not None else None, images[i] if images is not None else None,
                                prompt, instructions[i]) for i in range(n)]
            out.append(self.encoder.encode(sides))
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
        """mteb's ``ModelMeta`` for this model (needs mteb)."""
        from mteb.models.model_meta import ModelMeta
        model = self.encoder.embedder.model
        return ModelMeta.create_empty(dict(
            name=self.model_name if "/" in self.model_name else f"moca/{self.model_name}", revision=self.revision,
            modalities=["image", "text"], embed_dim=model.config.text_config.hidden_size,
            n_parameters=sum(p.numel() for p in model.parameters()), max_tokens=self.encoder.max_doc_tokens,
            similarity_fn_name="cosine", framework=["PyTorch"], use_instructions=True, open_weights=True))


def _unit(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    return torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]), dim=-1)
