"""The training loop: one loop for stage 1 (``cpt``) and stage 2 (``cl``), whose data and steps
live in ``moca.stages``, spread over processes by ``moca.parallel`` and saved by
``moca.checkpoint``.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
``checkpoints/step-N/`` and at the end ``loss.png``. A resumed run (``resume=True``) equals the
run that never stopped: model, optimizer, scheduler and data position are restored, and every
random choice of the data is seeded by the step. SIGTERM (what Slurm and Kubernetes send before
they stop a job) finishes the current step, saves, and raises ``Preempted``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time

import torch

from . import breakdown, checkpoint
from .config import Config
from .data import embedded
from .eval import evaluate_run
from .files import RunLock, append_to, atomic_write, data_files
from .logs import bars_shown
from .model import regions
from .model.embed import NonFiniteLoss
from .model.flops import peak_bf16
from .parallel import StepResult, strategy
from .plot import plot_both, plot_metrics, read_metrics
from .profiling import CaptureRange, nvtx
from .reporting import MetricWindow, Reporters, check_available, score_row
from .stages import STAGES

log = logging.getLogger(__name__)


class Preempted(Exception):
    """SIGTERM arrived; the run saved a checkpoint and stopped. ``moca train`` exits with
    ``EXIT_CODE`` so that a scheduler's wrapper can tell it from a failure, and rank 0 leaves
    ``MARKER`` in the run directory (the step, the checkpoint and the command that resumes), which
    the run removes when it finishes: a launcher's exit code is not the trainer's (torchrun exits 1
    when its workers exit 75), a file is."""
    EXIT_CODE = 75  # EX_TEMPFAIL: try again later (with --resume)
    MARKER = "PREEMPTED"


def lr_factor(step: int, total: int, warmup_ratio: float, shape: str = "linear") -> float:
    """The learning rate's share of its peak at ``step``: a warmup over ``warmup_ratio * total``
    steps, linear, or logarithmic as DeepSpeed's WarmupDecayLR does it (0 at step 0), then linear
    decay to zero."""
    warmup = max(1, int(warmup_ratio * total))
    if step < warmup:
        return math.log(step + 1) / math.log(max(2, warmup)) if shape == "log" else (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class _Termination:
    """Remembers a SIGTERM instead of dying on it (main thread only; elsewhere signals are the
    caller's business)."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


PER_RANK = {"cpt": "grad_accum", "cl": "pairs_per_batch"}  # x ranks: the global batch of each stage


def check_resume(out: str, config: Config, force: bool, size: int | None = None, saved_size: int | None = None) -> None:
    """Refuse (ValueError listing them, unless ``force``) settings that change what the run in
    ``out`` computes. A per-rank batch may change with the number of ranks (``size`` now,
    ``saved_size`` then) when the global batch stays the same; without ``size`` it is not checked."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        return
    saved = Config.read(out)  # run.out may differ (a moved directory): it is a resumable setting
    per_rank = tuple(f"{stage}.{name}:" for stage, name in PER_RANK.items())
    changed = [d for d in saved.result_differences(config) if not d.startswith(per_rank)]
    for stage, name in PER_RANK.items() if size is not None else ():  # without sizes: the stages check
        if stage != config.run.stage:
            continue
        before = getattr(saved.stage(stage), name) * (saved_size or 1)
        after = getattr(config.stage(stage), name) * size
        if before != after:
            changed.append(f"{stage}.{name} x ranks: {before} -> {after}")
    if changed and not force:
        raise ValueError(f"resuming {out} with settings that change its results: {'; '.join(changed)}. Pass --force "
                         "to resume anyway, or start a new run")


def _starting_point(config: Config, resume: bool, force: bool, size: int, main: bool) -> str | None:
    """The checkpoint a run starts from (None: step 0). Refuses to overwrite a run that has
    checkpoints unless resuming, to resume with settings that change results unless ``force``, and
    to start over while checkpoints exist that fail their check unless ``force``, which sets them
    aside (``checkpoint.set_aside``). A run that starts at step 0 sets an older metrics.jsonl aside."""
    out = config.run.out
    if not resume:
        if checkpoint.checkpoints(out):
            raise ValueError(f"{out} already holds a run with checkpoints: continue it with --resume {out}, or "
                             "choose another --out")
        found = None
    else:
        found = checkpoint.find(out)
        saved_size = checkpoint.trainer_state(found).get("world_size", 1) if found else size
        check_resume(out, config, force, size, saved_size)
    damaged = checkpoint.checkpoints(out) if found is None else []
    if damaged and not force:
        reasons = "; ".join(f"{path}: {checkpoint.damage(path)}" for path in damaged)
        raise ValueError(f"{out}: no checkpoint passes its check ({reasons}). Nothing was started or deleted: "
                         f"repair them, or pass --force to start over at step 0 with them set aside in "
                         f"{os.path.join(out, 'set-aside')}")
    metrics = os.path.join(out, "metrics.jsonl")
    old = damaged + ([metrics] if found is None and os.path.isfile(metrics) and os.path.getsize(metrics) else [])
    if old and main:
        log.info(f"starting {out} at step 0: {', '.join(old)} set aside in {checkpoint.set_aside(out, old)}")
    elif found is None and resume:
        log.info(f"{out}: no checkpoint yet, starting at step 0")
    return found


def _keep_metrics(path: str, step: int) -> list[dict]:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later steps
    again), rewritten atomically; returns them. A line that is not a row (``read_metrics``: the
    last one torn by a crash in the middle of its write) goes with the later steps."""
    if not os.path.lexists(path):
        return []
    kept = [row for row in read_metrics(os.path.dirname(path)) if row["step"] <= step]
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept).encode())
    return kept


