"""The slim trainer: one loop for stage 1 (``cpt``: MLM + MAE continual pre-training) and stage 2
(``cl``: contrastive fine-tuning), whose data and steps live in ``moca.stages``.

One run directory holds ``config.json``, ``metrics.jsonl`` (a JSON object per logged step),
``checkpoints/step-N.pt`` (written atomically: a temporary file, then a rename), and at the end
``loss.png``. ``resume`` continues a run from its latest checkpoint with the same results as an
uninterrupted run: model, optimizer, scheduler and data position are restored, and every random
choice of the data (masks) is seeded by the step.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from dataclasses import dataclass

import torch

from .data.tokenizer import ByteTokenizer, HFTokenizer
from .model.embed import NonFiniteLoss
from .model.flops import peak_bf16
from .model.qwen import build, enable_checkpointing
from .stages import STAGES, _Nvtx


@dataclass
class TrainConfig:
    stage: str = "cpt"                # cpt, cl, or both (cpt, then cl from it, then the evaluation)
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
    prefetch: int = -1                # micro-batches prepared ahead in a background thread; 0: inline;
                                      # -1: 2 on a GPU, 0 on CPU (where the thread slows the model down)
    image_decoder: str = "pil"        # pil, or dali-cpu / dali-gpu (the dali extra: moca/data/dali.py)
    index_cache: str | None = None    # where each data file's cost index is kept (default: out/index)
    gradient_checkpointing: bool = False
    strict: bool = False
    profile_steps: str | None = None  # "A:B": cudaProfilerStart before step A, Stop after step B
    # stage 2 (cl)
    init: str | None = None           # start from this stage-1 run's latest checkpoint (its MAE head dropped)
    pairs_per_batch: int = 16         # pairs per contrastive batch (queries, positives, hard negatives)
    hard_negatives: int = 2           # per query (fewer in a record are repeated in turn)
    temperature: float = 0.03
    learn_temperature: bool = False
    task_batching: str = "mixed"      # mixed (MoCa) or homogeneous (one task per batch)
    grad_cache: bool = False          # encode the batch in chunks: activations of one packed row at a time
    fsdp: bool = False                # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    # stage both: the second stage's data and schedule, and what is evaluated at the end
    cl_data: str | None = None        # pairs for stage 2 (else the embedded pairs)
    cl_lr: float = 1e-3
    cl_max_steps: int = 300
    eval_data: str | None = None      # evaluation files (else, on embedded data, its held-out split)

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


def _lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    warmup = max(1, int(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


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


def _write_config(config: TrainConfig) -> None:
    """The run directory ``config.out`` with its ``config.json``."""
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)


def saved_config(run_dir: str, overrides: dict | None = None) -> TrainConfig:
    """The configuration of the run in ``run_dir``, with ``overrides`` (e.g. a larger max_steps)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--resume {run_dir}: no config.json there (not a moca run directory)")
    with open(path) as f:
        return TrainConfig(**json.load(f)).update({**(overrides or {}), "out": run_dir})


def model_and_tokenizer(config: TrainConfig, log=print):
    """The run's model (a local checkpoint, else the preset with random weights) and tokenizer,
    the embedding table grown when the tokenizer's ids reach past it."""
    tokenizer = HFTokenizer(config.model) if config.model else ByteTokenizer()
    model = build(None if config.model else config.preset, config.model)
    rows = model.get_input_embeddings().num_embeddings
    if max(tokenizer.specials.all) >= rows:  # e.g. <|mask|> appended past the embedding table
        model.resize_token_embeddings(max(tokenizer.specials.all) + 1)
        log(f"the tokenizer's ids reach {max(tokenizer.specials.all)}: embedding table resized from {rows} rows "
            f"to {max(tokenizer.specials.all) + 1} (new rows start untrained)")
    return model, tokenizer


