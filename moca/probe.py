"""Does a stage-1 run read the pictures? Masked-word accuracy by word class on new embedded
documents, with the pictures shown and with every picture replaced by noise.

On the embedded dataset a masked color, shape or background word can only be predicted from the
picture the caption follows (text alone gives chance). ``picture_reading`` masks the run's share of
caption words (``cpt.mlm_ratio``) in documents drawn with a seed no training run uses, and counts
how often the masked word is the class's top-scoring word (a color among the colors, so that
chance is one over the class's size). Accuracy with pictures well above the accuracy with noise
means stage 1 learned to read them; both at chance means it did not, whatever the overall MLM
accuracy says (the captions' fixed wording is easy to predict).
"""
from __future__ import annotations

import logging
import os

import torch

from .checkpoint import load_run
from .data import embedded
from .data.cpt import collate, encode
from .data.records import read_cpt
from .model.qwen import packed_hidden

log = logging.getLogger(__name__)

CLASSES = {"color": embedded.INKS, "shape": embedded.SHAPES, "background": embedded.BACKGROUNDS}
PROBE_SEED = 20_000  # new pictures: training runs draw theirs with data.embedded_seed (0, the ablation's base 10,000)
DOCS_PER_ROW = 16  # documents packed into one forward


def class_ids(words: dict[str, int], names) -> list[int]:
    """The token ids of a class's words as captions use them: after a space ("a red circle")."""
    return [words[" " + name] for name in names]


@torch.no_grad()
def picture_reading(run_dir: str, documents: int = 200, seed: int = 0) -> dict:
    """``{class: {"pictures": accuracy, "noise": accuracy, "chance": 1 / words, "n": masked words}}``
    of the stage-1 run in ``run_dir`` (its newest checkpoint), on ``documents`` new embedded
    documents written under ``run_dir/probe-data`` (``seed`` picks them and the masks). Needs the
    tiny preset's tokenizer, which has one token for each of these words."""
    config, model, tokenizer = load_run(run_dir)
    words = getattr(tokenizer, "words", {})
    missing = [w for names in CLASSES.values() for w in names if " " + w not in words]
    if missing:
        raise ValueError(f"{run_dir}: the probe needs one token per color, shape and background word; this run's "
                         f"tokenizer has none for {missing[:3]} (it reads the embedded dataset on the tiny preset)")
    model.eval()
    path = embedded.write(os.path.join(run_dir, "probe-data"), documents, seed=PROBE_SEED + seed)
    d = config.data
    docs = [encode(doc, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels) for doc in read_cpt(path)]
    docs = [doc for doc in docs if doc.grids.numel()]  # captioned pictures only
    ids = {name: torch.tensor(class_ids(words, names)) for name, names in CLASSES.items()}
    result = {}
    for shown, noise_ratio in (("pictures", 0.0), ("noise", 1.0)):
        generator = torch.Generator().manual_seed(seed)  # the same masks for both: only the pixels differ
        hits = {name: [0, 0] for name in CLASSES}
        for start in range(0, len(docs), DOCS_PER_ROW):
            batch = collate(docs[start:start + DOCS_PER_ROW], tokenizer.specials, config.cpt.mlm_ratio, noise_ratio,
                            generator)
            labels = batch["labels"]
            hidden = packed_hidden(model, batch)
            for name, members in ids.items():
                chosen = torch.isin(labels, members)
                predicted = members[(hidden[chosen] @ model.lm_head.weight[members].T).argmax(-1)]
                hits[name][0] += int((predicted == labels[chosen]).sum())
                hits[name][1] += int(chosen.sum())
        for name, (right, total) in hits.items():
            entry = result.setdefault(name, {"chance": round(1 / len(CLASSES[name]), 4), "n": total})
            entry[shown] = round(right / total, 4) if total else None
    log.info("picture reading: " + "; ".join(f"{name} {r['pictures']} with pictures, {r['noise']} with noise "
                                             f"(chance {r['chance']:.3f})" for name, r in result.items()))
    return result
