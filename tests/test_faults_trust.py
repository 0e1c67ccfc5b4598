"""Trust under attack and under faults, end to end on the tiny model: a crafted checkpoint runs no
code through any entry point, every kind of run resumes to the uninterrupted run's metrics, no
recoverable checkpoint is deleted, and only finite state is saved."""
import json
import os
import re
import shutil

import pytest
from payloads import crafted_payloads

from moca import checkpoint, cli
from moca.config import Config
from moca.data import embedded
from moca.encoder import Encoder
from moca.files import append_to
from moca.train import train

TIMED = ("tokens_per_s", "model_tflops")
WORDS = ["red", "blue", "circle", "square", "big", "small", "the", "a", "on", "green"]


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _text(i: int, n: int = 30) -> str:
    return " ".join(WORDS[(i * 7 + j * 3 + j * j) % len(WORDS)] for j in range(n))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, str]:
    """Text-only stage-1 documents and stage-2 pairs."""
    folder = tmp_path_factory.mktemp("text")
    documents, pairs = folder / "documents.jsonl", folder / "pairs.jsonl"
    documents.write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(120)))
    pairs.write_text("".join(json.dumps({"query": {"text": _text(i, 8)}, "positive": {"text": _text(i + 1, 12)},
                                         "negatives": [{"text": _text(i + 50, 12)}], "task": f"t{i % 3}"}) + "\n"
                             for i in range(48)))
    return {"documents": str(documents), "pairs": str(pairs)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A finished two-step stage-1 run."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert cli.main(["train", "--stage", "cpt", "--out", out, "--max-steps", "2", "token_budget=512",
                     "prefetch=0"]) == 0
    return out


