"""``loss.png``: a run's logged losses, learning rate and accuracies against the step, and for
``--stage both`` the evaluation's scores beside chance, drawn with matplotlib (Agg, no display).

``stage_series`` picks the series out of ``metrics.jsonl`` rows; ``figure`` draws them (one row
of panels per stage: the losses with the learning rate on a second axis, then the accuracy with
its chance level; then a panel of each evaluation task's main score beside its chance level);
``plot_metrics`` and ``plot_both`` write the PNG.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass, field

from .files import atomic_write, open_regular

log = logging.getLogger(__name__)

LOSSES = ("loss", "mlm_loss", "mae_loss")
ACCURACIES = ("mlm_accuracy", "accuracy")
CHANCE_KEYS = {"mlm_accuracy": "mlm_chance", "accuracy": "accuracy_chance"}  # a stage's summary() names
MAIN_SCORES = ("precision_at_1", "ndcg_at_5")  # an evaluation task's main metric, as eval.json holds it


@dataclass
class StageSeries:
    """One stage's logged series: name -> (steps, values), and the chance level of each accuracy."""
    name: str
    losses: dict[str, tuple[list[int], list[float]]]
    lr: tuple[list[int], list[float]]
    accuracies: dict[str, tuple[list[int], list[float]]]
    chance: dict[str, float] = field(default_factory=dict)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def stage_series(rows: list[dict], name: str, summary: dict | None = None) -> StageSeries:
    """The series of one stage's ``metrics.jsonl`` rows; ``summary``: the stage's summary (its
    accuracies' chance levels, ``mlm_chance`` and ``accuracy_chance``), if known."""
    summary = summary or {}
    losses = {k: s for k in LOSSES if (s := _series(rows, k))[0]}
    accuracies = {k: s for k in ACCURACIES if (s := _series(rows, k))[0]}
    chance = {k: float(summary[CHANCE_KEYS[k]]) for k in accuracies if summary.get(CHANCE_KEYS[k]) is not None}
    return StageSeries(name, losses, _series(rows, "lr"), accuracies, chance)


def evaluation_scores(result: dict) -> list[tuple[str, str, float, float]]:
    """(task, metric, score, chance) of each task of an ``eval.json`` object, by its main metric."""
    scores = []
    for task, values in result.get("tasks", {}).items():
        metric = next((m for m in MAIN_SCORES if m in values), None)
        if metric is not None and "chance" in values:
            scores.append((task, metric, float(values[metric]), float(values["chance"])))
    return scores


def figure(stages: list[StageSeries], evaluation: dict | None = None):
    """A matplotlib Figure (Agg canvas): per stage, losses with the learning rate on a second
    axis, and the accuracies beside their chance level; then the evaluation's scores, if given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    scores = evaluation_scores(evaluation or {})
    rows = len(stages) + bool(scores)
    fig = Figure(figsize=(11, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 2)
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(grid[i, 0])
        for name, (steps, values) in stage.losses.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set(title=f"{stage.name}: losses (mean since the previous line)", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        handles, labels = ax.get_legend_handles_labels()
        if stage.lr[0]:
            lr_axis = ax.twinx()
            line, = lr_axis.plot(*stage.lr, color="gray", linestyle="--", label="learning rate")
            lr_axis.set_ylabel("learning rate")
            lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            handles, labels = handles + [line], labels + ["learning rate"]
        if handles:
            ax.legend(handles, labels, loc="upper right", fontsize="small")
        acc = fig.add_subplot(grid[i, 1])
        for j, (name, (steps, values)) in enumerate(stage.accuracies.items()):
            color = f"C{j}"
            acc.plot(steps, values, color=color, marker="." if len(steps) < 30 else None, label=name)
            if name in stage.chance:
                acc.axhline(stage.chance[name], color=color, linestyle=":", label=f"chance {stage.chance[name]:.3g}")
        acc.set(title=f"{stage.name}: accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1))
        acc.grid(alpha=0.3)
        acc.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stage.accuracies:
            acc.legend(loc="upper left", fontsize="small")
    if scores:
        ax = fig.add_subplot(grid[rows - 1, :])
        places = range(len(scores))
        bars = ax.bar(places, [s[2] for s in scores], width=0.6, color="C0", label="score")
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
        ax.scatter(places, [s[3] for s in scores], marker="_", s=900, linewidths=2.5, color="C3", zorder=3,
                   label="chance")
        ax.set_xticks(list(places), [f"{s[0]}\n{s[1]}" for s in scores], fontsize="small")
        ax.set(title="evaluation: each task's score beside chance", ylabel="score", ylim=(0, 1.05))
        ax.legend(loc="upper right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    return fig


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (none when it is absent). A line that is not a row (an
    object with an integer ``step``, its other values numbers, ``stage`` a name), such as the last
    one torn by a crash in the middle of its write, is passed over."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.lexists(path):
        return []
    rows = []
    with open_regular(path, "metrics", "r", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and type(row.get("step")) is int and isinstance(row.get("stage", ""), str) and all(
                    v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                    for k, v in row.items() if k != "stage"):
                rows.append(row)
    return rows


def _can_draw(path: str) -> bool:
    """Whether matplotlib is importable; a run that finished is not failed for want of its plot
    (an install made with ``--no-deps`` can lack it): a warning says what to install."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning(f"{path} not drawn: matplotlib is not installed (pip install matplotlib)")
        return False
    return True


def _save(fig, path: str) -> None:
    """``fig`` as a PNG at ``path``, written as every output is (``atomic_write``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())


def plot_metrics(metrics: list[dict], path: str, summary: dict | None = None) -> None:
    """``path`` (a PNG): one stage's logged rows; ``summary``: its chance levels, if known."""
    if metrics and _can_draw(path):
        _save(figure([stage_series(metrics, str(metrics[0].get("stage", "")), summary)]), path)


def plot_both(stages: list[tuple[str, str, dict | None]], evaluation: dict | None, path: str) -> None:
    """``path``: the stages of a ``--stage both`` run ((name, run directory, summary) each) and
    its evaluation (an ``eval.json`` object, or None)."""
    if _can_draw(path):
        series = [stage_series(read_metrics(run_dir), name, summary) for name, run_dir, summary in stages]
        _save(figure(series, evaluation), path)
