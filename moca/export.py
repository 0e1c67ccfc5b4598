"""An export folder that transformers, sentence-transformers and MTEB load as they are.

``write_export`` (behind ``Encoder.save_pretrained``) writes, beside the model in Hugging Face
form and ``moca.json``:

- the tokenizer in transformers' form (the byte-level tokenizer of the embedded default is
  rebuilt as a ``PreTrainedTokenizerFast`` that gives the same ids);
- a Qwen2.5-VL processor: the image processor with the run's pixel bounds
  (``preprocessor_config.json``: PIL bicubic resizing, as ``moca.data.images`` does) and a chat
  template (``chat_template.jinja``) that lays a message out as moca does, without any role
  markers: the images (``<|vision_start|><|image_pad|><|vision_end|>`` each), then the system
  prompt, then the text;
- the sentence-transformers modules: ``modules.json`` (Transformer, Pooling, Normalize),
  ``sentence_bert_config.json``, ``1_Pooling/config.json`` (mean over every token, or the last
  token for the causal baseline) and ``config_sentence_transformers.json`` with the query and
  document prompts and cosine similarity.

The model's configuration carries ``text_config.is_causal = False`` (``set_causal``), which plain
transformers (>= 5.2) reads to build bidirectional masks, so the loaded model attends both ways
without moca's attention installed.
"""
from __future__ import annotations

import json
import os

# MoCa's prompts, as its authors evaluate (ViDoRe retriever, MTEB's MoCa wrapper): queries as
# they are, an image document followed by this instruction.
DOCUMENT_IMAGE_PROMPT = "Represent the given document image.\n"
MOCA_PROMPTS = {"query": "", "document": DOCUMENT_IMAGE_PROMPT}
NO_PROMPTS = {"query": "", "document": ""}
# The prompts a run's model is used with, by recipe: the embedded tiny data has no instructions;
# the moca recipe's model is MoCa's, whose training data carries its instructions in the text and
# whose page images are embedded after MoCa's document prompt.
RECIPE_PROMPTS = {"tiny": NO_PROMPTS, "moca": MOCA_PROMPTS}

# A message rendered as moca lays out a side with its prompt: every image of the non-system
# messages first, then the system messages' text (the prompt sentence-transformers adds), then
# the other messages' text. Content may be a string or a list of {"type": ..., ...} items.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt='', text='', images='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.prompt = ns.prompt + item['text'] -%}"
    "{%- else -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- elif item['type'] == 'image' -%}"
    "{%- set ns.images = ns.images + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{{- ns.images + ns.prompt + ns.text -}}"
)


def transformers_tokenizer(tokenizer, max_length: int):
    """The ``PreTrainedTokenizerFast`` of a moca tokenizer (``ByteTokenizer`` or ``HFTokenizer``)."""
    if hasattr(tokenizer, "to_transformers"):
        return tokenizer.to_transformers(max_length)
    return tokenizer.tok


def write_export(folder: str, model, tokenizer, *, min_pixels: int, max_pixels: int, pooling: str,
                 prompts: dict[str, str], meta: dict) -> None:
    """Everything but the model's weights and config (the caller saves those): tokenizer,
    processor, sentence-transformers modules, and ``moca.json`` (``meta``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    check_prompts(prompts)
    text = model.config.text_config
    hf_tokenizer = transformers_tokenizer(tokenizer, text.max_position_embeddings)
    hf_tokenizer.save_pretrained(folder)
    if hf_tokenizer.pad_token is None:  # batches are padded outside moca: any token does (masked everywhere)
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            settings = json.load(f)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({**settings, "pad_token": hf_tokenizer.eos_token or "<|vision_end|>"}, f, indent=1)
    # The processor's parts as files, as Qwen2.5-VL checkpoints ship them: built here without the
    # processor object, which transformers only constructs where torchvision is installed (for
    # its video part).
    images = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    images.processor_class = "Qwen2_5_VLProcessor"
    images.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        settings = json.load(f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:  # the bounds under their older names too
        json.dump({**settings, "min_pixels": min_pixels, "max_pixels": max_pixels}, f, indent=1)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)

    def dump(name: str, value) -> None:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(value, f, indent=1)

    dump("processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})
    dump("modules.json", [
        dict(idx=0, name="0", path="", type="sentence_transformers.base.modules.transformer.Transformer"),
        dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.sentence_transformer.modules.Pooling"),
        dict(idx=2, name="2", path="2_Normalize", type="sentence_transformers.base.modules.normalize.Normalize")])
    # Every input goes through the chat template (the "message" modality), texts too, so that a
    # text and an image are laid out by one rule; padding stays (Qwen2.5-VL's positions need it).
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    dump("sentence_bert_config.json", dict(
        transformer_task="feature-extraction", module_output_name="token_embeddings", unpad_inputs=False,
        modality_config={"text": forward, "image": forward, "message": {**forward, "format": "structured"}}))
    dump("1_Pooling/config.json", {
        "embedding_dimension": text.hidden_size, "pooling_mode": "lasttoken" if pooling == "last" else "mean",
        "include_prompt": True})
    dump("2_Normalize/config.json", {})
    dump("config_sentence_transformers.json", dict(
        model_type="SentenceTransformer", prompts=dict(prompts), default_prompt_name=None,
        similarity_fn_name="cosine"))
    dump("moca.json", {**meta, "prompts": dict(prompts)})


def check_prompts(prompts) -> None:
    """ValueError unless ``prompts`` maps names to strings."""
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in prompts.items()):
        raise ValueError(f"prompts must map names to texts, e.g. {MOCA_PROMPTS}, got {prompts!r}")
