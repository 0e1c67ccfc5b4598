"""The training settings: one dataclass per section, every field documented, validated in one place.

Sections: ``run`` (what runs where), ``data`` (files and how they are packed), ``model``,
``cpt`` (stage 1: continual pre-training), ``cl`` (stage 2: contrastive learning) and
``parallel``. A setting is named ``section.field`` (``cpt.lr=2e-6``) or by its bare field name
(``mlm_ratio=0.3``); a bare name that two sections share (the schedule: ``lr``, ``max_steps``,
``warmup_ratio``, ``weight_decay``, ``grad_clip``) sets it in both. Settings come from a recipe
(``RECIPES``: ``tiny``, or ``moca`` when a real model is given), then a TOML file (``--config
FILE``, one table per section), then ``key=value``. ``moca train --help`` lists them all.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

import tomllib

from .data.images import MAX_IMAGE_PIXELS
from .data.sources import parse_sources
from .files import atomic_write, read_bounded, read_json

# The longest text setting taken: PATH_MAX, the longest path Linux takes. Every text setting is a
# path, a short mode or a short list of names (report_to), so a longer one is a mistake, and this
# bounds what a list setting splits into.
MAX_TEXT = 4096
RECOMPUTE_HELP = "none, full, selective, every-K (K >= 2: full recomputation of every K-th region) or auto"
_EVERY = re.compile(r"every-(\d+)$")


REPORT_TARGETS = ("tensorboard", "wandb")  # each installed by the pyproject extra of its name

# Three settings are text in the config (as config.json, --print-config and a resume's comparison
# show them) and a typed value where they are used: each is parsed here, by one function, which
# validate() runs so that a bad value is refused before a run starts.


@dataclass(frozen=True)
class Recompute:
    """``model.recompute`` parsed: ``kind`` none, full, selective, every (full recomputation of
    every ``period``-th region) or auto (chosen by ``moca.model.regions.prepare``); ``str()``
    gives the setting's text back."""
    kind: Literal["none", "full", "selective", "every", "auto"]
    period: int = 0

    @classmethod
    def parse(cls, text: str) -> Recompute:
        """ValueError naming the setting when ``text`` is none of ``RECOMPUTE_HELP``."""
        if text in ("none", "full", "selective", "auto"):
            return cls(text)
        found = _EVERY.match(text)
        if found and int(found.group(1)) >= 2:
            return cls("every", int(found.group(1)))
        raise ValueError(f"model.recompute must be one of {RECOMPUTE_HELP}, got {text!r}")

    def __str__(self) -> str:
        return f"every-{self.period}" if self.kind == "every" else self.kind


def report_targets(value: str | None) -> tuple[str, ...]:
    """The targets ``run.report_to`` names, each once, in order: a comma-separated string
    (``"tensorboard,wandb"``); None, ``""`` or ``"none"`` name none. ValueError naming the setting
    for an unknown target."""
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in REPORT_TARGETS]
    if unknown:
        raise ValueError(f"run.report_to: unknown target(s) {', '.join(unknown)}; it takes a comma-separated list of "
                         f"{', '.join(REPORT_TARGETS)}, or none")
    return tuple(dict.fromkeys(names))


def profile_range(value: str | None) -> tuple[int, int] | None:
    """(A, B) of ``run.profile_steps`` "A:B" (A <= B), or None when unset. ValueError naming the
    setting otherwise."""
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
        raise ValueError(f"run.profile_steps takes A:B with A <= B, got {value!r}")
    return int(parts[0]), int(parts[1])


def setting(default, doc: str, *, resumable: bool = False, most: int | None = None):
    """A documented field. ``resumable``: the setting may change when a run resumes (it changes
    how the run is driven or scheduled from here on, not what the steps so far computed).
    ``most``: the largest value taken, for a setting whose size becomes memory or waiting (each
    bound is far past any honest run, so that a typo is refused before it exhausts the host)."""
    return field(default=default, metadata={"doc": doc, "resumable": resumable, "most": most})


