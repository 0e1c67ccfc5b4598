"""The slim trainer: stage 1 (``cpt``: MLM + MAE continual pre-training) on packed documents.

The corpus is indexed once by cost (reading only image headers); documents are read, decoded
and encoded when their micro-batch comes. One run directory holds ``config.json``, ``metrics.jsonl`` (a JSON object per logged step),
``checkpoints/step-N.pt`` (written atomically: a temporary file, then a rename), and at the end
``loss.png``. ``resume`` continues a run from its latest checkpoint with the same results as an
uninterrupted run: model, optimizer, scheduler and data position are restored, and every
micro-batch's masks come from a generator seeded by (seed, step, micro-batch).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass

import torch

from .data import embedded
from .data.cpt import collate, encode, layout
from .data.packing import pack
from .data.records import BadRecords, DataError, load_cpt, read_cpt
from .data.tokenizer import ByteTokenizer, HFTokenizer
from .model.flops import cpt_step_flops, peak_bf16
from .model.heads import MocaCPT
from .model.qwen import build, enable_checkpointing


@dataclass
class TrainConfig:
    stage: str = "cpt"
    preset: str = "tiny"
    model: str | None = None          # a local Qwen2.5-VL checkpoint (else the preset, random weights)
    data: str | None = None           # a .jsonl file or a folder of them (else the embedded dataset)
    out: str = "runs/moca-tiny"
    max_steps: int = 1000
    save_every: int = 250
    log_every: int = 25
    seed: int = 0
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 5.0
    grad_accum: int = 1
    token_budget: int = 1024          # tokens per packed micro-batch
    max_doc_tokens: int = 512         # longer documents are truncated (never inside an image)
    mlm_ratio: float = 0.4
    mae_ratio: float = 0.5
    mae_weight: float = 0.5
    use_mlm: bool = True
    use_mae: bool = True
    min_pixels: int = 56 * 56
    max_pixels: int = 56 * 56
    cache_bytes: int = 1 << 30        # encoded documents kept in memory (the rest are read again)
    prefetch: int = 2                 # micro-batches prepared ahead in a background thread (0: inline)
    image_decoder: str = "pil"        # pil, or dali-cpu / dali-gpu (the dali extra: moca/data/dali.py)
    index_cache: str | None = None    # where each data file's cost index is kept (default: out/index)
    gradient_checkpointing: bool = False
    strict: bool = False
    profile_steps: str | None = None  # "A:B": cudaProfilerStart before step A, Stop after step B

    def update(self, overrides: dict) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {}
        for key, raw in overrides.items():
            if key not in fields:
                raise ValueError(f"unknown setting {key!r}; settings: {', '.join(sorted(fields))}")
            current = getattr(self, key)
            kind = type(current) if current is not None else str
            if kind is bool:
                if str(raw).lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{key} takes true or false, got {raw!r}")
                values[key] = str(raw).lower() in ("1", "true", "yes")
            else:
                try:
                    values[key] = kind(raw) if raw is not None else None
                except ValueError:
                    raise ValueError(f"{key} takes a {kind.__name__}, got {raw!r}") from None
        return dataclasses.replace(self, **values)


class _Nvtx:
    """NVTX ranges for Nsight Systems; no-ops without CUDA."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_pop()


def _data_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise ValueError(f"--data {path}: no .jsonl files in the folder")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file or folder")
    return [path]


@dataclass(frozen=True)
class Entry:
    """A document of the corpus: where its line is, and its cost in tokens."""
    file: str
    offset: int
    where: str
    cost: int


