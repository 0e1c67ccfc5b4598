"""The paper's ablation as a command: which part of MoCa does the held-out score owe to?

Rows, each trained and evaluated once per seed (``run.seed`` 0, 1, ...), from the same settings:

- ``cl``: stage 2 alone (bidirectional attention, mean pooling);
- ``cl-causal``: stage 2 alone with causal attention and last-token pooling (stock Qwen);
- ``mlm+cl``, ``mae+cl``, ``cpt+cl``: stage 1 with MLM only, MAE only, or both, then stage 2 from it.

Every row of the paper starts from the same pre-trained causal model (Qwen2.5-VL). On the tiny
preset, which has random weights, the ablation first makes one: ``out/base``, a run of causal
next-token prediction on stage-1 documents of its own draw (``BASE``), and every row starts from it
(``model.init``). With ``--model`` or ``model.init`` given, the rows start from that instead.

Every row and every seed trains on the same data (on the embedded dataset, ``data.embedded_seed``'s
draw) and is scored on the same evaluation files: seeds differ in training alone (batch order,
masks, newly initialized parts), as a paper's runs on one dataset do, so that the spread across
seeds is the training's. ``out/ablation.json`` holds
``{"rows": {row: {metric: {"mean", "std", "values"}}}, "chance": {metric: value}, ...}``, with the
metrics of ``eval.json``'s ``overall``, and under ``"against_cl"`` each row's difference from
``cl`` beside the spread (``against``); ``ablation.md`` the tables and ``ablation.png`` the main
metrics per row. On the embedded data, each row whose stage 1 has MLM is also probed for whether it
learned to read the pictures (``moca.probe.picture_reading``: masked color, shape and background
words with the pictures and with noise), under ``"reading"`` in ``ablation.json`` and as a second
table. A run whose ``eval.json`` exists is not trained again (if its settings are the row's) and an
unfinished one is resumed, so an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import io
import json
import logging
import os
import statistics

from .config import Config
from .data import embedded
from .eval import evaluate_run
from .files import atomic_write, data_files, read_json
from .logs import own_lines_only
from .probe import picture_reading
from .train import finished, train

log = logging.getLogger(__name__)

ROWS: dict[str, dict] = {
    "cl": {"run.stage": "cl"},
    "cl-causal": {"run.stage": "cl", "cl.attention": "causal", "cl.pooling": "last"},
    "mlm+cl": {"run.stage": "both", "cpt.use_mae": False},
    "mae+cl": {"run.stage": "both", "cpt.use_mlm": False},
    "cpt+cl": {"run.stage": "both"},
}
# the plot's metrics: MMEB's and ViDoRe's over each query's own candidates, and Recall@1 over the
# task's whole pool (moca.eval.pool_metrics), the harder reading
SHOWN = ("precision_at_1", "ndcg_at_5", "pool_recall_at_1")
# the tiny base: as many steps as stage 1, at a pre-training learning rate (10x the tiny recipe's
# stage 1), on documents of its own (the rows train on data.embedded_seed's, 0 by default)
BASE = {"run.stage": "cpt", "cpt.objective": "next-token", "cpt.lr": 3e-3, "run.seed": 10_000,
        "data.embedded_seed": 10_000}
NOT_IN_BASE = ("run.out:", "cl.", "cpt.use_", "cpt.mlm_", "cpt.mae_")  # settings a next-token run does not read


def _scores(path: str) -> dict:
    """An ``eval.json`` that a row's run wrote (ValueError naming it when it is not one)."""
    scores = read_json(path, "evaluation scores")
    if not isinstance(scores, dict):
        raise ValueError(f"{path}: not an evaluation's scores")
    return scores


def _other_settings(out: str, config: Config, ignored: tuple[str, ...] = ("run.out:",)) -> str:
    """The result-changing settings in which the run saved in ``out`` differs from ``config``
    (``Config.result_differences``, less those starting with one of ``ignored``), joined for a
    message; empty when there are none."""
    return "; ".join(d for d in Config.read(out).result_differences(config) if not d.startswith(ignored))


def pretrain_base(config: Config) -> str:
    """Train (or reuse, or resume) the causal base that ``config``'s rows start from, in
    ``config.run.out``; returns that folder."""
    out = config.run.out
    if os.path.isfile(os.path.join(out, "config.json")):
        changed = _other_settings(out, config, NOT_IN_BASE)
        if changed:
            raise ValueError(f"{out} holds a base trained with other settings ({changed}): choose another --out")
        if finished(out, config.cpt.max_steps) is not None:
            log.info(f"{out}: base already trained")
            return out
    log.info(f"ablation: the causal base every row starts from -> {out}")
    with own_lines_only(__name__):  # the base's own lines are not the ablation's
        train(config, resume=os.path.isfile(os.path.join(out, "config.json")))
    return out


