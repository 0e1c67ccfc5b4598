"""Exports that the ecosystem loads: the byte-level tokenizer in transformers' form, the export in
plain transformers (bidirectional) and sentence-transformers (the same embeddings as
``moca.Encoder`` for texts, images and prompts), prompts in ``Encoder.encode``, and MTEB's
encoder protocol (structural; checked against mteb itself where it is installed)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moca import Encoder
from moca.data.tokenizer import ByteTokenizer
from moca.export import DOCUMENT_IMAGE_PROMPT, MOCA_PROMPTS
from moca.model.qwen import build

BYTES = ByteTokenizer()
HF_BYTES = BYTES.to_transformers()
PIXELS = dict(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "A", "aa", "the", "The", "red", "circle", "x", " ", "  ", "\n", "1", "_", "é",
                                 "🙂", ".", "What", "Whatever", "<", "|"]), max_size=12)
       | st.text(max_size=20))
def test_transformers_tokenizer_gives_the_byte_tokenizers_ids(pieces):
    text = "".join(pieces)
    assert HF_BYTES.encode(text, add_special_tokens=False) == BYTES.encode(text)


def test_transformers_tokenizer_special_tokens():
    ids = HF_BYTES.encode("<|vision_start|><|image_pad|>a<|vision_end|>", add_special_tokens=False)
    assert ids == [BYTES.specials.vision_start, BYTES.specials.image, BYTES.words["a"], BYTES.specials.vision_end]
    assert HF_BYTES.decode(BYTES.encode("a cat is a red A circle")) == "a cat is a red A circle"


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    encoder = Encoder(build("tiny"), ByteTokenizer(), max_doc_tokens=512, device="cpu", prompts=MOCA_PROMPTS, **PIXELS)
    folder = str(tmp_path_factory.mktemp("export"))
    encoder.save_pretrained(folder)
    return encoder, folder


def test_export_files(export):
    encoder, folder = export
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert (pre["min_pixels"], pre["max_pixels"]) == (PIXELS["min_pixels"], PIXELS["max_pixels"])
    assert pre["size"] == {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    with open(os.path.join(folder, "config_sentence_transformers.json")) as f:
        assert json.load(f)["prompts"] == MOCA_PROMPTS
    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode"] == "mean"
    assert Encoder.from_pretrained(folder, device="cpu").prompts == MOCA_PROMPTS


def test_plain_transformers_loads_it_bidirectional(export):
    """Without moca's attention: a later token changes the first token's state, unless the
    loaded config is made causal (so the check can fail)."""
    from transformers import AutoModel
    _, folder = export
    model = AutoModel.from_pretrained(folder).eval()
    assert model.config._attn_implementation != "moca_varlen" and model.config.text_config.is_causal is False
    ids = torch.tensor([HF_BYTES.encode("a red circle on a blue square")])
    changed = ids.clone()
    changed[0, -1] = BYTES.words["green"]

    def first(m, x):
        with torch.no_grad():
            return m(input_ids=x).last_hidden_state[0, 0]

    assert (first(model, ids) - first(model, changed)).abs().max() > 1e-4
    causal = AutoModel.from_pretrained(folder, text_config=dict(model.config.text_config.to_dict(), is_causal=True))
    assert torch.allclose(first(causal.eval(), ids), first(causal, changed), atol=1e-6)


def test_encode_prompt(export):
    encoder, _ = export
    image = _image(60, 90, 1)
    plain = encoder.encode(["Find the shape: a red circle", {"image": image, "text": DOCUMENT_IMAGE_PROMPT}])
    prompted = encoder.encode(["a red circle"], prompt="Find the shape: ")
    named = encoder.encode([image], prompt_name="document")
    np.testing.assert_allclose(plain, np.concatenate([prompted, named]), atol=1e-6)
    assert not np.allclose(named, encoder.encode([image]), atol=1e-4)  # the prompt matters
    with pytest.raises(ValueError, match="prompt_name"):
        encoder.encode(["x"], prompt_name="passage")
    # as sentence-transformers: a prompt given with a prompt_name wins, with a warning
    with pytest.warns(UserWarning, match="prompt and prompt_name 'document' both given"):
        both = encoder.encode([image], prompt="Find the shape: ", prompt_name="document")
    np.testing.assert_allclose(both, encoder.encode([image], prompt="Find the shape: "), atol=1e-6)


@pytest.fixture
def without_video_processor():
    """Qwen2.5-VL's processor needs torchvision (for its video part); where it is missing, an
    image-and-text processor of the same class family takes its place, registered for the test."""
    try:
        import torchvision  # noqa: F401
        yield None
        return
    except Exception:  # missing, or a build that does not match torch
        pass
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    AutoProcessor.register(Qwen2_5_VLConfig, ImageTextProcessor, exist_ok=True)
    yield ImageTextProcessor
    PROCESSOR_MAPPING._extra_content.pop(Qwen2_5_VLConfig, None)


def _sentence_transformer(folder: str, tmp_path, stand_in):
    """sentence-transformers' model of the export in ``folder`` (through the stand-in processor
    where torchvision is missing: the same files, naming it)."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    if stand_in is not None:
        import shutil
        shutil.copytree(folder, tmp_path / "m")
        folder = str(tmp_path / "m")
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"processor_class": stand_in.__name__}, f)
    return SentenceTransformer(folder, device="cpu")


