"""The logged metrics: each loss and accuracy is the mean over the steps since the previous line,
TensorBoard and W&B receive the same rows as metrics.jsonl, and loss.png draws them."""
import glob
import json
import os
import random
import time

import pytest
from PIL import Image

from moca import plot
from moca.config import Config, report_targets
from moca.parallel import StepResult
from moca.reporting import MetricWindow, Reporters
from moca.stages import CptStage
from moca.train import train


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _colors(image) -> int:
    return len(image.convert("RGB").getcolors(maxcolors=1 << 24))


def test_report_to_setting():
    assert report_targets(None) == report_targets("none") == report_targets("") == ()
    assert report_targets(" TensorBoard , wandb,tensorboard") == ("tensorboard", "wandb")
    assert Config().update({"report_to": "tensorboard,wandb"}).validate().run.report_to == "tensorboard,wandb"
    assert Config().update({"run.report_to": ["wandb", "tensorboard"]}).run.report_to == "wandb,tensorboard"  # TOML
    assert Config().update({"report_to": "none"}).run.report_to is None
    with pytest.raises(ValueError, match="run.report_to: unknown target.*mlflow"):
        Config().update({"report_to": "tensorboard,mlflow"}).validate()


def _result(rng: random.Random, accuracy: bool) -> StepResult:
    extras = dict(temperature=rng.random())
    if accuracy:
        extras["accuracy"] = rng.random()
    return StepResult(dict(loss=rng.random() * 5, mlm_loss=rng.random()), tokens=rng.randint(1, 99), extras=extras)


def test_window_takes_means_and_survives_a_checkpoint():
    rng = random.Random(0)
    results = [_result(rng, accuracy=i % 2 == 0) for i in range(7)]
    window = MetricWindow()
    for result in results[:3]:
        window.add(result)
    logged = window.take(results[2])
    assert logged.losses["loss"] == pytest.approx(sum(r.losses["loss"] for r in results[:3]) / 3, abs=1e-6)
    assert logged.losses["mlm_loss"] == pytest.approx(sum(r.losses["mlm_loss"] for r in results[:3]) / 3, abs=1e-6)
    # an accuracy over the steps that measured it (0 and 2); the temperature (a state) as it is now
    assert logged.extras["accuracy"] == pytest.approx((results[0].extras["accuracy"] + results[2].extras["accuracy"])
                                                      / 2, abs=1e-6)
    assert logged.extras["temperature"] == results[2].extras["temperature"]
    assert logged.tokens == results[2].tokens and window.means() == {}
    # a window saved in a checkpoint (JSON) halfway and restored logs what the unbroken one logs
    whole = MetricWindow()
    for result in results[3:5]:
        window.add(result)
        whole.add(result)
    restored = MetricWindow.from_state(json.loads(json.dumps(window.state())))
    for result in results[5:]:
        restored.add(result)
        whole.add(result)
    assert restored.take(results[-1]) == whole.take(results[-1])


def test_logged_rows_are_means_reach_tensorboard_and_are_plotted(tmp_path, monkeypatch):
    per_step = []
    original = CptStage.step

    def recording(self, autocast, measure):
        result = original(self, autocast, measure)
        per_step.append(result)
        return result

    monkeypatch.setattr(CptStage, "step", recording)
    run = tmp_path / "run"
    train(Config().update({"run.stage": "cpt", "out": str(run), "cpt.max_steps": 4, "log_every": 3,
                           "save_every": 4, "token_budget": 512, "report_to": "tensorboard"}))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [3, 4] and len(per_step) == 4
    assert len({r.losses["loss"] for r in per_step}) == 4  # the steps differ: a mean is not the last value
    for row, (first, last) in zip(rows, [(0, 3), (3, 4)]):
        for key in ("loss", "mlm_loss", "mae_loss"):
            mean = sum(r.losses[key] for r in per_step[first:last]) / (last - first)
            assert row[key] == pytest.approx(mean, abs=2e-6), (row["step"], key)
        # the MLM accuracy costs an LM-head product: measured on the logging step's micro-batches
        assert row["mlm_accuracy"] == pytest.approx(per_step[last - 1].extras["mlm_accuracy"], abs=2e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "mlm_loss", "mae_loss", "mlm_accuracy", "lr", "grad_norm", "tokens_per_s"):
        scalars = events.Scalars(f"cpt/{key}")
        assert [s.step for s in scalars] == [3, 4], key
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32

    with Image.open(run / "loss.png") as image:
        assert image.size[0] > 800 and _colors(image) > 50  # drawn, not blank