def run_row(config: Config) -> dict:
    """Train one row's run (``config.run.stage`` cl or both) and evaluate it on ``data.evaluation``,
    or on the embedded held-out split; returns ``eval.json``'s content."""
    out = config.run.out
    scored = os.path.join(out, "cl", "eval.json") if config.run.stage == "both" else os.path.join(out, "eval.json")
    if os.path.isfile(scored):
        changed = _other_settings(out, config)
        if changed:
            raise ValueError(f"{out} was evaluated with other settings ({changed}): choose another --out")
        log.info(f"{out}: already evaluated")
        return _scores(scored)
    train(config, resume=os.path.isfile(os.path.join(out, "config.json")))  # an interrupted run continues
    if config.run.stage == "both":
        return _scores(scored)
    d = config.data
    files = data_files(d.evaluation, "evaluation") if d.evaluation else \
        [embedded.write_eval(os.path.join(out, "eval-data"))]
    return evaluate_run(out, files, strict=config.run.strict)


def ablate(base: Config, out: str, seeds: int = 5, rows: list[str] | None = None) -> dict:
    """Every row of ``ROWS`` (or ``rows``) over ``seeds`` seeds from ``base``'s settings, in
    ``out/ROW/seed-N``; writes and returns ``ablation.json``'s content."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    names = rows or list(ROWS)
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    d = base.data
    if (d.documents or d.pairs) and not (d.documents and d.pairs and d.evaluation):
        raise ValueError("on your own data the ablation needs all three: --data DOCUMENTS, pairs=PAIRS and "
                         "evaluation=EVAL")
    if base.model.path is None and base.model.init is None:
        start = base.update({**BASE, "run.out": os.path.join(out, "base")}).validate()
        base = base.update({"model.init": pretrain_base(start)})
    scores: dict[str, list[dict]] = {name: [] for name in names}
    reading: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for name in names:
            config = base.update({**ROWS[name], "run.seed": seed,
                                  "run.out": os.path.join(out, name, f"seed-{seed}")}).validate()
            log.info(f"ablation: {name}, seed {seed} -> {config.run.out}")
            with own_lines_only(__name__):  # the rows' runs show no lines of their own
                scores[name].append(run_row(config)["overall"])
                if config.run.stage == "both" and config.cpt.use_mlm and not d.documents:
                    reading.setdefault(name, []).append(
                        picture_reading(os.path.join(config.run.out, "cpt"), seed=seed))
    result = summarize(scores)
    if "cl" in scores and len(scores) > 1:
        result["against_cl"] = against(result["rows"], "cl")
    if reading:
        result["reading"] = summarize_reading(reading)
    result["settings"] = base.to_dict()
    atomic_write(os.path.join(out, "ablation.json"), json.dumps(result, indent=1).encode())
    atomic_write(os.path.join(out, "ablation.md"), (table(result) + "\n").encode())
    plot(result, os.path.join(out, "ablation.png"))
    return result


def summarize(scores: dict[str, list[dict]]) -> dict:
    """``{"rows": {row: {metric: {"mean", "std", "values"}}}, "chance": {metric: value}, "seeds": n}``
    from each row's ``overall`` scores per seed (``std``: the sample standard deviation across
    seeds, 0 for one seed)."""
    rows, chance = {}, {}
    for name, per_seed in scores.items():
        metrics = [k for k in per_seed[0] if k != "n" and not k.startswith("chance")]
        rows[name] = {}
        for metric in metrics:
            rows[name][metric] = _spread([s[metric] for s in per_seed])
        chance.update({k.removeprefix("chance_"): v for k, v in per_seed[0].items() if k.startswith("chance_")})
    return dict(rows=rows, chance=chance, seeds=len(next(iter(scores.values()))))


def against(rows: dict, baseline: str) -> dict:
    """``{row: {metric: {"difference", "spread", "beyond"}}}`` for every row but ``baseline`` and the
    metrics of ``SHOWN``: the difference of the means (row minus baseline), the larger of the two
    rows' standard deviations, and whether the difference exceeds it (the paper's claim for
    ``cpt+cl`` against ``cl``: better by more than the spread across seeds)."""
    out = {}
    for name, row in rows.items():
        if name == baseline:
            continue
        out[name] = {}
        for metric in (m for m in SHOWN if m in row):
            difference = round(row[metric]["mean"] - rows[baseline][metric]["mean"], 4)
            spread = max(row[metric]["std"], rows[baseline][metric]["std"])
            out[name][metric] = dict(difference=difference, spread=spread, beyond=difference > spread)
    return out


def _spread(values: list[float]) -> dict:
    """``{"mean", "std", "values"}`` of one metric over the seeds (``std``: the sample standard
    deviation, 0 for one seed)."""
    return dict(mean=round(statistics.fmean(values), 4),
                std=round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, values=values)


def summarize_reading(probes: dict[str, list[dict]]) -> dict:
    """``{row: {class: {"pictures": {"mean", "std", "values"}, "noise": ..., "chance"}}}`` from each
    row's ``picture_reading`` per seed."""
    out = {}
    for name, per_seed in probes.items():
        out[name] = {}
        for cls, first in per_seed[0].items():
            out[name][cls] = {"chance": first["chance"]}
            for shown in ("pictures", "noise"):
                out[name][cls][shown] = _spread([p[cls][shown] for p in per_seed])
    return out