@dataclass
class RunConfig:
    recipe: Literal["tiny", "moca"] = setting(
        "tiny", "the values every other setting starts from (moca.config.RECIPES): tiny, the embedded default on the "
        "tiny preset; moca, the paper's and the authors' settings for Qwen2.5-VL (the default with --model)")
    stage: Literal["cpt", "cl", "both"] = setting(
        "both", "cpt: MLM + MAE continual pre-training; cl: contrastive learning on pairs; both: cpt, then cl from "
        "it, then the evaluation")
    out: str = setting("runs/moca-tiny", "the run directory", resumable=True)
    seed: int = setting(0, "seeds the model's initial weights and every random choice of the data")
    save_every: int = setting(250, "steps between checkpoints (the last step is always saved)", resumable=True)
    # each kept checkpoint is a whole model and optimizer on disk: 10,000 outnumbers the saves of any schedule
    keep_checkpoints: int = setting(2, "checkpoints kept; older ones are deleted once a newer one is complete",
                                    resumable=True, most=10_000)
    log_every: int = setting(25, "steps between lines of metrics.jsonl (each loss and accuracy: its mean over "
                             "those steps)", resumable=True)
    report_to: str | None = setting(None, "where metrics.jsonl's rows also go: tensorboard (event files in "
                                    "out/tensorboard), wandb (Weights & Biases; WANDB_MODE=offline needs no "
                                    "network), both comma-separated (a list in TOML), or none", resumable=True)
    profile_steps: str | None = setting(None, "A:B: cudaProfilerStart before step A, Stop after step B (Nsight)",
                                        resumable=True)
    strict: bool = setting(False, "stop at the first bad record instead of skipping it", resumable=True)
    breakdown: bool = setting(False, "profile the second step this process runs and print where its time went: "
                              "phases, module classes, top kernels (moca.breakdown); also out/breakdown.json",
                              resumable=True)

    @property
    def reports(self) -> tuple[str, ...]:
        """``report_to``'s targets (``report_targets``)."""
        return report_targets(self.report_to)

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """``profile_steps`` as (A, B) (``profile_range``), or None."""
        return profile_range(self.profile_steps)


@dataclass
class DataConfig:
    documents: str | None = setting(None, "stage-1 documents: one or more sources, comma-separated, each a .jsonl, "
                                    ".parquet or .arrow file, a folder of them, or a datasets save_to_disk folder, "
                                    "with =N (N records drawn) or =Wx (W times its records) after it "
                                    "(moca.data.sources; default: the embedded dataset)")
    pairs: str | None = setting(None, "stage-2 pairs: sources as for documents, in moca's pair layout or MMEB-train's "
                                "(default: the embedded pairs)")
    sample_per_source: int | None = setting(None, "records drawn from each stage-1 source without =N or =Wx (all when "
                                            "it has fewer; none: all of them)")
    sample_seed: int = setting(1, "seeds the draw of each source's records")
    image_root: str | None = setting(None, "what MMEB-train's image paths are relative to (its unzipped image "
                                     "archive; default: each file's folder)")
    evaluation: str | None = setting(None, "evaluation files for --stage both (default on embedded data: its "
                                     "held-out split)")
    embedded_seed: int = setting(0, "which draw of the embedded dataset (stage-1 documents, stage-2 pairs) a run "
                                 "without data files trains on; apart from run.seed, so that runs of several seeds "
                                 "train on the same data and differ in training alone")
    # a packed row's activations grow with it: the paper's is 12,800, and 2**20 tokens would not fit any card
    token_budget: int = setting(1024, "tokens per packed row (micro-batch)", most=1 << 20)
    max_doc_tokens: int = setting(512, "longer documents are truncated (never inside an image)")
    min_pixels: int = setting(56 * 56, "images smaller than this are scaled up (pixels)")
    # bounds min_pixels too, which scales images up: no larger than the largest image decoded at all (the paper's
    # is 1024 x 28 x 28)
    max_pixels: int = setting(56 * 56, "images larger than this are scaled down (pixels)", most=MAX_IMAGE_PIXELS)
    # host memory: 4 TiB is more than any host has
    cache_bytes: int = setting(1 << 30, "encoded documents kept in memory; the rest are read again", resumable=True,
                               most=1 << 42)
    # each one prepared ahead is a whole packed row in host memory; 2 keeps a GPU fed
    prefetch: int = setting(-1, "batches prepared ahead: in a background thread (workers=0; 0: inline), or by each "
                            "worker (at least 1); -1: 2 on a GPU, 0 on CPU", resumable=True, most=64)
    # each worker is a process holding its batches and its share of cache_bytes
    workers: int = setting(-1, "processes per rank that read, decode, tokenize, pack, mask and collate batches; 0: "
                           "in the training process; -1: on a GPU the rank's share of the host's cores less one, 0 on "
                           "CPU and with DALI", resumable=True, most=256)
    image_decoder: Literal["pil", "dali-cpu", "dali-gpu"] = setting(
        "pil", "pil, or NVIDIA DALI (the dali extra) on the CPU or the GPU", resumable=True)
    index_cache: str | None = setting(None, "where each source's index is kept (default: out/index)",
                                      resumable=True)
    # processes, each a CPU's work: 1024 is past any host
    index_workers: int = setting(-1, "processes per rank that build the data index; -1: the CPUs shared among the "
                                 "node's ranks", resumable=True, most=1024)