def _index_file(file: str, config: TrainConfig, tokenizer, bad: BadRecords) -> list[Entry]:
    """One file's entries, from the index cache when the file, the tokenizer and the layout
    settings are those it was made with, else from a scan that reads only image headers."""
    stat = os.stat(file)
    key = hashlib.sha1(json.dumps([os.path.abspath(file), stat.st_size, stat.st_mtime_ns, tokenizer.fingerprint,
                                   config.max_doc_tokens, config.min_pixels, config.max_pixels]).encode()).hexdigest()
    cached = os.path.join(config.index_cache or os.path.join(config.out, "index"), f"{key}.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            saved = json.load(f)
        if config.strict and saved["examples"]:
            raise DataError(saved["examples"][0])
        for kind, count in saved["bad"].items():
            bad.counts[kind] += count
        bad.examples.extend(saved["examples"][: 10 - len(bad.examples)])
        return [Entry(file, offset, f"{file}:{line}", cost) for offset, line, cost in saved["entries"]]
    before, examples = dict(bad.counts), len(bad.examples)
    entries = []
    for doc in read_cpt(file, bad, strict=config.strict, decode=False):
        ids, _ = layout(doc, tokenizer, config.max_doc_tokens, config.min_pixels, config.max_pixels)
        if ids:
            entries.append(Entry(file, doc.offset, doc.where, len(ids)))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached + ".tmp", "w") as f:
        json.dump(dict(entries=[[e.offset, int(e.where.rsplit(":", 1)[1]), e.cost] for e in entries],
                       bad={k: v - before.get(k, 0) for k, v in bad.counts.items() if v - before.get(k, 0)},
                       examples=bad.examples[examples:]), f)
    os.replace(cached + ".tmp", cached)
    return entries


def index_documents(config: TrainConfig, tokenizer, log=print) -> list[Entry]:
    """Every usable document of the run's data (the embedded dataset when none is given) with its
    cost: only this index stays in memory, documents are read again when their micro-batch comes.
    Each file is scanned once (image headers only) and its index cached under ``index_cache``
    (default: the run directory), so a resumed run, or one sharing the cache, does not scan it again."""
    path = config.data or embedded.write(os.path.join(config.out, "data"), seed=config.seed)
    bad = BadRecords()
    entries = [e for file in _data_files(path) for e in _index_file(file, config, tokenizer, bad)]
    if bad.total:
        log(f"skipped {bad.total} bad records ({dict(bad.counts)}); first: {bad.examples[0]}")
    if not entries:
        raise ValueError(f"no usable documents in {path}")
    return entries