def test_missing_reporter_package_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"report_to=wandb needs the wandb package.*moca-kernels\[wandb\]"):
        train(Config().update({"run.stage": "cpt", "out": str(tmp_path / "run"), "report_to": "wandb"}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _wandb_records(path: str, wanted: str) -> list[dict]:
    """The ``wanted`` records (history rows, or summary updates) of an offline W&B run file: a
    7-byte file header, then records in LevelDB's log framing (32 KiB blocks; each chunk:
    checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last), each a protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    position, block, pending, found = 7, 1 << 15, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == wanted:
                items = record.history.item if wanted == "history" else record.summary.update
                found.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in items})  # "a/b" keys come nested
    return found


def test_wandb_offline_gets_the_rows_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    rows = [dict(step=2, stage="cl", loss=1.5, accuracy=0.25, temperature=0.03, lr=1e-3),
            dict(step=4, stage="cl", loss=1.25, accuracy=0.5, temperature=0.03, lr=5e-4)]
    reporters = Reporters(["wandb"], out, "cl", {"run": {"stage": "cl"}})
    run_id = reporters.wandb_run.id
    assert reporters.wandb_run.config["run"] == {"stage": "cl"}
    for row in rows:
        reporters.log(row)
    reporters.close()
    assert wandb.run is None
    pattern = os.path.join(out, "wandb", "offline-run-*", f"run-{run_id}.wandb")
    history, waited = [], 0.0
    while len(history) < len(rows) and waited < 30:  # wandb's service process may still be writing the file
        time.sleep(0.5 if waited else 0)
        waited += 0.5
        history = _wandb_records(glob.glob(pattern)[0], "history") if glob.glob(pattern) else []
    assert [{k: v for k, v in h.items() if not k.startswith("_")} for h in history] == [
        {f"cl/{k}": v for k, v in row.items() if k not in ("step", "stage")} for row in rows]
    assert [h["_step"] for h in history] == [2, 4]
    again = Reporters(["wandb"], out, "cl", {}, start=4)
    assert again.wandb_run.id == run_id  # the resumed run continues the same W&B run
    again.close()


def test_the_evaluation_reaches_tensorboard_and_the_wandb_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from moca import cli
    from moca.data import embedded
    folder = tmp_path / "user"
    documents = embedded.write(str(folder / "cpt"), documents=16)
    pairs = embedded.write_pairs(str(folder / "pairs"), pairs=16)
    evaluation = embedded.write_eval(str(folder / "eval"), queries=6)
    run = tmp_path / "run"
    assert cli.main(["train", "--stage", "both", "--data", documents, f"pairs={pairs}", f"evaluation={evaluation}",
                     "--out", str(run), "--max-steps", "2", "pairs_per_batch=4", "log_every=1",
                     "report_to=tensorboard,wandb"]) == 0
    scores = json.loads((run / "cl" / "eval.json").read_text())
    expected = {"eval/ndcg_at_5": scores["overall"]["ndcg_at_5"],
                "eval/retrieval/recall_at_1": scores["tasks"]["retrieval"]["recall_at_1"],
                "eval/text-to-image/precision_at_1": scores["tasks"]["text-to-image"]["precision_at_1"]}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "cl" / "tensorboard"))
    events.Reload()
    assert "eval/n" not in events.Tags()["scalars"] and "eval/chance" not in events.Tags()["scalars"]
    for tag, value in expected.items():
        assert [(s.step, s.value) for s in events.Scalars(tag)] == [(2, pytest.approx(value, rel=1e-6))], tag

    files = glob.glob(os.path.join(run, "cl", "wandb", "offline-run-*", "run-*.wandb"))  # training's, evaluation's
    summary, waited = {}, 0.0
    while not set(expected) <= set(summary) and waited < 30:  # wandb's service process may still be writing
        time.sleep(0.5 if waited else 0)
        waited += 0.5
        summary = {k: v for file in files for update in _wandb_records(file, "summary") for k, v in update.items()}
    assert {k: summary.get(k) for k in expected} == expected


def _cpt_rows(steps):
    rng = random.Random(1)
    return [dict(step=s, stage="cpt", loss=rng.random() * 4, mlm_loss=rng.random(), mae_loss=rng.random(),
                 mlm_accuracy=rng.random(), lr=1e-3 * s, grad_norm=1.0) for s in steps]


def test_plot_draws_the_series_it_is_given(tmp_path):
    cpt = _cpt_rows([5, 10, 15])
    cl = [dict(step=s, stage="cl", loss=2.0 / s, accuracy=0.1 * s, temperature=0.03, lr=1e-4) for s in (1, 2, 3)]
    evaluation = {"tasks": {"mmeb_like": {"precision_at_1": 0.6, "chance": 0.25, "n": 8},
                            "retrieval": {"recall_at_1": 0.5, "ndcg_at_5": 0.7, "chance": 0.1, "n": 8}}}
    series = [plot.stage_series(cpt, "cpt", {"mlm_chance": 0.01}),
              plot.stage_series(cl, "cl", {"accuracy_chance": 0.2})]
    assert series[0].losses["mae_loss"] == ([5, 10, 15], [r["mae_loss"] for r in cpt])
    assert series[0].lr == ([5, 10, 15], [0.005, 0.01, 0.015]) and series[0].chance == {"mlm_accuracy": 0.01}
    assert list(series[1].losses) == ["loss"] and series[1].accuracies["accuracy"][1] == pytest.approx([0.1, 0.2, 0.3])
    fig = plot.figure(series, evaluation)
    lines = {(ax.get_title().split(":")[0], line.get_label()): line for ax in fig.axes for line in ax.get_lines()}
    for key in ("loss", "mlm_loss", "mae_loss"):
        assert list(lines[("cpt", key)].get_xdata()) == [5, 10, 15]
        assert list(lines[("cpt", key)].get_ydata()) == [r[key] for r in cpt]
    assert list(lines[("cl", "accuracy")].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert list(lines[("cl", "chance 0.2")].get_ydata()) == [0.2, 0.2]  # the chance level as a line
    learning_rates = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "learning rate"]
    assert [list(line.get_ydata()) for line in learning_rates] == [[0.005, 0.01, 0.015], [1e-4] * 3]
    scores = next(ax for ax in fig.axes if ax.get_title().startswith("evaluation"))
    assert [bar.get_height() for bar in scores.patches] == [0.6, 0.7]
    assert [list(p) for p in scores.collections[0].get_offsets()] == [[0, 0.25], [1, 0.1]]
    for folder, rows in (("cpt", cpt), ("cl", cl)):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.plot_both([("cpt", str(tmp_path / "cpt"), None), ("cl", str(tmp_path / "cl"), None)], evaluation,
                   str(tmp_path / "loss.png"))
    with Image.open(tmp_path / "loss.png") as image:
        assert image.size[1] > image.size[0] / 2 and _colors(image) > 50
