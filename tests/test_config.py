"""The settings: sections, names, conversion, validation, TOML, the command line's shorthands,
and the trainer's layout (the loop holds no parallel-mode branch and imports no stage or encoder
internals)."""
import ast
import json
import os
import shutil

import pytest

from moca import cli
from moca.config import SECTIONS, Config, Recompute, describe


def _args(argv):
    import argparse
    parser = argparse.ArgumentParser()
    cli._train_parser(parser.add_subparsers(), cli._verbosity())
    args, rest = parser.parse_known_args(["train", *argv])
    args.settings += rest
    return args


def test_a_setting_is_named_by_section_or_by_its_bare_name():
    config = Config().update({"cpt.lr": "2e-6", "mlm_ratio": "0.3", "max_steps": "7", "fsdp": "yes",
                              "token_budget": "1e4"})
    assert config.cpt.lr == 2e-6 and config.cl.lr == Config().cl.lr  # section.field sets one section
    assert config.cpt.max_steps == config.cl.max_steps == 7  # a bare shared name sets both stages
    assert config.cpt.mlm_ratio == 0.3 and config.parallel.fsdp is True and config.data.token_budget == 10000


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": "1"}, "unknown setting 'learning_rate'"),
    ({"train.lr": "1"}, "unknown section 'train'"),
    ({"cpt.pairs_per_batch": "1"}, "unknown setting 'cpt.pairs_per_batch'; cpt has:"),
    ({"cl.lr": "fast"}, "cl.lr takes a float, got 'fast'"),
    ({"token_budget": "1.5"}, "data.token_budget takes an int"),
    ({"use_mae": "maybe"}, "cpt.use_mae takes true or false"),
    ({"model.preset": None}, "model.preset cannot be empty"),
])
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Config().update(overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "pretrain"}, "run.stage must be one of cpt, cl, both, got 'pretrain'"),
    ({"image_decoder": "opencv"}, "data.image_decoder must be one of pil, dali-cpu, dali-gpu"),
    ({"task_batching": "random"}, "cl.task_batching must be one of mixed, homogeneous"),
    ({"max_doc_tokens": "2048"}, r"max_doc_tokens \(2048\) must be between 1 and token_budget \(1024\)"),
    ({"min_pixels": "10000", "max_pixels": "100"}, r"min_pixels \(10000\) must be positive and at most"),
    ({"cl.warmup_ratio": "2"}, "cl: max_steps >= 1"),
    ({"use_mlm": "false", "use_mae": "false"}, "nothing to learn"),
    ({"temperature": "0"}, "temperature > 0"),
    ({"profile_steps": "5"}, "profile_steps takes A:B"),
    ({"preset": "3b"}, "give --model PATH"),
])
def test_validation_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config().update(overrides).validate()


def test_round_trip_through_json_and_differences(tmp_path):
    config = Config().update({"run.out": str(tmp_path), "cpt.lr": "1e-4", "save_every": "5"})
    config.write(str(tmp_path))
    assert Config.read(str(tmp_path)) == config
    assert json.loads((tmp_path / "config.json").read_text())["cpt"]["lr"] == 1e-4
    changed = config.update({"mlm_ratio": "0.3", "save_every": "7"})
    assert config.differences(changed) == ["run.save_every: 5 -> 7", "cpt.mlm_ratio: 0.4 -> 0.3"]
    assert config.result_differences(changed) == ["cpt.mlm_ratio: 0.4 -> 0.3"]  # save_every may change


