"""Recipes: what a command trains with, checked without training (``--print-config``), and what a
run records and keeps on resume."""
import json
import shlex

import pytest

from moca import cli
from moca.config import RECIPES, Config

# The README's and docs/training.md's real-model commands; the docs show these lines.
EXAMPLES = {
    "cpt-3b": "moca train --stage cpt --model /models/Qwen2.5-VL-3B-Instruct --data /data/cpt/ --out runs/cpt-3b",
    "cl-3b": "moca train --stage cl --init runs/cpt-3b --model /models/Qwen2.5-VL-3B-Instruct --data /data/pairs/ "
             "--out runs/cl-3b cl.max_steps=2000",
    "both-7b": "moca train --stage both --model /models/Qwen2.5-VL-7B-Instruct --data /data/cpt/ pairs=/data/pairs/ "
               "evaluation=/data/mmeb/ --out runs/both-7b",
    "cl-3b-fsdp": "torchrun --nproc_per_node 8 -m moca.cli train --stage cl --init runs/cpt-3b "
                  "--model /models/Qwen2.5-VL-3B-Instruct --data /data/pairs/ --out runs/cl-3b-8 fsdp=true",
}

PAPER_CPT = dict(lr=2e-6, weight_decay=0.0, grad_clip=5.0, warmup_ratio=0.1, warmup="log", mlm_ratio=0.4,
                 mae_ratio=0.5, mae_weight=0.5, mae_sampling="bernoulli", use_mlm=True, use_mae=True, grad_accum=4,
                 max_steps=3311)
PAPER_CL = dict(lr=2e-5, weight_decay=0.0, grad_clip=5.0, warmup_ratio=0.05, warmup="log", pairs_per_batch=24,
                hard_negatives=2, temperature=0.03, learn_temperature=False, task_batching="mixed",
                attention="bidirectional", pooling="mean", grad_cache=False)
PAPER_DATA = dict(max_doc_tokens=1280, min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28, token_budget=12800)


def _printed(capsys, argv: list[str]) -> dict:
    assert cli.main(argv + ["--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("train"):]


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_documented_commands_train_with_the_papers_settings(name, capsys):
    printed = _printed(capsys, _argv(EXAMPLES[name]))
    assert printed["run"]["recipe"] == "moca" and printed["model"]["path"].startswith("/models/Qwen2.5-VL-")
    for section, paper in (("cpt", PAPER_CPT), ("cl", PAPER_CL), ("data", PAPER_DATA)):
        for key, value in paper.items():
            assert printed[section][key] == value, f"{name}: {section}.{key}"
    if name == "cl-3b":
        assert printed["cl"]["max_steps"] == 2000 and printed["cl"]["init"] == "runs/cpt-3b"
    if name == "both-7b":
        assert printed["data"]["pairs"] == "/data/pairs/" and printed["data"]["evaluation"] == "/data/mmeb/"


def test_without_a_model_the_tiny_recipe_is_the_default(capsys):
    printed = _printed(capsys, ["train"])
    assert printed == Config().to_dict() and printed["run"]["recipe"] == "tiny"
    assert Config.recipe("tiny").to_dict() == Config().to_dict()


def test_explicit_settings_win_over_the_recipe(capsys):
    printed = _printed(capsys, ["train", "--model", "/m", "lr=1e-5", "cl.pairs_per_batch=8", "mae_weight=0.1"])
    assert printed["cpt"]["lr"] == 1e-5 and printed["cl"]["lr"] == 1e-5  # a bare shared name sets both stages
    assert printed["cl"]["pairs_per_batch"] == 8 and printed["cpt"]["mae_weight"] == 0.1
    assert printed["cpt"]["mlm_ratio"] == 0.4 and printed["data"]["max_doc_tokens"] == 1280  # the rest: the recipe's
    # a named recipe wins over the --model default, and the tiny recipe with a model keeps the tiny values
    tiny = _printed(capsys, ["train", "--model", "/m", "--recipe", "tiny"])
    assert tiny["cpt"]["lr"] == Config().cpt.lr and tiny["model"]["path"] == "/m"
    assert _printed(capsys, ["train", "recipe=moca"])["cl"]["pairs_per_batch"] == 24
    assert cli.main(["train", "--recipe", "paper", "--print-config"]) == 2
    assert "unknown recipe 'paper'; recipes: tiny, moca" in capsys.readouterr().err


def test_a_toml_file_goes_over_the_recipe_and_key_value_over_both(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npath = "/m"\n[cpt]\nlr = 1e-6\nmax_steps = 10\n')
    printed = _printed(capsys, ["train", "--config", str(toml), "cpt.max_steps=20"])
    assert printed["run"]["recipe"] == "moca" and printed["cpt"]["lr"] == 1e-6 and printed["cpt"]["max_steps"] == 20
    assert printed["cl"]["lr"] == 2e-5


def test_recipe_resolution_from_python():
    config = Config.resolve({"model.path": "/m", "cl.temperature": 0.05})
    assert config.run.recipe == "moca" and config.cl.temperature == 0.05 and config.cpt.lr == 2e-6
    assert config.recipe_differences() == ["model.path: None -> '/m'", "cl.temperature: 0.03 -> 0.05"]
    assert Config.resolve({}).run.recipe == "tiny" and Config.resolve({"recipe": "moca"}).cpt.grad_accum == 4
    assert set(RECIPES) == {"tiny", "moca"}


def test_a_run_records_its_recipe_and_resume_keeps_it(tmp_path, capsys):
    # a moca-recipe run directory (its config.json as a run writes it): resuming keeps every value
    run = tmp_path / "moca-run"
    run.mkdir()
    Config.resolve({"model.path": "/m", "run.stage": "cpt", "run.out": str(run), "cpt.lr": 1e-6}).write(str(run))
    resumed = _printed(capsys, ["train", "--resume", str(run)])
    assert resumed["run"]["recipe"] == "moca" and resumed["cpt"]["lr"] == 1e-6 and resumed["cpt"]["grad_accum"] == 4
    assert cli.main(["train", "--resume", str(run), "--recipe", "tiny", "--print-config"]) == 2
    assert "a resumed run keeps its settings" in capsys.readouterr().err
    # a trained run prints what differs from its recipe and records the recipe in config.json
    out = tmp_path / "tiny-run"
    assert cli.main(["train", "--stage", "cpt", "--out", str(out), "--max-steps", "2", "mlm_ratio=0.3"]) == 0
    assert "recipe tiny; settings that differ from it: run.stage: 'both' -> 'cpt'" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["recipe"] == "tiny" and saved["cpt"]["mlm_ratio"] == 0.3 and saved["cpt"]["max_steps"] == 2


def test_help_and_print_config_load_neither_torch_nor_a_model():
    """``--print-config`` and ``--help`` answer without importing torch or transformers (seconds
    on a cold start), whatever the recipe."""
    import subprocess
    import sys
    code = ("import sys, contextlib, io\n"
            "from moca import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['train', '--model', '/models/Qwen2.5-VL-3B-Instruct', '--print-config']) == 0\n"
            "    assert cli.main(['train', '--print-config', 'recompute=every-2']) == 0\n"
            "    try:\n"
            "        cli.main(['train', '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