@dataclass
class ModelConfig:
    path: str | None = setting(None, "a local Qwen2-VL / Qwen2.5-VL checkpoint folder with its tokenizer "
                               "(else the preset with random weights)")
    preset: str = setting("tiny", "shape with random weights when no path is given: tiny (byte tokenizer), 3b, 7b")
    gradient_checkpointing: bool = setting(False, "recompute each decoder layer's activations in the backward "
                                           "(recompute=full, kept as the shorter name)", resumable=True)
    recompute: str = setting(
        "none", "activation recomputation per region (decoder layer, vision block, MAE decoder): none; full (keep "
        "each region's input); selective (keep matrix-product and attention outputs, recompute the pointwise work); "
        "every-K (full on every K-th region); auto (the least that the token budget fits in the card's memory, by "
        "moca.model.regions.activation_bytes; printed)", resumable=True)
    compile: bool = setting(False, "torch.compile each region (decoder layer, vision block, MAE decoder), the token "
                            "dimension dynamic", resumable=True)
    init: str | None = setting(None, "start from this run's newest backbone (a run of either stage, or a "
                               "cpt.objective=next-token base) instead of the preset's random weights or model.path's; "
                               "stage 2 of --stage both starts from stage 1 instead", resumable=True)  # step 0 only
    fused_pointwise: bool = setting(False, "RMSNorm, rotary embedding and SwiGLU through moca's fused Triton kernels "
                                    "(moca_kernels.pointwise; off until a GPU run shows them ahead)")

    @property
    def recomputation(self) -> Recompute:
        """``recompute`` parsed (``Recompute.parse``); full under ``gradient_checkpointing``."""
        return Recompute("full") if self.gradient_checkpointing else Recompute.parse(self.recompute)


@dataclass
class Schedule:
    """AdamW and its learning-rate schedule: a warmup, then linear decay to zero."""
    max_steps: int = setting(300, "optimizer steps", resumable=True)
    lr: float = setting(3e-3, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.1, "share of max_steps spent warming up")
    warmup: Literal["linear", "log"] = setting("linear", "warmup shape: linear, or log (DeepSpeed's WarmupDecayLR "
                                               "default, the authors' schedule: log(step + 1) / log(warmup steps))")
    grad_clip: float = setting(5.0, "gradient norm clipped to this")