def load_backbone(model, checkpoint: str) -> int:
    """Load the model weights (``model.*``: language model and vision tower) of a stage-1 or
    stage-2 checkpoint into ``model``, leaving heads aside; returns how many tensors."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return len(weights)


def _initial_weights(model, run_dir: str, log) -> None:
    """Start from a stage-1 run's latest checkpoint."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"init={run_dir}: no checkpoint in {run_dir}/checkpoints")
    log(f"started from {checkpoint} ({load_backbone(model, checkpoint)} tensors; MAE head dropped)")


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE and MASTER_ADDR set,
    even with one process) the process group is set up once: NCCL and this rank's GPU on CUDA
    machines, gloo on CPU."""
    import torch.distributed as dist
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun's environment
    if (size > 1 or launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)


def _shard(module) -> None:
    """FSDP2: each decoder layer, vision block and the MAE decoder its own unit, the rest with the
    root; a learned temperature stays whole (its gradient is averaged with the others')."""
    from torch.distributed.fsdp import fully_shard
    backbone = module.model.model
    for unit in list(backbone.language_model.layers) + list(backbone.visual.blocks):
        fully_shard(unit)
    if getattr(module, "mae_decoder", None) is not None:
        fully_shard(module.mae_decoder)
    ignored = {p for name, p in module.named_parameters() if name == "log_temperature"}
    fully_shard(module, ignored_params=ignored or None)
    module.model.uniform_collectives = True  # every rank runs every unit each step (moca.model.qwen.packed_hidden)


def _states(module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts, whole (gathered on every rank, on the CPU, under FSDP)."""
    if not fsdp:
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options), get_optimizer_state_dict(module, optimizer, options=options)


def _load_states(module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, state["model"], options=options)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)


def _average(module, done: dict, size: int, bucket: int = 1 << 25, gradients: bool = True) -> dict:
    """Data parallelism: the step's logged losses averaged over the ranks, its tokens and FLOPs
    summed, and (``gradients``: unless DDP did it during the backward) every gradient averaged,
    in buckets of ``bucket`` values (a parameter without a gradient on some rank counts as zero
    there; parameters FSDP shards are averaged by FSDP itself)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.tensor import DTensor
    params = [p for p in module.parameters() if gradients and p.requires_grad and not isinstance(p, DTensor)]
    device = next(module.parameters()).device
    if params:
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has)  # a parameter no rank used keeps no gradient, as in one process
        params = [p for p, used in zip(params, has.tolist()) if used]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        end, count = start, 0
        while end < len(params) and (count == 0 or count + params[end].numel() <= bucket):
            count, end = count + params[end].numel(), end + 1
        grads = [p.grad for p in params[start:end]]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= size
        for g, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(averaged)
        start = end
    names = sorted(done["metrics"])
    numbers = torch.tensor([done["metrics"][k] / size for k in names] + [done["tokens"], done["flops"] or 0.0],
                           dtype=torch.float64, device=device)
    dist.all_reduce(numbers)
    values = numbers.tolist()
    return dict(metrics=dict(zip(names, values[:len(names)])), tokens=int(values[-2]),
                flops=None if done["flops"] is None else values[-1])


def _finished(run_dir: str, max_steps: int) -> dict | None:
    """The last logged metrics of a run in ``run_dir`` that reached ``max_steps``, else None."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not checkpoint.endswith(f"step-{max_steps:07d}.pt"):
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.readlines()[-1])


def train_both(config: TrainConfig, resume: bool = False, log=print) -> dict:
    """Stage 1 in ``out/cpt``, stage 2 from its last checkpoint in ``out/cl`` (``cl_data``,
    ``cl_lr``, ``cl_max_steps``), then the evaluation of the result into ``out/cl/eval.json``:
    ``eval_data``, or on the embedded dataset its held-out split. ``resume`` skips a finished stage
    and continues an unfinished one. Returns {"cpt": ..., "cl": ..., "eval": ...}."""
    from .data import embedded
    from .encoder import Encoder
    from .eval import evaluate
    from .stages import _data_files
    rank = _distributed()[0]
    if rank == 0:
        _write_config(config)
    first = dataclasses.replace(config, stage="cpt", out=os.path.join(config.out, "cpt"))
    second = dataclasses.replace(config, stage="cl", out=os.path.join(config.out, "cl"), init=first.out,
                                 data=config.cl_data, lr=config.cl_lr, max_steps=config.cl_max_steps,
                                 save_every=min(config.save_every, config.cl_max_steps),
                                 log_every=min(config.log_every, config.cl_max_steps))
    results = {}
    for name, stage_config in (("cpt", first), ("cl", second)):
        done = _finished(stage_config.out, stage_config.max_steps) if resume else None
        if done is not None:
            log(f"stage {name} already finished in {stage_config.out}")
            results[name] = done
        else:
            log(f"stage {name} in {stage_config.out}")
            results[name] = train(stage_config, resume=resume and latest_checkpoint(stage_config.out) is not None,
                                  log=log)
    if rank != 0:  # the evaluation runs on rank 0
        return results
    if config.eval_data is None and config.data is None and config.cl_data is None:
        files = [embedded.write_eval(os.path.join(config.out, "eval-data"), seed=config.seed + 1000)]
    elif config.eval_data is not None:
        files = _data_files(config.eval_data)
    else:
        log("no eval_data given: the evaluation is skipped")
        return results
    results["eval"] = evaluate(Encoder.from_pretrained(second.out), files, strict=config.strict, log=log)
    with open(os.path.join(second.out, "eval.json"), "w") as f:
        json.dump(results["eval"], f, indent=1)
    return results


def train(config: TrainConfig, resume: bool = False, stop_at: int | None = None, log=print) -> dict:
    """Run ``config.stage`` (cpt or cl) in ``config.out``; returns the last logged metrics.
    ``resume``: continue from the run's latest checkpoint. ``stop_at``: stop after that step as if
    the process were killed (the checkpoints written so far stay)."""
    if config.stage == "both":
        if stop_at is not None:
            raise ValueError("stop_at applies to one stage at a time")
        return train_both(config, resume, log)
    if config.stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES) + ['both']}, got {config.stage!r}")
    if config.image_decoder not in ("pil", "dali-cpu", "dali-gpu"):
        raise ValueError(f"image_decoder must be pil, dali-cpu or dali-gpu, got {config.image_decoder!r}")
    if not 1 <= config.max_doc_tokens <= config.token_budget:
        raise ValueError(f"max_doc_tokens ({config.max_doc_tokens}) must be between 1 and token_budget "
                         f"({config.token_budget}): a document is never split across packed rows")
    if config.model is None and config.preset != "tiny":
        raise ValueError(f"preset {config.preset!r} uses Qwen's token ids, and only a checkpoint brings that "
                         "tokenizer: give --model PATH (the tiny preset runs on the built-in byte tokenizer)")
    rank, size, device = _distributed()
    main = rank == 0  # rank 0 logs and writes the run directory
    log = log if main else (lambda *args, **kwargs: None)
    if main:
        _write_config(config)
    torch.manual_seed(config.seed)
    model, tokenizer = model_and_tokenizer(config, log)
    if config.init and not resume:
        _initial_weights(model, config.init, log)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    stage = STAGES[config.stage](config, model, tokenizer, device, log)
    heads = stage.module
    fsdp = config.fsdp and torch.distributed.is_initialized()  # one rank under torchrun too: the same code path
    if config.fsdp and not fsdp:
        log("fsdp=true outside torchrun: one process, nothing to shard")
    if fsdp:
        _shard(heads)
    elif size > 1 and hasattr(stage, "data_parallel"):
        stage.data_parallel()  # DDP: gradients averaged during the backward
    averaged_by_ddp = size > 1 and getattr(stage, "replicated", None) is not None
    trained = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.max_steps, config.warmup_ratio))
    step, epoch, position = 0, 0, 0
    if resume:
        checkpoint = latest_checkpoint(config.out)
        if checkpoint is None:
            raise ValueError(f"--resume {config.out}: no checkpoint in {config.out}/checkpoints")
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        _load_states(heads, optimizer, state, fsdp)
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        log(f"resumed {config.out} at step {step} from {checkpoint}")
    stage.start(step, epoch, position)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    if main and os.path.exists(metrics_path):  # a new run starts empty; a resumed one forgets steps after its checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if resume and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    peak = peak_bf16(torch.cuda.get_device_name()) if device.type == "cuda" else None
    profile = [int(x) for x in config.profile_steps.split(":")] if config.profile_steps else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    from tqdm import tqdm
    bar = tqdm(total=config.max_steps, initial=step, desc=config.stage, unit="step", dynamic_ncols=True,
               disable=not main)
    last = {}
    while step < min(config.max_steps, stop_at if stop_at is not None else config.max_steps):
        if profile and step == profile[0] and device.type == "cuda":
            torch.cuda.cudart().cudaProfilerStart()
        started = time.perf_counter()
        with _Nvtx(f"step {step}"):  # one range a step in Nsight Systems, the stage's ranges inside
            optimizer.zero_grad(set_to_none=True)
            try:
                measure = (step + 1) % config.log_every == 0 or step + 1 == config.max_steps
                done = stage.step(autocast, measure=measure)
            except NonFiniteLoss as exc:
                bar.close()
                stage.close()
                kept = latest_checkpoint(config.out)
                raise FloatingPointError(f"{exc} at step {step}; stopped. The last good checkpoint is "
                                         f"{kept or 'none (none was saved yet)'}") from None
            if size > 1:
                with _Nvtx("all-reduce"):
                    done = _average(heads, done, size, gradients=not averaged_by_ddp)
            with _Nvtx("optimizer"):
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                scheduler.step()
        step += 1
        if profile and step == profile[1] + 1 and device.type == "cuda":
            torch.cuda.cudart().cudaProfilerStop()
        bar.update(1)
        if main and (step % config.log_every == 0 or step == config.max_steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started  # the step alone, not the metrics below
            last = dict(step=step, stage=config.stage, **{k: round(v, 6) for k, v in done["metrics"].items()},
                        **stage.extras(), lr=scheduler.get_last_lr()[0],
                        tokens_per_s=round(done["tokens"] / seconds, 1), epoch=stage.epoch)
            if done["flops"] is not None:
                last["model_tflops"] = round(done["flops"] / seconds / 1e12, 4)  # moca.model.flops: useful work
            if device.type == "cuda":
                last["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                if peak and done["flops"] is not None:
                    last["mfu"] = round(done["flops"] / seconds / peak, 4)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{done['metrics']['loss']:.3f}", **stage.extras())
        if step % config.save_every == 0 or step == config.max_steps:
            model_state, optimizer_state = _states(heads, optimizer, fsdp)  # every rank: gathering is collective
            if main:
                _save(os.path.join(config.out, "checkpoints"), step,
                      dict(model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict(), step=step,
                           epoch=stage.epoch, position=stage.position, config=dataclasses.asdict(config)))
    bar.close()
    stage.close()
    if size > 1:
        import torch.distributed as dist
        dist.barrier()  # the last checkpoint is written before any rank moves on
    if step < config.max_steps or not main:  # stopped early (stop_at), or not the rank that logs
        return last
    with open(metrics_path) as f:
        _plot([json.loads(line) for line in f], os.path.join(config.out, "loss.png"))
    return {**last, **stage.summary()}
