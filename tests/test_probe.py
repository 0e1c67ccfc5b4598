"""``moca.probe.picture_reading``: per-class masked-word accuracy with the pictures and with noise,
on a real stage-1 run and against an oracle whose answers are known."""
import pytest
import torch

from moca import probe
from moca.config import Config
from moca.data import embedded
from moca.data.tokenizer import ByteTokenizer
from moca.train import train


def _stage_one(tmp_path):
    out = str(tmp_path / "run")
    train(Config.resolve({"run.stage": "cpt", "run.out": out, "cpt.max_steps": 2, "data.token_budget": 512}))
    return out


def test_a_run_is_probed_per_class_with_pictures_and_with_noise(tmp_path):
    result = probe.picture_reading(_stage_one(tmp_path), documents=24)
    assert set(result) == {"color", "shape", "background"}
    assert [result[c]["chance"] for c in result] == [round(1 / 6, 4), 0.25, 0.5]
    for entry in result.values():
        assert entry["n"] > 0 and 0.0 <= entry["pictures"] <= 1.0 and 0.0 <= entry["noise"] <= 1.0


def test_an_oracle_that_reads_real_pictures_scores_one_and_falls_to_its_guess_on_noise(tmp_path, monkeypatch):
    """The oracle answers every masked word right when the batch's pixels are a picture's, and the
    first word of each class when every image row is the same (the noise pass): so the probe must
    count per class, give the noise pass noise, and mask the same words in both passes."""
    run = _stage_one(tmp_path)
    masks = []

    def oracle(model, batch):
        labels, rows = batch["labels"], batch["pixel_values"]
        masks.append(labels.clone())
        noise = bool((rows == rows[0]).all())
        weight = model.lm_head.weight
        hidden = torch.zeros(labels.numel(), weight.shape[1])
        for words in probe.CLASSES.values():
            class_ids = torch.tensor(probe.class_ids(tokenizer_words, words))
            chosen = torch.isin(labels, class_ids)
            answer = labels[chosen] if not noise else class_ids[:1].expand(int(chosen.sum()))
            hidden[chosen] = weight[answer] * 100  # its own row wins the argmax by far
        return hidden

    tokenizer_words = ByteTokenizer().words
    class_words = [w for words in probe.CLASSES.values() for w in words]
    weight = torch.zeros(ByteTokenizer().vocab_size, 64)  # each class word its own axis: its row is its argmax
    for axis, token in enumerate(probe.class_ids(tokenizer_words, class_words)):
        weight[token, axis] = 1.0
    monkeypatch.setattr(probe, "packed_hidden", oracle)
    real_load = probe.load_run

    def load(run_dir):
        config, model, tokenizer = real_load(run_dir)
        model.lm_head.weight.data = weight.clone()
        return config, model, tokenizer
    monkeypatch.setattr(probe, "load_run", load)
    result = probe.picture_reading(run, documents=40)
    half = len(masks) // 2
    assert all(torch.equal(a, b) for a, b in zip(masks[:half], masks[half:]))  # same masks in both passes
    labels = torch.cat(masks[:half])
    for cls, words in probe.CLASSES.items():
        ids = probe.class_ids(tokenizer_words, words)
        chosen = labels[torch.isin(labels, torch.tensor(ids))]
        assert result[cls]["n"] == chosen.numel() > 0
        assert result[cls]["pictures"] == 1.0
        assert result[cls]["noise"] == round(float((chosen == ids[0]).float().mean()), 4) < 1.0


def test_the_probe_needs_the_tiny_tokenizer_words(tmp_path, monkeypatch):
    run = _stage_one(tmp_path)
    monkeypatch.setattr(probe, "CLASSES", {**probe.CLASSES, "color": embedded.INKS + ("crimson",)})
    with pytest.raises(ValueError, match="one token per color, shape and background word.*crimson"):
        probe.picture_reading(run, documents=8)