@dataclass
class CptConfig(Schedule):
    lr: float = setting(3e-4, "peak learning rate (below stage 2's, as the paper's 2e-6 against 2e-5)")
    objective: Literal["moca", "next-token"] = setting(
        "moca", "moca: MLM and MAE (use_mlm, use_mae) under bidirectional attention; next-token: causal attention, "
        "every text token predicts the next, nothing corrupted (the causal pre-training a real model comes with: how "
        "moca ablate makes the tiny preset a base to start from)")
    # the paper's is 4; 4,096 packed rows of 12,800 tokens is 52M tokens a step on each rank
    grad_accum: int = setting(1, "packed micro-batches per optimizer step", most=4096)
    mlm_ratio: float = setting(0.4, "share of non-special text tokens masked for MLM")
    mae_ratio: float = setting(0.5, "share of each document's image tokens masked for MAE")
    mae_sampling: Literal["count", "bernoulli"] = setting(
        "count", "count: exactly round(mae_ratio * n) of each document's n image tokens; bernoulli: each token "
        "independently with probability mae_ratio (the authors' draw)")
    mae_weight: float = setting(0.5, "loss = MLM + mae_weight * MAE")
    use_mlm: bool = setting(True, "train the masked-LM objective")
    use_mae: bool = setting(True, "train the masked-autoencoding objective")

    @property
    def next_token(self) -> bool:
        """Whether stage 1 is causal next-token prediction (a base) rather than MoCa's objectives."""
        return self.objective == "next-token"

    @property
    def trains_mlm(self) -> bool:
        """Whether text tokens are masked and predicted (next-token prediction masks nothing)."""
        return self.use_mlm and not self.next_token

    @property
    def trains_mae(self) -> bool:
        """Whether image tokens are masked and reconstructed (never under next-token prediction)."""
        return self.use_mae and not self.next_token


@dataclass
class ClConfig(Schedule):
    max_steps: int = setting(100, "optimizer steps", resumable=True)
    lr: float = setting(1e-3, "peak learning rate")
    init: str | None = setting(None, "start from this stage-1 run's newest checkpoint (its backbone; the MAE head "
                               "is left out)", resumable=True)  # read at step 0 only
    # a step holds every pair's embeddings (and without grad_cache their activations): the paper's is 24
    pairs_per_batch: int = setting(32, "pairs per contrastive batch on each rank", most=1 << 16)
    # each query scores its own negatives, pairs_per_batch x hard_negatives documents more: the paper's is 2
    hard_negatives: int = setting(2, "hard negatives per query (fewer in a record are repeated in turn)", most=1024)
    temperature: float = setting(0.03, "InfoNCE temperature")
    learn_temperature: bool = setting(False, "train the temperature too")
    task_batching: Literal["mixed", "homogeneous"] = setting("mixed", "mixed tasks per batch (MoCa), or one task "
                                                             "per batch")
    grad_cache: bool = setting(False, "GradCache: activations of one packed row at a time")
    attention: Literal["bidirectional", "causal"] = setting(
        "bidirectional", "the language model's attention in stage 2 and in the trained encoder: bidirectional "
        "(MoCa), or causal (stock Qwen; the paper's causal baseline)")
    pooling: Literal["mean", "last"] = setting("mean", "an embedding is the mean of a document's final states, or "
                                              "its last token's (the causal baseline's)")