def _sentence_transformers_check(encoder, folder: str, tmp_path, stand_in) -> None:
    model = _sentence_transformer(folder, tmp_path, stand_in)
    texts = ["a red circle", "What is the shape? It is a square on a blue background, small and simple."]
    images = [_image(90, 130, 2), _image(200, 60, 3)]
    np.testing.assert_allclose(model.encode(texts), encoder.encode(texts), atol=1e-5)
    np.testing.assert_allclose(model.encode_document(images), encoder.encode(images, prompt_name="document"),
                               atol=1e-5)
    mixed = [{"image": images[0], "text": "what is it?"}, "a text"]  # one padded batch of both kinds
    np.testing.assert_allclose(model.encode(mixed, prompt="Q: "), encoder.encode(mixed, prompt="Q: "), atol=1e-5)


def test_sentence_transformers_gives_the_encoders_embeddings(export, tmp_path, without_video_processor):
    _sentence_transformers_check(*export, tmp_path, without_video_processor)


def test_encode_takes_sentence_transformers_arguments_and_returns_what_it_returns(export, tmp_path, capsys,
                                                                                   without_video_processor):
    """``Encoder.encode`` and ``SentenceTransformer.encode`` on the export, called alike, give
    results of the same type and shape with the same values."""
    encoder, folder = export
    model = _sentence_transformer(folder, tmp_path, without_video_processor)
    texts = ["a red circle", "a blue square on a white background", "x"]
    for options in ({}, {"convert_to_tensor": True}, {"convert_to_numpy": False}, {"normalize_embeddings": True},
                    {"batch_size": 1}, {"prompt_name": "document"}, {"prompt": "Q: ", "batch_size": 2}):
        for inputs in (texts, texts[0]):
            ours, theirs = encoder.encode(inputs, **options), model.encode(inputs, **options)
            assert type(ours) is type(theirs), options
            if isinstance(ours, list):
                assert len(ours) == len(theirs) and all(a.shape == b.shape for a, b in zip(ours, theirs))
                ours, theirs = torch.stack(ours), torch.stack(theirs)
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, options
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, err_msg=str(options))
    capsys.readouterr()
    encoder.encode(texts, show_progress_bar=True)
    assert "Embedding: 100%" in capsys.readouterr().err
    encoder.encode(texts, show_progress_bar=False)
    assert "Embedding" not in capsys.readouterr().err
    assert encoder.encode([]).shape == (0, 64)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad}"):
            encoder.encode(texts, batch_size=bad)


def test_sentence_transformers_causal_baseline(tmp_path, without_video_processor):
    """The paper's causal baseline exports as a causal model with last-token pooling."""
    torch.manual_seed(1)
    encoder = Encoder(build("tiny"), ByteTokenizer(), max_doc_tokens=512, device="cpu", attention="causal",
                      pooling="last", **PIXELS)
    encoder.save_pretrained(str(tmp_path / "causal"))
    _sentence_transformers_check(encoder, str(tmp_path / "causal"), tmp_path, without_video_processor)


def _mteb_batches(rows: list[dict], batch_size: int):
    """What mteb's DataLoaders yield: dicts of lists, one list per column."""
    return torch.utils.data.DataLoader(rows, batch_size=batch_size,
                                       collate_fn=lambda b: {k: [r[k] for r in b] for k in b[0]})


def test_mteb_encoder_protocol(export):
    from types import SimpleNamespace

    from moca.integrations.mteb import MocaEncoder
    encoder, folder = export
    model = MocaEncoder(folder, device="cpu", prompts={"Tiny-query": "Find: "})
    assert model.prompts == {**MOCA_PROMPTS, "Tiny-query": "Find: "}  # the model's own, then the task's
    task = SimpleNamespace(name="Tiny", type="Any2AnyRetrieval")
    images = [_image(60, 60, 4), _image(80, 40, 5), _image(40, 100, 6)]
    docs = model.encode(_mteb_batches([{"image": im} for im in images], 2), task_metadata=task, hf_split="test",
                        hf_subset="default", prompt_type="document")
    queries = model.encode(_mteb_batches([{"text": t} for t in ["a", "b c"]], 2), task_metadata=task,
                           hf_split="test", hf_subset="default", prompt_type="query")
    both = model.encode(_mteb_batches([{"text": "what?", "image": images[0]}], 2), task_metadata=task,
                        hf_split="test", hf_subset="default", prompt_type="document")
    assert docs.shape == (3, 64) and docs.dtype == np.float32 and queries.shape == (2, 64)
    np.testing.assert_allclose(docs, encoder.encode(images, prompt=DOCUMENT_IMAGE_PROMPT), atol=1e-5)
    np.testing.assert_allclose(queries, encoder.encode(["a", "b c"], prompt="Find: "), atol=1e-5)
    np.testing.assert_allclose(both, encoder.encode([{"image": images[0], "text": "what?"}], prompt_name="document"),
                               atol=1e-5)
    scores = model.similarity(queries, docs)
    assert scores.shape == (2, 3) and torch.allclose(scores, torch.from_numpy(queries @ docs.T), atol=1e-5)
    assert torch.allclose(model.similarity_pairwise(docs[:2], docs[1:]), (torch.from_numpy(docs[:2] * docs[1:])).sum(1),
                          atol=1e-5)
    assert model.name == f"moca/{os.path.basename(folder)}"
    assert MocaEncoder(folder, encoder=encoder, name="me/tiny").name == "me/tiny"
    with pytest.raises(ValueError, match="organization/model"):
        MocaEncoder(folder, encoder=encoder, name="tiny")
    try:
        from mteb.models.model_meta import ScoringFunction
        from mteb.models.models_protocols import EncoderProtocol
    except ImportError:
        return  # the protocol is structural: the checks above are what mteb calls
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.embed_dim == 64 and meta.name == model.name and meta.similarity_fn_name is ScoringFunction.COSINE
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic's PydanticSerializationUnexpectedValue on a string
        meta.model_dump_json()  # as mteb writes it beside the results