def test_toml_file_then_key_value(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nout = "somewhere"\n[cpt]\nlr = 2e-6\nmax_steps = 10\n[data]\ntoken_budget = 2048\n')
    config = cli.train_config(_args(["--config", str(path), "--stage", "cpt", "cpt.max_steps=12"]))
    assert (config.run.out, config.cpt.lr, config.cpt.max_steps, config.data.token_budget) == \
        ("somewhere", 2e-6, 12, 2048)
    path.write_text("lr = 1.0\n")
    with pytest.raises(ValueError, match="'lr' is not a table; put settings under"):
        Config.from_toml(str(path))
    path.write_text("[cpt]\nlr = \n")
    with pytest.raises(ValueError, match=f"--config {path}"):
        Config.from_toml(str(path))


def test_command_line_shorthands():
    config = cli.train_config(_args(["--stage", "cl", "--data", "pairs.jsonl", "--max-steps", "9", "--init", "cpt-run",
                                     "--model", "ckpt"]))
    assert (config.data.pairs, config.data.documents, config.cl.max_steps, config.cpt.max_steps) == \
        ("pairs.jsonl", None, 9, Config.recipe("moca").cpt.max_steps)  # --model: the moca recipe
    assert (config.cl.init, config.model.path) == ("cpt-run", "ckpt")
    both = cli.train_config(_args(["--max-steps", "4", "cl.max_steps=3"]))
    assert (both.cpt.max_steps, both.cl.max_steps) == (4, 3)  # --max-steps: every stage; a named one wins
    with pytest.raises(ValueError, match="cl.temperature sets stage cl, which --stage cpt does not run"):
        cli.train_config(_args(["--stage", "cpt", "cl.temperature=0.05"]))
    with pytest.raises(ValueError, match="needs pairs=PAIRS"):
        cli.train_config(_args(["--data", "docs.jsonl"]))


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for section in SECTIONS:
        for name in Config().to_dict()[section]:
            assert f"{section}.{name} (" in out, f"{section}.{name}"
    assert "cpt.mae_weight (float, default 0.5): loss = MLM + mae_weight * MAE" in describe()


def test_the_loop_holds_no_parallel_branch_and_no_internals():
    source = open(os.path.join(os.path.dirname(__file__), os.pardir, "moca", "train.py")).read()
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "encoder" not in imported and not any(m and "stages." in m for m in imported)
    tests = [node.test for node in ast.walk(tree) if isinstance(node, (ast.If, ast.IfExp, ast.While))]
    attributes = {n.attr for t in tests for n in ast.walk(t) if isinstance(n, ast.Attribute)}
    assert not attributes & {"fsdp", "size", "is_initialized", "ddp"}, attributes
    assert len(tests) > 5  # the walk sees the loop's conditions


def test_the_learning_rate_schedule():
    import math

    from moca.train import lr_factor
    linear = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert linear[0] == 0.1 and linear[9] == 1.0 and linear[10] == 1.0 and linear[55] == 0.5
    log = [lr_factor(s, 100, 0.1, "log") for s in range(100)]  # DeepSpeed's WarmupDecayLR, warmup_type="log"
    assert log[0] == 0.0 and log[4] == math.log(5) / math.log(10) and log[9] == 1.0 and log[10:] == linear[10:]
    assert all(a <= b for a, b in zip(log[:10], log[1:10]))


def test_the_typed_settings_keep_their_text_through_a_run_its_resume_and_print_config(tmp_path, capsys):
    """recompute, report_to and profile_steps are text in config.json, --print-config and a
    resume's comparison, and a typed value (parsed once, in moca.config) where the run uses it."""
    run = str(tmp_path / "run")
    given = {"recompute": "every-2", "report_to": "TensorBoard", "profile_steps": "0:1"}
    assert cli.main(["train", "--stage", "cpt", "--out", run, "cpt.max_steps=4", "save_every=2", "log_every=1",
                     "token_budget=512", "prefetch=0", *[f"{k}={v}" for k, v in given.items()]]) == 0
    assert "recompute=every-2: " in capsys.readouterr().out  # the run took the typed value: every 2nd region
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["recompute"], saved["run"]["report_to"], saved["run"]["profile_steps"]) == \
        ("every-2", "TensorBoard", "0:1")
    config = Config.read(run)
    assert config.model.recomputation == Recompute("every", 2) and config.run.reports == ("tensorboard",)
    assert config.run.profile_range == (0, 1)
    assert os.listdir(os.path.join(run, "tensorboard"))  # report_to reached the reporter

    assert cli.main(["train", "--resume", run, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == saved
    shutil.rmtree(os.path.join(run, "checkpoints", "step-0000004"))  # so that the resume has steps to run
    assert cli.main(["train", "--resume", run]) == 0  # the same settings: no refusal
    assert f"resumed {run} at step 2 from " in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == saved
    assert [row["step"] for row in map(json.loads, open(os.path.join(run, "metrics.jsonl")))] == [1, 2, 3, 4]
    assert cli.main(["train", "--resume", run, "recompute=full", "report_to=none", "profile_steps=none"]) == 0
    changed = json.loads((tmp_path / "run" / "config.json").read_text())  # resumable settings: saved as given
    assert (changed["model"]["recompute"], changed["run"]["report_to"], changed["run"]["profile_steps"]) == \
        ("full", None, None)