@dataclass
class ParallelConfig:
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2)",
                         resumable=True)
    # NCCL's own default; gloo's is 30 minutes. It must outlast the longest wait of an honest run: a
    # rank saving its checkpoint shard or building its data index while the others wait. A day at most.
    timeout: float = setting(600.0, "seconds a rank waits in a collective (NCCL or gloo) for the others: a rank that "
                             "stopped answering (hung, stopped, on a lost node) then ends the run, naming the rank "
                             "and the collective, instead of holding the others", resumable=True, most=24 * 3600)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cpt: CptConfig = field(default_factory=CptConfig)
    cl: ClConfig = field(default_factory=ClConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def stage(self, name: str) -> CptConfig | ClConfig:
        """The section of stage ``name`` (cpt or cl)."""
        return getattr(self, name)

    def update(self, overrides: dict) -> Config:
        """A copy with ``overrides`` ({"section.field" or "field": value}) applied; values are
        converted from strings where they are strings. Raises ValueError naming the setting."""
        sections = {name: dataclasses.replace(getattr(self, name)) for name in SECTIONS}
        for key, raw in overrides.items():
            for section, name in targets(key):
                setattr(sections[section], name, _convert(section, name, raw))
        return Config(**sections)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """From ``to_dict``'s form ({section: {field: value}}), e.g. a run's config.json."""
        if not isinstance(values, dict) or not all(isinstance(fields, dict) for fields in values.values()):
            raise ValueError("settings are an object of sections, each an object of settings")
        unknown = set(values) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
        return cls().update({f"{s}.{k}": v for s, fields in values.items() for k, v in fields.items()})

    @classmethod
    def from_toml(cls, path: str) -> Config:
        """The settings of a TOML file over the defaults (``resolve`` puts them over a recipe)."""
        return cls().update(toml_settings(path))

    @classmethod
    def recipe(cls, name: str) -> Config:
        """The defaults with recipe ``name``'s values (``RECIPES``)."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
        return cls().update({**RECIPES[name], "run.recipe": name})

    @classmethod
    def resolve(cls, settings: dict) -> Config:
        """A run's settings from ``settings`` ({"section.field" or "field": value}): the recipe that
        ``run.recipe`` names, else ``moca`` when ``model.path`` is given (a real model), else
        ``tiny``; then ``settings`` over it, so that an explicit value wins over the recipe's."""
        named = [value for key, value in settings.items() if targets(key) == [("run", "recipe")]]
        name = str(named[-1]) if named else "moca" if cls().update(settings).model.path else "tiny"
        return cls.recipe(name).update(settings)

    def recipe_differences(self) -> list[str]:
        """``section.field: recipe's -> this run's`` for every setting that differs from the recipe."""
        return Config.recipe(self.run.recipe).differences(self)

    def validate(self) -> Config:
        """Checks across fields; returns self. Raises ValueError naming the setting."""
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                kind, value = _hints(section)[f.name], getattr(getattr(self, section), f.name)
                if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
                    raise ValueError(f"{section}.{f.name} must be one of {', '.join(typing.get_args(kind))}, got "
                                     f"{value!r}")
                if isinstance(value, float):  # a dataclass built in code has not been through _convert
                    _finite(section, f.name, value)
                if isinstance(value, str) and len(value) > MAX_TEXT:
                    raise ValueError(f"{section}.{f.name} takes at most {MAX_TEXT} characters, got {len(value):,}")
                if f.metadata["most"] is not None and value > f.metadata["most"]:
                    raise ValueError(f"{section}.{f.name} takes at most {f.metadata['most']:,}, got {value:,}")
        d = self.data
        if not 1 <= d.max_doc_tokens <= d.token_budget:
            raise ValueError(f"max_doc_tokens ({d.max_doc_tokens}) must be between 1 and token_budget "
                             f"({d.token_budget}): a document is never split across packed rows")
        if d.workers < -1 or (d.workers > 0 and d.image_decoder != "pil"):
            raise ValueError(f"data.workers must be -1 (the default), 0 or a count, and 0 with DALI (it decodes in "
                             f"threads of its own, on the GPU for dali-gpu), got {d.workers} with image_decoder="
                             f"{d.image_decoder}")
        for name in ("documents", "pairs"):
            if getattr(d, name):
                parse_sources(getattr(d, name), f"data.{name}")
        if d.sample_per_source is not None and d.sample_per_source < 1:
            raise ValueError(f"data.sample_per_source must be at least 1 (or none: all), got {d.sample_per_source}")
        if not 0 < d.min_pixels <= d.max_pixels:
            raise ValueError(f"min_pixels ({d.min_pixels}) must be positive and at most max_pixels ({d.max_pixels})")
        for name in ("cpt", "cl"):
            s = self.stage(name)
            if s.max_steps < 1 or s.lr < 0 or s.weight_decay < 0 or not 0 <= s.warmup_ratio <= 1 or s.grad_clip <= 0:
                raise ValueError(f"{name}: max_steps >= 1, lr >= 0, weight_decay >= 0, 0 <= warmup_ratio <= 1 and "
                                 f"grad_clip > 0 are required, got {dataclasses.asdict(s)}")
        r = self.run
        if r.save_every < 1 or r.log_every < 1 or r.keep_checkpoints < 1:
            raise ValueError("save_every, log_every and keep_checkpoints must be >= 1")
        report_targets(r.report_to)
        profile_range(r.profile_steps)
        c = self.cpt
        if c.grad_accum < 1 or not 0 <= c.mlm_ratio <= 1 or not 0 <= c.mae_ratio <= 1 or c.mae_weight < 0:
            raise ValueError("cpt: grad_accum >= 1, mlm_ratio and mae_ratio in [0, 1] and mae_weight >= 0 are required")
        if not c.next_token and not (c.use_mlm or c.use_mae):
            raise ValueError("cpt: use_mlm and use_mae are both false: stage 1 would have nothing to learn")
        if self.cl.hard_negatives < 0 or self.cl.pairs_per_batch < 1 or self.cl.temperature <= 0:
            raise ValueError("cl: hard_negatives >= 0, pairs_per_batch >= 1 and temperature > 0 are required")
        if self.parallel.timeout <= 0:
            raise ValueError(f"parallel.timeout must be positive (seconds), got {self.parallel.timeout}")
        if Recompute.parse(self.model.recompute).kind not in ("none", "full") and self.model.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing=true means recompute=full; it contradicts "
                             f"recompute={self.model.recompute}: set one of them")
        if self.model.path is None and self.model.preset != "tiny":
            raise ValueError(f"preset {self.model.preset!r} uses Qwen's token ids, and only a checkpoint brings that "
                             "tokenizer: give --model PATH (the tiny preset runs on the built-in byte tokenizer)")
        return self

    def differences(self, other: Config) -> list[str]:
        """``section.field: mine -> other's`` for every setting that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{s}.{k}: {v!r} -> {theirs[s][k]!r}" for s, fields in mine.items() for k, v in fields.items()
                if theirs[s][k] != v]

    def result_differences(self, other: Config) -> list[str]:
        """The differences that change what a resumed run computes (all but the resumable settings)."""
        return [d for d in self.differences(other) if not _field(*d.split(":", 1)[0].split(".")).metadata["resumable"]]

    def write(self, run_dir: str) -> None:
        """``run_dir/config.json``, written atomically."""
        atomic_write(os.path.join(run_dir, "config.json"), json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def read(cls, run_dir: str) -> Config:
        path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{run_dir}: no config.json there (not a moca run directory)")
        values = read_json(path, "settings")
        try:
            return cls.from_dict(values)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


SECTIONS = [f.name for f in dataclasses.fields(Config)]

# Every setting that changes results, per recipe, for both stages (the rest keep their defaults).
# moca: the paper (arXiv 2506.23115) and the authors' scripts (haon-chen/MoCa). Stage 1: AdamW lr
# 2e-6, no weight decay, clip 5, 10% warmup, documents of up to 1,280 tokens, images of 256 to
# 1,024 merged 28 x 28 tokens, MLM 0.4, MAE 0.5 drawn per token, MAE weight 0.5 (the paper's best;
# the released script has 0.1), micro-batches of 12,800 tokens and 4 of them a step (the authors'
# 12,800 per GPU micro-batch with accumulation 4; they count an image token as 4), 3,311 steps
# (their final checkpoint). Stage 2: lr 2e-5, 24 pairs per rank with 2 hard negatives each, 5%
# warmup, temperature 0.03, clip 5, full fine-tuning, mixed-task batches; the authors ran one epoch
# of their pairs, so cl.max_steps is for the user to set from theirs (pairs / (24 x ranks)). Both
# stages warm up logarithmically, as the authors' DeepSpeed WarmupDecayLR does.
RECIPES: dict[str, dict] = {
    "tiny": {},
    "moca": {
        "data.token_budget": 12800, "data.max_doc_tokens": 1280, "data.sample_per_source": 500_000,
        "data.min_pixels": 256 * 28 * 28, "data.max_pixels": 1024 * 28 * 28,
        "model.gradient_checkpointing": True,
        "cpt.max_steps": 3311, "cpt.lr": 2e-6, "cpt.weight_decay": 0.0, "cpt.warmup_ratio": 0.1, "cpt.warmup": "log",
        "cpt.grad_clip": 5.0,
        "cpt.grad_accum": 4, "cpt.mlm_ratio": 0.4, "cpt.mae_ratio": 0.5, "cpt.mae_sampling": "bernoulli",
        "cpt.mae_weight": 0.5, "cpt.use_mlm": True, "cpt.use_mae": True,
        "cl.max_steps": 1000, "cl.lr": 2e-5, "cl.weight_decay": 0.0, "cl.warmup_ratio": 0.05, "cl.warmup": "log",
        "cl.grad_clip": 5.0,
        "cl.pairs_per_batch": 24, "cl.hard_negatives": 2, "cl.temperature": 0.03, "cl.learn_temperature": False,
        "cl.task_batching": "mixed",
    },
}


def toml_settings(path: str) -> dict:
    """{"section.field": value} of a TOML file with one table per section."""
    try:
        values = tomllib.loads(read_bounded(path, "--config"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    bad = [k for k, v in values.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"--config {path}: {bad[0]!r} is not a table; put settings under [run], [data], "
                         "[model], [cpt], [cl] or [parallel]")
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--config {path}: unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    return {f"{s}.{k}": v for s, fields in values.items() for k, v in fields.items()}


_SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}


@functools.cache
def _hints(section: str) -> dict:
    return typing.get_type_hints(_SECTION_TYPES[section])


def _field(section: str, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(_SECTION_TYPES[section])}[name]


def targets(key: str) -> list[tuple[str, str]]:
    """The (section, field) pairs a setting's name refers to."""
    key = key.strip().replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r} in {key!r}; sections: {', '.join(SECTIONS)}")
        if name not in _hints(section):
            raise ValueError(f"unknown setting {key!r}; {section} has: {', '.join(_hints(section))}")
        return [(section, name)]
    found = [(s, key) for s in SECTIONS if key in _hints(s)]
    if not found:
        raise ValueError(f"unknown setting {key!r}; see moca train --help for the settings")
    return found