def micro_batches(entries: list[Entry], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches (document indices): documents shuffled by (seed, epoch), then
    packed under the token budget."""
    order = list(range(len(entries)))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    batches = pack([entries[i].cost for i in order], config.token_budget)
    return [[order[i] for i in b] for b in batches]


class _Documents:
    """Encoded documents by index: read and encoded on first use, and kept while they fit in
    ``cache_bytes`` (a small corpus is encoded once; a large one streams). A document that fails
    to load (a corrupt image whose header was fine) is skipped with a warning, or stops the run
    under strict."""

    def __init__(self, entries: list[Entry], config: TrainConfig, tokenizer, log):
        self.entries, self.config, self.tokenizer, self.log = entries, config, tokenizer, log
        self.kept: dict[int, object] = {}
        self.failed: set[int] = set()  # warned about once, then left out
        self.room = config.cache_bytes
        self.decoder = None
        if config.image_decoder != "pil":
            from .data.dali import DaliImages
            self.decoder = DaliImages(config.image_decoder.split("-", 1)[1])

    def get(self, indices: list[int]) -> list:
        out = []
        for i in indices:
            if i in self.failed:
                continue
            if i in self.kept:
                out.append(self.kept[i])
                continue
            entry, c = self.entries[i], self.config
            try:
                doc = encode(load_cpt(entry.file, entry.offset, entry.where, decode=self.decoder is None),
                             self.tokenizer, c.max_doc_tokens, c.min_pixels, c.max_pixels, self.decoder)
            except ValueError as exc:
                if c.strict:
                    raise
                self.log(f"{exc}; document skipped")
                self.failed.add(i)
                continue
            size = doc.rows.numel() * 4 + doc.ids.numel() * 8
            if size <= self.room:
                self.kept[i], self.room = doc, self.room - size
            out.append(doc)
        return out


def _micro_batch_stream(entries, documents, tokenizer, model_config, config: TrainConfig, step: int, epoch: int,
                        position: int, pin: bool = False):
    """Micro-batches in training order from (step, epoch, position) on: (batch, its model FLOPs,
    epoch, position after it). Each one's masks come from a generator seeded by (seed, step,
    micro-batch), so the sequence does not depend on where a run was resumed."""
    batches = micro_batches(entries, config, epoch)
    while True:
        for micro in range(config.grad_accum):
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = micro_batches(entries, config, epoch)
            with _Nvtx("load"):
                chosen = documents.get(batches[position])
            position += 1
            if not chosen:
                raise ValueError(f"no document of micro-batch {position - 1} of epoch {epoch} could be read "
                                 "(see the warnings above)")
            generator = torch.Generator().manual_seed(hash((config.seed, step, micro)) % 2**63)
            with _Nvtx("collate"):
                batch = collate(chosen, tokenizer.specials, config.mlm_ratio, config.mae_ratio, generator)
            flops = cpt_step_flops(model_config, batch["lengths"], batch["image_grid_thw"].tolist(),
                                   int((batch["labels"] != -100).sum()) if config.use_mlm else 0,
                                   batch["mae_positions"].numel() if config.use_mae else 0, config.use_mae)
            if pin:  # page-locked, so that the copy to the GPU does not wait on the host
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch, flops, epoch, position
        step += 1


def _background(items, depth: int):
    """``items`` produced ``depth`` ahead in a background thread (reading, decoding and collating
    overlap the model's step); an exception there is raised here, in order. ``depth`` 0: inline."""
    if depth <= 0:
        yield from items
        return
    import queue
    import threading
    ready, stop = queue.Queue(maxsize=depth), threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((None, exc))

    thread = threading.Thread(target=produce, name="moca-loader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()


def _lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    warmup = max(1, int(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _mlm_accuracy(hidden, weight, labels) -> float | None:
    rows = (labels != -100).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    with torch.no_grad():
        hits = 0
        for chunk in rows.split(1024):
            hits += ((hidden[chunk].float() @ weight.float().T).argmax(1) == labels[chunk]).sum().item()
    return hits / rows.numel()


def _save(path_dir: str, step: int, state: dict, keep: int = 2) -> str:
    os.makedirs(path_dir, exist_ok=True)
    final = os.path.join(path_dir, f"step-{step:07d}.pt")
    tmp = final + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, final)  # atomic: a reader sees the old checkpoint or the whole new one
    for old in sorted(glob.glob(os.path.join(path_dir, "step-*.pt")))[:-keep]:
        os.remove(old)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.pt")))
    return found[-1] if found else None


def _plot(metrics: list[dict], path: str) -> None:
    """loss.png: the logged losses against the step (drawn with Pillow, no plotting package)."""
    from PIL import Image, ImageDraw
    series = {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None] for k in ("loss", "mlm_loss", "mae_loss")}
    points = [p for s in series.values() for p in s]
    if not points:
        return
    width, height, pad = 640, 400, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = 0.0, max(p[1] for p in points) or 1.0
    sx = lambda x: pad + (x - x0) / max(1e-9, x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / max(1e-9, y1 - y0) * (height - 2 * pad)  # noqa: E731
    draw.rectangle((pad, pad, width - pad, height - pad), outline="gray")
    for (name, s), color in zip(series.items(), ("black", "blue", "red")):
        if len(s) > 1:
            draw.line([(sx(x), sy(y)) for x, y in s], fill=color, width=2)
        draw.text((pad + 10, pad + 10 + 14 * ("loss", "mlm_loss", "mae_loss").index(name)), name, fill=color)
    draw.text((pad, height - pad + 8), f"step {x0} .. {x1}; loss 0 .. {y1:.2f}", fill="black")
    image.save(path)


def saved_config(run_dir: str, overrides: dict | None = None) -> TrainConfig:
    """The configuration of the run in ``run_dir``, with ``overrides`` (e.g. a larger max_steps)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--resume {run_dir}: no config.json there (not a moca run directory)")
    with open(path) as f:
        return TrainConfig(**json.load(f)).update({**(overrides or {}), "out": run_dir})


def train(config: TrainConfig, resume: bool = False, stop_at: int | None = None, log=print) -> dict:
    """Run stage 1 in ``config.out``; returns the last logged metrics. ``resume``: continue from
    the run's latest checkpoint. ``stop_at``: stop after that step as if the process were killed
    (the checkpoints written so far stay)."""
    if config.stage != "cpt":
        raise ValueError(f"stage {config.stage!r} is not implemented yet (only 'cpt')")
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    if config.image_decoder not in ("pil", "dali-cpu", "dali-gpu"):
        raise ValueError(f"image_decoder must be pil, dali-cpu or dali-gpu, got {config.image_decoder!r}")
    if config.model is None and config.preset != "tiny":
        raise ValueError(f"preset {config.preset!r} uses Qwen's token ids, and only a checkpoint brings that "
                         "tokenizer: give --model PATH (the tiny preset runs on the built-in byte tokenizer)")
    tokenizer = HFTokenizer(config.model) if config.model else ByteTokenizer()
    model = build(None if config.model else config.preset, config.model)
    rows = model.get_input_embeddings().num_embeddings
    if max(tokenizer.specials.all) >= rows:  # e.g. <|mask|> appended past the embedding table
        model.resize_token_embeddings(max(tokenizer.specials.all) + 1)
        log(f"the tokenizer's ids reach {max(tokenizer.specials.all)}: embedding table resized from {rows} rows "
            f"to {max(tokenizer.specials.all) + 1} (new rows start untrained)")
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    heads = MocaCPT(model, config.mae_weight, config.use_mlm, config.use_mae).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.max_steps, config.warmup_ratio))
    step, epoch, position = 0, 0, 0
    if resume:
        checkpoint = latest_checkpoint(config.out)
        if checkpoint is None:
            raise ValueError(f"--resume {config.out}: no checkpoint in {config.out}/checkpoints")
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        heads.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        log(f"resumed {config.out} at step {step} from {checkpoint}")
    entries = index_documents(config, tokenizer, log)
    documents = _Documents(entries, config, tokenizer, log)
    log(f"{len(entries)} documents, {len(micro_batches(entries, config, epoch))} micro-batches of up to "
        f"{config.token_budget} tokens per epoch")
    stream = _background(_micro_batch_stream(entries, documents, tokenizer, heads.model.config, config, step, epoch,
                                             position, pin=device.type == "cuda"), config.prefetch)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    if os.path.exists(metrics_path):  # a new run starts empty; a resumed one forgets steps after its checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if resume and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    peak = peak_bf16(torch.cuda.get_device_name()) if device.type == "cuda" else None
    profile = [int(x) for x in config.profile_steps.split(":")] if config.profile_steps else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    from tqdm import tqdm
    bar = tqdm(total=config.max_steps, initial=step, desc="cpt", unit="step", dynamic_ncols=True)
    last = {}
    while step < min(config.max_steps, stop_at if stop_at is not None else config.max_steps):
        if profile and step == profile[0] and device.type == "cuda":
            torch.cuda.cudart().cudaProfilerStart()
        started, tokens, flops = time.perf_counter(), 0, 0.0
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "mlm_loss": 0.0, "mae_loss": 0.0}
        for micro in range(config.grad_accum):
            batch, batch_flops, epoch, position = next(stream)
            flops += batch_flops
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            tokens += batch["input_ids"].numel()
            with _Nvtx("forward"), autocast:
                out = heads(batch)
            if not torch.isfinite(out["loss"]):
                bar.close()
                kept = latest_checkpoint(config.out)
                raise FloatingPointError(f"the loss became {out['loss'].item()} at step {step}; stopped. The last good "
                                         f"checkpoint is {kept or 'none (none was saved yet)'}")
            with _Nvtx("backward"):
                (out["loss"] / config.grad_accum).backward()
            for k in sums:
                sums[k] += out[k].item() / config.grad_accum
        with _Nvtx("optimizer"):
            torch.nn.utils.clip_grad_norm_(heads.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
        step += 1
        if profile and step == profile[1] + 1 and device.type == "cuda":
            torch.cuda.cudart().cudaProfilerStop()
        bar.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started  # the step alone, not the accuracy below
            last = dict(step=step, stage="cpt", **{k: round(v, 6) for k, v in sums.items()},
                        mlm_accuracy=_mlm_accuracy(out["hidden"], heads.model.lm_head.weight, batch["labels"]),
                        lr=scheduler.get_last_lr()[0], tokens_per_s=round(tokens / seconds, 1), epoch=epoch)
            last["model_tflops"] = round(flops / seconds / 1e12, 4)  # moca.model.flops: useful work only
            if device.type == "cuda":
                last["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                if peak:
                    last["mfu"] = round(flops / seconds / peak, 4)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{sums['loss']:.3f}", mlm_acc=last["mlm_accuracy"])
        if step % config.save_every == 0 or step == config.max_steps:
            _save(os.path.join(config.out, "checkpoints"), step,
                  dict(model=heads.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       step=step, epoch=epoch, position=position, config=dataclasses.asdict(config)))
    bar.close()
    stream.close()  # stops the loader thread
    if step < config.max_steps:  # stopped early (stop_at)
        return last
    with open(metrics_path) as f:
        _plot([json.loads(line) for line in f], os.path.join(config.out, "loss.png"))
    return {**last, "mlm_chance": 1 / tokenizer.vocab_size}