def train(config: Config, resume: bool = False, force: bool = False, stop_at: int | None = None,
          resumed_as: str | None = None) -> dict:
    """Run ``config.run.stage`` in ``config.run.out``; returns the last logged metrics and the
    stage's summary ({"cpt", "cl", "eval"} for ``both``). ``resume``: continue from the newest
    sound checkpoint. ``stop_at``: stop after that step as if the process were killed.
    ``resumed_as``: the directory that ``--resume`` continues the run in (default
    ``config.run.out``; under ``--stage both``, the directory of both stages)."""
    config.validate()
    if config.run.stage == "both":
        if stop_at is not None:
            raise ValueError("stop_at applies to one stage at a time")
        return _train_both(config, resume, force)
    parallel = strategy(config)
    with RunLock(config.run.out) if parallel.main else contextlib.nullcontext(), _Termination() as termination:
        return _loop(config, parallel, resume, force, stop_at, termination, resumed_as or config.run.out)


def _loop(config: Config, parallel, resume: bool, force: bool, stop_at: int | None, termination,
          resumed_as: str) -> dict:
    run, schedule, device = config.run, config.stage(config.run.stage), parallel.device
    check_available(run.reports)  # before the model is built
    start = _starting_point(config, resume, force, parallel.size, parallel.main)
    parallel.barrier()  # every rank has compared its settings with the saved ones before they are replaced
    if parallel.main:
        config.write(run.out)
    torch.manual_seed(run.seed)
    model, tokenizer = checkpoint.model_and_tokenizer(config)
    init = config.cl.init if run.stage == "cl" and config.cl.init else config.model.init
    if init and start is None:
        checkpoint.load_backbone(model, init)
    stage = STAGES[run.stage](config, model, tokenizer, parallel)
    regions.prepare(stage.module, model.config, config.model.recomputation, config.model.compile,
                    config.data.token_budget, device)
    trained = [p for p in stage.module.parameters() if p.requires_grad]
    cuda = device.type == "cuda"  # one fused kernel over all tensors on a GPU; multi-tensor loops elsewhere
    optimizer = torch.optim.AdamW(trained, lr=schedule.lr, weight_decay=schedule.weight_decay, fused=cuda,
                                  foreach=not cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule.max_steps, schedule.warmup_ratio, schedule.warmup))
    step, epoch, position, window = 0, 0, 0, MetricWindow()
    if start is not None:
        state = checkpoint.load(start, stage.module, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        window = MetricWindow.from_state(state.get("window"))  # the steps since the last line before it
        log.info(f"resumed {run.out} at step {step} from {start}")
    stage.start(step, epoch, position)
    metrics_path = os.path.join(run.out, "metrics.jsonl")
    kept = _keep_metrics(metrics_path, step) if parallel.main and start is not None else []
    peak = peak_bf16(torch.cuda.get_device_name()) if device.type == "cuda" else None
    capture = CaptureRange(run.profile_range, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    from tqdm import tqdm
    bar = tqdm(total=schedule.max_steps, initial=step, desc=run.stage, unit="step", dynamic_ncols=True,
               disable=not parallel.main or not bars_shown())
    last, saved = kept[-1] if kept else {}, step  # a run resumed at its end returns its last logged metrics

    def save() -> str:
        trainer = dict(step=step, epoch=stage.epoch, position=stage.position, scheduler=scheduler.state_dict(),
                       world_size=parallel.size, window=window.state())
        path = checkpoint.save(run.out, step, stage.module, optimizer, trainer, keep=run.keep_checkpoints)
        log.debug(f"step {step}: checkpoint {path} saved")
        return path

    reporters = None
    profiled = min(step + 1, schedule.max_steps - 1) if run.breakdown else -1  # this process's second step
    try:
        if parallel.main:
            reporters = Reporters(run.reports, run.out, run.stage, config.to_dict(), step)
        while step < min(schedule.max_steps, stop_at if stop_at is not None else schedule.max_steps):
            capture.before(step)
            started = time.perf_counter()
            measure = (step + 1) % run.log_every == 0 or step + 1 == schedule.max_steps

            def one_step(step: int = step, measure: bool = measure):  # this step's values, bound now
                with nvtx(f"step {step}"):  # one range a step in Nsight Systems, the stage's ranges inside
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        result = stage.step(autocast, measure)
                    except NonFiniteLoss as exc:
                        good = checkpoint.find(run.out) or "none (none was saved yet)"
                        raise FloatingPointError(f"{exc} at step {step}; stopped. The last good checkpoint is "
                                                 f"{good}") from None
                    with nvtx("all-reduce"):
                        result = parallel.reduce(stage.module, result)
                    with nvtx("optimizer"):
                        grad_norm = torch.nn.utils.clip_grad_norm_(trained, schedule.grad_clip)
                        optimizer.step()
                        scheduler.step()
                return result, grad_norm

            if step == profiled:  # after a warm-up step when there is one
                found, (result, grad_norm) = breakdown.measure(one_step, stage.module, device)
                _report_breakdown(found, run.out if parallel.main else None)
            else:
                result, grad_norm = one_step()
            step += 1
            capture.after(step)
            bar.update(1)
            window.add(result)
            if measure:  # the logged losses and accuracies: means over the steps since the last line
                result = window.take(result)
            if parallel.main and measure:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                last = _metrics(run.stage, step, result, grad_norm, scheduler.get_last_lr()[0], stage.epoch,
                                time.perf_counter() - started, device, peak)
                with append_to(metrics_path) as f:
                    f.write(json.dumps(last) + "\n")
                reporters.log(last)
                log.debug(json.dumps(last))  # --verbose: each row of metrics.jsonl as it is written
                bar.set_postfix(loss=f"{result.losses['loss']:.3f}", **result.extras)
            if step % run.save_every == 0 or step == schedule.max_steps:
                save()
                saved = step
            if parallel.any(termination.requested):
                path = save() if saved != step else checkpoint.find(run.out)
                command = f"moca train --resume {resumed_as}"
                if parallel.main:
                    atomic_write(os.path.join(run.out, Preempted.MARKER),
                                 json.dumps(dict(step=step, checkpoint=path, resume=command)).encode())
                parallel.barrier()  # no rank exits (a scheduler may then stop the job) before the marker is written
                raise Preempted(f"SIGTERM: stopped after step {step} with checkpoint {path}; continue with {command}")
    finally:
        bar.close()
        stage.close()
        if reporters is not None:
            reporters.close()
    parallel.barrier()  # the last checkpoint is written before any rank moves on
    if step < schedule.max_steps or not parallel.main:  # stopped early (stop_at), or not the rank that logs
        return last
    with contextlib.suppress(FileNotFoundError):  # finished: nothing is left to requeue
        os.remove(os.path.join(run.out, Preempted.MARKER))
    plot_metrics(read_metrics(run.out), os.path.join(run.out, "loss.png"), stage.summary())
    return {**last, **stage.summary()}


def _report_breakdown(found: dict, out: str | None) -> None:
    """Log a step's breakdown (``moca.breakdown``) and write it to ``out/breakdown.json``."""
    log.info(breakdown.table(found))
    if out is not None:
        atomic_write(os.path.join(out, "breakdown.json"), json.dumps(found, indent=1).encode())


def _metrics(stage: str, step: int, result: StepResult, grad_norm, lr: float, epoch: int, seconds: float,
             device: torch.device, peak: float | None) -> dict:
    """One line of metrics.jsonl. ``seconds``: the step alone, not the logging."""
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
    row = dict(step=step, stage=stage, **{k: round(v, 6) for k, v in result.losses.items()}, **result.extras,
               grad_norm=round(float(norm), 6), lr=lr, tokens_per_s=round(result.tokens / seconds, 1), epoch=epoch)
    if result.flops is not None:
        row["model_tflops"] = round(result.flops / seconds / 1e12, 4)  # moca.model.flops: useful work only
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if peak and result.flops is not None:
            row["mfu"] = round(result.flops / seconds / peak, 4)
    return row


def stage_configs(config: Config) -> tuple[Config, Config]:
    """The two runs of ``--stage both``: stage 1 in ``out/cpt``, stage 2 in ``out/cl`` from it."""
    out = config.run.out
    first = config.update({"run.stage": "cpt", "run.out": os.path.join(out, "cpt")})
    second = config.update({"run.stage": "cl", "run.out": os.path.join(out, "cl"), "cl.init": first.run.out})
    return first, second


def finished(run_dir: str, max_steps: int) -> dict | None:
    """The last logged metrics of a run in ``run_dir`` that reached ``max_steps``, else None."""
    found = checkpoint.find(run_dir)
    if found is None or checkpoint.trainer_state(found)["step"] != max_steps:
        return None
    rows = read_metrics(run_dir)
    return rows[-1] if rows else None


def _report_scores(stage2: Config, scores: dict) -> None:
    """The evaluation's scores to the run's ``report_to`` targets, under ``eval/``: in stage 2's
    TensorBoard folder at its last step, and in its W&B run's summary."""
    if stage2.run.reports:
        reporters = Reporters(stage2.run.reports, stage2.run.out, "eval", stage2.to_dict())
        try:
            reporters.log_summary(score_row(scores, stage2.cl.max_steps))
        finally:
            reporters.close()


def _train_both(config: Config, resume: bool, force: bool) -> dict:
    """Stage 1, stage 2 from its newest checkpoint, then the evaluation of the result into
    ``out/cl/eval.json``: ``data.evaluation``, or on the embedded dataset its held-out split.
    ``resume`` skips a finished stage and continues an unfinished one."""
    parallel = strategy(config)
    with RunLock(config.run.out) if parallel.main else contextlib.nullcontext():
        if resume:
            check_resume(config.run.out, config, force)  # each stage checks its global batch too
        if parallel.main:
            config.write(config.run.out)
        results = {}
        stages = stage_configs(config)
        for stage_config in stages:
            name, out = stage_config.run.stage, stage_config.run.out
            done = finished(out, stage_config.stage(name).max_steps) if resume else None
            if done is not None:
                log.info(f"stage {name} already finished in {out}")
                results[name] = done
                continue
            log.info(f"stage {name} in {out}")
            results[name] = train(stage_config, resume=resume, force=force, resumed_as=config.run.out)
        if not parallel.main:  # the evaluation runs on rank 0
            return results
        d = config.data
        if d.evaluation is None and d.documents is None and d.pairs is None:
            files = [embedded.write_eval(os.path.join(config.run.out, "eval-data"))]
        elif d.evaluation is not None:
            files = data_files(d.evaluation, "evaluation")
        else:
            log.info("no evaluation files given (data.evaluation): the evaluation is skipped")
            files = []
        if files:
            results["eval"] = evaluate_run(stages[1].run.out, files, strict=config.run.strict)
            _report_scores(stages[1], results["eval"])
        plot_both([(c.run.stage, c.run.out, results[c.run.stage]) for c in stages], results.get("eval"),
                  os.path.join(config.run.out, "loss.png"))
        return results