def _craft(run_dir: str, payload: bytes) -> None:
    """The newest checkpoint's .metadata replaced by ``payload``, its manifest's sizes and CRCs
    made to match (as an attacker who rewrites the whole folder would)."""
    path = checkpoint.find(run_dir) or checkpoint.checkpoints(run_dir)[-1]
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(payload)
    with open(os.path.join(path, checkpoint.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"] = checkpoint._files(path)
    with open(os.path.join(path, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert checkpoint.damage(path) is None


def test_a_crafted_checkpoint_runs_no_code_through_any_entry_point(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    evaluation = embedded.write_eval(str(tmp_path / "eval"), queries=8)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": "a red circle"}) + "\n")
    payloads = crafted_payloads(marker)
    for what in ("os.system, protocol 2", "dotted os.system (STACK_GLOBAL)", "format_utils helper"):
        crafted = str(tmp_path / "crafted")
        shutil.rmtree(crafted, ignore_errors=True)
        shutil.copytree(run, crafted)
        _craft(crafted, payloads[what])
        entry_points = {
            "train --resume": ["train", "--resume", crafted],
            "train --init": ["train", "--stage", "cl", "--init", crafted, "--out", str(tmp_path / "cl"),
                             "--max-steps", "1", "prefetch=0"],
            "eval": ["eval", "--model", crafted, "--data", evaluation, "--out", str(tmp_path / "scores")],
            "encode": ["encode", "--model", crafted, "--input", str(inputs), "--output", str(tmp_path / "v.npy")],
        }
        for name, argv in entry_points.items():
            capsys.readouterr()
            assert cli.main(argv) == 2, (what, name)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and ".metadata: not a checkpoint's metadata (it names" in err[0], (what, name, err)
        with pytest.raises(ValueError, match="which a checkpoint never holds"):
            Encoder.from_pretrained(crafted)
        assert not marker.exists(), what
    assert not (tmp_path / "v.npy").exists() and not (tmp_path / "scores").exists()


def _cpt(out, settings: dict) -> Config:
    return Config().update({"run.stage": "cpt", "out": str(out), "cpt.max_steps": 4, "save_every": 2, "log_every": 1,
                            "token_budget": 512, "prefetch": 0, **settings})


def _cl(out, settings: dict) -> Config:
    return Config().update({"run.stage": "cl", "out": str(out), "cl.max_steps": 4, "save_every": 2, "log_every": 1,
                            "token_budget": 512, "pairs_per_batch": 8, "prefetch": 0, **settings})


# Every kind of run a setting can make, each with parameters that never get a gradient somewhere:
# text alone (the vision tower), no masked image tokens or no MAE (the MAE decoder), the ablation's
# rows and its next-token base.
KINDS = {
    "stage 1, text only": (_cpt, {"data.documents": "documents"}),
    "stage 1, mae_ratio=0": (_cpt, {"cpt.mae_ratio": 0}),
    "stage 1, mlm_ratio=0": (_cpt, {"cpt.mlm_ratio": 0}),
    "stage 1, mlm+cl row (no MAE)": (_cpt, {"cpt.use_mae": False}),
    "stage 1, mae+cl row (no MLM)": (_cpt, {"cpt.use_mlm": False}),
    "stage 1, the ablation's next-token base": (_cpt, {"cpt.objective": "next-token"}),
    "stage 2, text only": (_cl, {"data.pairs": "pairs"}),
    "stage 2, cl-causal row": (_cl, {"cl.attention": "causal", "cl.pooling": "last"}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_run_resumes_to_the_uninterrupted_metrics(kind, text_data, tmp_path):
    make, settings = KINDS[kind]
    settings = {k: text_data.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    train(make(tmp_path / "whole", settings))
    train(make(tmp_path / "cut", settings), stop_at=3)  # killed after step 3: resumes from 2
    assert cli.main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3, 4]
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")


def test_no_sound_checkpoint_refuses_to_start_over_and_force_sets_them_aside(tmp_path, capsys):
    out = str(tmp_path / "run")
    train(_cpt(out, {}))
    steps = checkpoint.checkpoints(out)
    assert [os.path.basename(p) for p in steps] == ["step-0000002", "step-0000004"]
    for path in steps:  # every manifest gone: the shards are intact, the checkpoints could be recovered
        os.remove(os.path.join(path, checkpoint.MANIFEST))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = f.read()
    capsys.readouterr()
    assert cli.main(["train", "--resume", out]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint passes its check" in err and all(p in err for p in steps) and "--force" in err
    assert checkpoint.checkpoints(out) == steps and all(os.listdir(p) for p in steps)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == metrics
    assert cli.main(["train", "--resume", out, "--force"]) == 0
    aside = os.path.join(out, "set-aside")
    (moved,) = os.listdir(aside)
    assert sorted(os.listdir(os.path.join(aside, moved))) == ["metrics.jsonl", "step-0000002", "step-0000004"]
    with open(os.path.join(aside, moved, "metrics.jsonl")) as f:
        assert f.read() == metrics
    # the new run's checkpoints, the last one written kept, and its own metrics
    assert [os.path.basename(p) for p in checkpoint.checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert all(checkpoint.damage(p) is None for p in checkpoint.checkpoints(out))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_non_finite_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    # an update that leaves an infinity in the weights after step 2 (the loss of step 2 was finite):
    # step 1's checkpoint stays the last one, and the message names it as the last good one
    import torch
    step, updates = torch.optim.AdamW.step, []

    def overflowing(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 2:
            self.param_groups[0]["params"][0].data[0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["train", "--stage", "cpt", "--out", out, "--max-steps", "3", "save_every=1", "token_budget=512",
                     "prefetch=0"]) == 2
    first = os.path.join(out, "checkpoints", "step-0000001")
    assert (f"holds NaN or infinite values after step 2: not saved. The last good (finite) checkpoint is {first}"
            in capsys.readouterr().err)
    assert checkpoint.checkpoints(out) == [first] and len(updates) == 2


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("export") / "export")
    Encoder.from_pretrained(run).save_pretrained(folder)
    return folder


def _retype(path: str, change) -> None:
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


BROKEN_EXPORTS = {
    "a truncated model.safetensors": ("model.safetensors", lambda p: open(p, "r+b").truncate(1000),
                                      "model.safetensors: not a safetensors file"),
    "model.safetensors cut after its header": ("model.safetensors", lambda p: open(p, "r+b").truncate(
        8 + int.from_bytes(open(p, "rb").read(8), "little") + 100),
        "its model (config.json and weights) cannot be loaded: SafetensorError"),
    "config.json as a folder": ("config.json", lambda p: (os.remove(p), os.mkdir(p)),
                                "model config {folder}/config.json is a folder, not a regular file"),
    "config.json describing a larger model": ("config.json", lambda p: _retype(
        p, lambda d: d["text_config"].update(hidden_size=4096, intermediate_size=16384)),
        "config.json describes a model of"),
    "a torn moca.json": ("moca.json", lambda p: open(p, "w").write("{"), "moca.json is not JSON"),
    "moca.json holding a list": ("moca.json", lambda p: open(p, "w").write("[1]"), "moca.json: holds a list"),
    "moca.json with a retyped field": ("moca.json", lambda p: _retype(p, lambda d: d.update(max_pixels="big")),
                                       "moca.json: max_pixels must be an integer from 1 to 67,108,864, got 'big'"),
    "config.json with a retyped field": ("config.json",
                                         lambda p: _retype(p, lambda d: d["text_config"].update(hidden_size="x")),
                                         "its model (config.json and weights) cannot be loaded"),
    "a pickle instead of the weights": ("model.safetensors", lambda p: (os.remove(p), open(
        os.path.join(os.path.dirname(p), "pytorch_model.bin"), "wb").write(crafted_payloads("/nonexistent")[
            "os.system, protocol 2"])), "its model (config.json and weights) cannot be loaded: UnpicklingError"),
}


@pytest.mark.parametrize("broken", BROKEN_EXPORTS)
def test_a_broken_export_is_one_line_naming_it(broken, export, tmp_path, capsys):
    name, damage, message = BROKEN_EXPORTS[broken]
    folder = str(tmp_path / "export")
    message = message.replace("{folder}", folder)
    shutil.copytree(export, folder)
    damage(os.path.join(folder, name))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": "a red circle"}) + "\n")
    evaluation = embedded.write_eval(str(tmp_path / "eval"), queries=4)
    for argv in (["encode", "--model", folder, "--input", str(inputs), "--output", str(tmp_path / "v.npy")],
                 ["eval", "--model", folder, "--data", evaluation, "--out", str(tmp_path / "scores")]):
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moca ")]
        assert len(err) == 1 and folder in err[0] and message in err[0], (argv, err)
    with pytest.raises(ValueError, match=re.escape(message)):
        Encoder.from_pretrained(folder)


def test_errors_are_one_line_and_moca_debug_shows_the_traceback(run, tmp_path, capsys, monkeypatch):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    manifest = os.path.join(checkpoint.find(copy), checkpoint.MANIFEST)
    _retype(manifest, lambda d: d.pop("trainer"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", copy]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"moca train: {manifest}: no trainer state in it "
                                                                "(KeyError: 'trainer')")
    monkeypatch.setenv("MOCA_DEBUG", "1")
    with pytest.raises(ValueError, match="no trainer state"):
        cli.main(["train", "--resume", copy])


def test_eval_prints_its_scores_before_writing_them_and_refuses_an_output_it_cannot_make(run, tmp_path, capsys,
                                                                                        monkeypatch):
    evaluation = embedded.write_eval(str(tmp_path / "eval"), queries=4)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    capsys.readouterr()
    assert cli.main(["eval", "--model", run, "--data", evaluation, "--out", str(a_file / "scores")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("moca eval: ") and str(a_file) in captured.err
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(a_file, linked / "eval.json")
    assert cli.main(["eval", "--model", run, "--data", evaluation, "--out", str(linked)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{linked / 'eval.json'} is a symbolic link, not a regular file" in captured.err

    def full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli, "atomic_write", full)
    assert cli.main(["eval", "--model", run, "--data", evaluation, "--out", str(tmp_path / "scores")]) == 2
    captured = capsys.readouterr()
    assert "precision_at_1" in captured.out and "No space left on device" in captured.err


def test_metrics_and_exports_are_never_written_through_links(run, tmp_path, capsys):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    os.remove(copy / "metrics.jsonl")
    os.symlink(target, copy / "metrics.jsonl")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(copy), "--max-steps", "3", "--force"]) == 2
    assert f"{copy / 'metrics.jsonl'} is a symbolic link, not a regular file" in capsys.readouterr().err
    export = tmp_path / "export"
    export.mkdir()
    os.symlink(target, export / "config.json")
    assert cli.main(["encode", "--model", run, "--export", str(export)]) == 2
    assert f"{export / 'config.json'} is a symbolic link, not a regular file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a symbolic link, not a regular file"):
        with append_to(str(copy / "metrics.jsonl")):
            pass
    assert target.read_text() == "keep me\n"


def test_a_preempted_two_stage_run_names_the_command_that_resumes_both_stages(tmp_path, monkeypatch):
    from moca import train as training

    def stopped_at_once(self):
        self.requested = True
        return self
    monkeypatch.setattr(training._Termination, "__enter__", stopped_at_once)
    out = str(tmp_path / "both")
    config = Config().update({"out": out, "max_steps": 2, "token_budget": 512, "prefetch": 0})
    with pytest.raises(training.Preempted, match=f"continue with moca train --resume {out}$"):
        train(config)
    with open(os.path.join(out, "cpt", training.Preempted.MARKER)) as f:
        assert json.load(f) == {"step": 1, "checkpoint": os.path.join(out, "cpt", "checkpoints", "step-0000001"),
                                "resume": f"moca train --resume {out}"}


def test_a_qrels_line_the_csv_module_cannot_read_is_one_line(tmp_path, capsys):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d0", "title": "T", "text": "doc"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "query"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\t\"" + "d" * 200_000 + "\t1\n")
    capsys.readouterr()
    assert cli.main(["data", "convert", str(beir), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moca data convert: {beir / 'qrels' / 'test.tsv'}: not a TSV file past line 1 (field larger "
                   "than field limit (131072))"]
    assert not (tmp_path / "out.jsonl").exists()