def _convert(section: str, name: str, raw):
    """``raw`` (a string from the command line, or a TOML / JSON value) as the field's type."""
    kind = _hints(section)[name]
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "")):
        if not optional:
            raise ValueError(f"{section}.{name} cannot be empty")
        return None
    if typing.get_origin(kind) is Literal:
        return str(raw)
    if kind is str and isinstance(raw, list | tuple):  # a TOML list of names: report_to
        return ",".join(str(item) for item in raw)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{section}.{name} takes true or false, got {raw!r}")
        return str(raw).lower() in ("1", "true", "yes")
    if kind is int:
        return _integer(section, name, raw)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{section}.{name} takes a {kind.__name__}, got {raw!r}") from None
    return _finite(section, name, value) if kind is float else value


def _finite(section: str, name: str, value: float) -> float:
    """``value`` unless it is nan or inf (ValueError naming the setting): every float setting is a
    rate, ratio, weight, bound or time, and a non-finite one would poison every step after it (or
    wait forever) and be saved as a token that JSON readers refuse."""
    if not math.isfinite(value):
        raise ValueError(f"{section}.{name} takes a finite number, got {value}")
    return value


def _integer(section: str, name: str, raw) -> int:
    """An int from an int, a whole float, or a string of either (``1e6`` included)."""
    try:
        value = float(raw) if isinstance(raw, str) and not raw.strip().lstrip("-").isdigit() else raw
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{section}.{name} takes an int, got {raw!r}") from None


def describe() -> str:
    """Every setting with its type, default and meaning: the text of ``moca train --help``."""
    lines = []
    defaults = Config()
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(defaults, section)):
            kind = _hints(section)[f.name]
            shown = "|".join(typing.get_args(kind)) if typing.get_origin(kind) is Literal else \
                getattr(kind, "__name__", str(kind).replace("typing.", ""))
            more = (f"; at most {f.metadata['most']:,}" if f.metadata["most"] is not None else "") + \
                ("; may change on resume" if f.metadata["resumable"] else "")
            lines.append(f"  {section}.{f.name} ({shown}, default {getattr(getattr(defaults, section), f.name)!r}): "
                         f"{f.metadata['doc']}{more}")
    return "\n".join(lines)