def test_cli_encode_prompt_and_export_prompts(export, tmp_path, capsys):
    from moca import cli
    encoder, folder = export
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a red circle"}\n{"text": "a blue square"}\n')
    out = str(tmp_path / "out.npy")
    assert cli.main(["encode", "--model", folder, "--input", str(inputs), "--output", out,
                     "--prompt", "Find the shape: "]) == 0
    np.testing.assert_allclose(np.load(out), encoder.encode(["a red circle", "a blue square"],
                                                            prompt="Find the shape: "), atol=1e-6)
    assert "Embedding: 100%" in capsys.readouterr().err  # moca encode's progress bar
    again = str(tmp_path / "again")
    assert cli.main(["encode", "--model", folder, "--export", again, "--query-prompt", "Query: "]) == 0
    with open(os.path.join(again, "config_sentence_transformers.json")) as f:
        assert json.load(f)["prompts"] == {**MOCA_PROMPTS, "query": "Query: "}
    assert cli.main(["encode", "--model", folder, "--input", str(inputs), "--output", out,
                     "--prompt-name", "passage"]) == 2
    assert "passage" in capsys.readouterr().err


def test_mteb_evaluates_it_on_its_own_in_memory_tasks(export):
    """Where mteb is installed (the `mteb` extra; not in CI's `test`): mteb.evaluate drives the
    encoder through image-to-text, text-to-image and text retrieval tasks that mteb builds in memory."""
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import (
        MockAny2AnyRetrievalI2TTask,
        MockAny2AnyRetrievalT2ITask,
        MockRetrievalTask,
    )

    from moca.integrations.mteb import MocaEncoder
    _, folder = export
    model = MocaEncoder(folder, device="cpu")
    seen = []
    encode = model.encoder.encode
    model.encoder.encode = lambda sides, **kw: seen.extend(sides) or encode(sides, **kw)
    tasks = [MockAny2AnyRetrievalI2TTask(), MockAny2AnyRetrievalT2ITask(), MockRetrievalTask()]
    results = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
    scores = {r.task_name: r.get_score() for r in results.task_results}
    assert set(scores) == {t.metadata.name for t in tasks} and all(0 <= s <= 1 for s in scores.values())
    assert any("image" in s and s.get("text") == DOCUMENT_IMAGE_PROMPT for s in seen)  # image documents, prompted
    assert any(s == {"image": s.get("image")} for s in seen)  # image queries: the model's query prompt is none
    assert any("image" not in s for s in seen)


def test_sentence_transformers_with_a_checkpoints_own_tokenizer(tmp_path, without_video_processor):
    """A run from a real checkpoint exports its own transformers tokenizer (here a word-level one
    with Qwen's special tokens at the tiny model's ids), with the same embeddings in sentence-transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moca.data.tokenizer import HFTokenizer
    words = ["a", "red", "circle", "what", "is", "it?", "text", "What", "the", "shape?", "It", "square", "on", "blue",
             "background,", "small", "and", "simple.", "Q:"]
    specials = ByteTokenizer().ids
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words)}
    vocab.update({name: i for name, i in specials.items() if name != "<|mask|>"})
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="<|endoftext|>",
                            additional_special_tokens=[n for n in specials if n not in ("<|endoftext|>", "<|mask|>")]
                            ).save_pretrained(tmp_path / "tok")
    torch.manual_seed(2)
    encoder = Encoder(build("tiny"), HFTokenizer(str(tmp_path / "tok")), max_doc_tokens=512, device="cpu", **PIXELS)
    encoder.save_pretrained(str(tmp_path / "export"))
    _sentence_transformers_check(encoder, str(tmp_path / "export"), tmp_path, without_video_processor)
