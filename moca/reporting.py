"""Where a run's logged numbers go besides ``metrics.jsonl``: TensorBoard event files and Weights &
Biases (``run.report_to``), each fed the same row as ``metrics.jsonl``; and the window of steps
whose mean each logged loss and accuracy is.

One optimizer step's loss is a noisy sample (one batch), so a logged line that showed only the
logging step's values would zig-zag from line to line. ``MetricWindow`` keeps the sums of every
step's losses and accuracies since the last line instead, and is saved with each checkpoint, so a
resumed run logs the same means as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING

from .files import atomic_write, read_bounded

if TYPE_CHECKING:  # the step's result type only: this module loads without torch
    from .parallel import StepResult


def check_available(targets: Sequence[str]) -> None:
    """ValueError saying what to install for each target whose package is missing (checked before
    a run builds its model, so that a missing package does not cost a model load)."""
    for target in targets:
        if importlib.util.find_spec(target) is None:
            raise _missing(target, ImportError(f"no module named {target!r}"))


def _averaged(name: str) -> bool:
    """Extras that are per-step samples (averaged over the window); the others (the learned
    temperature) are states, logged as they are at the logging step."""
    return name.endswith("accuracy")


class MetricWindow:
    """Sums and counts of each loss and accuracy over the steps since the last logged line. A
    value that a step did not measure (None, or absent) does not count for that name."""

    def __init__(self, sums: dict[str, float] | None = None, counts: dict[str, int] | None = None):
        self.sums, self.counts = dict(sums or {}), dict(counts or {})

    def add(self, result: StepResult) -> None:
        values = {**result.losses, **{k: v for k, v in result.extras.items() if _averaged(k)}}
        for name, value in values.items():
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def take(self, result: StepResult) -> StepResult:
        """``result`` (the logging step's) with each loss and accuracy replaced by its mean over the
        window, rounded to 6 digits; the window starts again empty."""
        means = {k: round(v, 6) for k, v in self.means().items()}
        losses = {k: means.get(k, v) for k, v in result.losses.items()}
        extras = {k: means.get(k, v) if _averaged(k) else v for k, v in result.extras.items()}
        extras.update({k: v for k, v in means.items() if _averaged(k) and k not in extras})
        self.sums, self.counts = {}, {}
        return dataclasses.replace(result, losses=losses, extras=extras)

    def state(self) -> dict:
        """JSON values for the checkpoint's trainer state."""
        return dict(sums=self.sums, counts=self.counts)

    @classmethod
    def from_state(cls, state: dict | None) -> MetricWindow:
        return cls(**(state or {}))


def _numbers(row: dict) -> dict[str, float]:
    """The row's numeric values (not the step itself, the stage's name, or booleans)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, Real) and not isinstance(v, bool)}


def _missing(target: str, error: ImportError) -> ValueError:
    return ValueError(f"run.report_to={target} needs the {target} package ({error}): pip install "
                      f"'moca-kernels[{target}]', or drop {target} from run.report_to")


def score_row(scores: dict, step: int) -> dict:
    """An evaluation's scores (``moca.eval.evaluate``'s result) as one row for ``Reporters.log_summary``:
    each overall metric by its name, each task's as ``task/metric``; chance levels and counts left
    out (they are in eval.json)."""
    def measured(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "n" and not k.startswith("chance")}
    row = {"step": step, **measured(scores["overall"])}
    for task, metrics in scores["tasks"].items():
        row.update({f"{task}/{k}": v for k, v in measured(metrics).items()})
    return row


class Reporters:
    """The run's ``report_to`` targets, open on ``out`` (the run directory) for ``stage``.
    ``start``: the step the run starts from; TensorBoard hides the events a stopped run logged
    after it (they are logged again). ``config``: the run's settings, shown by W&B."""

    def __init__(self, targets: Sequence[str], out: str, stage: str, config: dict, start: int = 0):
        self.stage, self.writer, self.wandb_run = stage, None, None
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise _missing("tensorboard", exc) from None
            self.writer = SummaryWriter(log_dir=os.path.join(out, "tensorboard"), purge_step=start or None)
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise _missing("wandb", exc) from None
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "moca"), dir=out,
                                        id=_wandb_id(out), resume="allow", job_type=stage,
                                        name=os.path.basename(os.path.abspath(out)), config=config)

    def log(self, row: dict) -> None:
        """One ``metrics.jsonl`` row: each number under ``stage/name`` at the row's step."""
        named, step = self._named(row)
        if self.wandb_run is not None:
            self.wandb_run.log(named, step=step)

    def log_summary(self, row: dict) -> None:
        """Numbers that describe the whole run (the evaluation's scores) under ``stage/name``:
        TensorBoard scalars at the row's step; in W&B the run's summary, which a resumed run's
        step counter cannot reject."""
        named, _ = self._named(row)
        if self.wandb_run is not None:
            self.wandb_run.summary.update(named)

    def _named(self, row: dict) -> tuple[dict[str, float], int]:
        """(the row's numbers under ``stage/name``, its step), already written to TensorBoard."""
        named, step = {f"{self.stage}/{k}": v for k, v in _numbers(row).items()}, int(row["step"])
        if self.writer is not None:
            for name, value in named.items():
                self.writer.add_scalar(name, value, global_step=step)
            self.writer.flush()
        return named, step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.writer = self.wandb_run = None


def _wandb_id(out: str) -> str:
    """The W&B run id of the run in ``out``, kept in ``out/wandb-id`` so that a resumed run
    continues the same W&B run."""
    path = os.path.join(out, "wandb-id")
    if os.path.lexists(path):
        return read_bounded(path, "W&B run id", 1024).strip()
    run_id = secrets.token_hex(4)  # W&B's ids: lowercase letters and digits
    atomic_write(path, (run_id + "\n").encode())
    return run_id