def _markdown(columns: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """A markdown table's lines: a ``row`` column of names, then ``columns``, one line per (name, cells)."""
    return ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"] + \
        [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]


def table(result: dict) -> str:
    """The markdown table: one row per ablation row, each metric as mean ± std over the seeds; then
    each row against ``cl`` and the picture-reading probe, where ``result`` has them."""
    metrics = list(next(iter(result["rows"].values())))
    rows = [(name, [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in metrics])
            for name, row in result["rows"].items()]
    rows.append(("chance", [f"{result['chance'][m]:.3f}" if m in result["chance"] else "" for m in metrics]))
    text = "\n".join(_markdown(metrics, rows))
    text += f"\n\n{result['seeds']} seed(s) a row; mean ± sample standard deviation across seeds."
    if result.get("against_cl"):
        shown = list(next(iter(result["against_cl"].values())))
        rows = [(name, [f"{row[m]['difference']:+.3f} ({'more' if row[m]['beyond'] else 'not more'} than "
                        f"{row[m]['spread']:.3f})" for m in shown]) for name, row in result["against_cl"].items()]
        lines = ["", "Against stage 2 alone: each row's mean minus cl's, beside the larger of the two standard "
                 "deviations:", ""] + _markdown(shown, rows)
        text += "\n" + "\n".join(lines)
    if result.get("reading"):
        first = next(iter(result["reading"].values()))
        classes = list(first)
        rows = [(name, [f"{row[c]['pictures']['mean']:.3f} / {row[c]['noise']['mean']:.3f}" for c in classes])
                for name, row in result["reading"].items()]
        rows.append(("chance", [f"{first[c]['chance']:.3f}" for c in classes]))
        lines = ["", "Does stage 1 read the pictures? Masked-word accuracy on new documents, with the pictures / with "
                 "noise instead (moca.probe):", ""] + _markdown(classes, rows)
        text += "\n" + "\n".join(lines)
    return text


def plot(result: dict, path: str) -> None:
    """Bars of ``SHOWN`` per row, each with its seeds' values as dots and the chance level as a
    line (drawn with Pillow)."""
    from PIL import Image, ImageDraw
    rows = result["rows"]
    shown = [m for m in SHOWN if m in next(iter(rows.values()))]
    step = 40 * len(shown) + 40  # a row's bars and the gap after them
    width, height, pad, top = 160 + step * len(rows), 360, 40, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    base_y, scale = height - pad, height - pad - top - 20
    for level in (0.0, 0.5, 1.0):  # the scale: scores lie in [0, 1]
        draw.line([(pad, base_y - level * scale), (width - 10, base_y - level * scale)], fill="lightgray")
        draw.text((4, base_y - level * scale - 6), f"{level:.1f}", fill="gray")
    colors = ("steelblue", "darkorange", "seagreen")
    for r, (name, row) in enumerate(rows.items()):
        x0 = pad + 20 + r * step
        for k, metric in enumerate(shown):
            x = x0 + k * 40
            mean = row[metric]["mean"]
            draw.rectangle((x, base_y - mean * scale, x + 30, base_y), fill=colors[k % len(colors)])
            for v in row[metric]["values"]:
                draw.ellipse((x + 13, base_y - v * scale - 2, x + 17, base_y - v * scale + 2), fill="black")
            if metric in result["chance"]:
                y = base_y - result["chance"][metric] * scale
                draw.line([(x - 2, y), (x + 32, y)], fill="red", width=1)
        draw.text((x0, base_y + 8), name, fill="black")
    for k, metric in enumerate(shown):
        draw.text((pad, 4 + 12 * k), f"{metric} (bar: mean, dots: seeds, red line: chance)",
                  fill=colors[k % len(colors)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
