"""moca's messages through ``logging``: a program routes, filters or silences them as it does any
library's; the ``moca`` command prints them as before (info on stdout, warnings and errors on
stderr) with ``--quiet`` and ``--verbose``, and a message never tears a progress bar."""
import json
import logging
import re
import subprocess
import sys

import pytest
from tqdm import tqdm

from moca import cli
from moca.config import Config
from moca.logs import ConsoleHandler, own_lines_only
from moca.train import train

TINY = ["--stage", "cpt", "--max-steps", "2", "token_budget=512", "log_every=1", "save_every=2", "prefetch=0"]


def _config(out) -> Config:
    return Config().update({"run.stage": "cpt", "out": str(out), "cpt.max_steps": 2, "save_every": 2, "log_every": 1,
                            "token_budget": 512, "prefetch": 0})


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def kept():
    """A handler on the ``moca`` logger, as a program would attach one; removed afterwards."""
    handler, logger = _Kept(), logging.getLogger("moca")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_a_handler_on_moca_captures_a_runs_messages_and_a_level_silences_them(tmp_path, kept, capsys):
    logging.getLogger("moca").setLevel(logging.INFO)
    train(_config(tmp_path / "a"))
    said = {record.name: record.getMessage() for record in kept.records}
    assert said["moca.stages"] == "600 documents, 51 micro-batches of up to 512 tokens per epoch"
    assert capsys.readouterr().out == ""  # the library prints nothing of its own: the program's handler has them

    kept.records.clear()
    logging.getLogger("moca").setLevel(logging.ERROR)
    train(_config(tmp_path / "b"))
    captured = capsys.readouterr()
    assert kept.records == [] and captured.out == ""
    assert "cpt:" not in captured.err  # the progress bar goes with the messages
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # it ran


def test_the_command_prints_its_lines_and_leaves_logging_as_it_found_it(tmp_path, capsys):
    logger = logging.getLogger("moca")
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("recipe tiny; settings that differ from it: run.stage: 'both' -> 'cpt'")
    assert lines[1] == "600 documents, 51 micro-batches of up to 512 tokens per epoch"
    assert f"run directory: {tmp_path / 'run'} (config.json, metrics.jsonl, checkpoints/, loss.png)" in lines
    assert "cpt: 100%" in captured.err and not any(line.startswith("{") for line in lines)  # no debug lines
    assert logger.handlers == [] and logger.level == logging.NOTSET


def test_quiet_says_warnings_and_errors_only(tmp_path, capsys):
    assert cli.main(["train", "--quiet", *TINY, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "cpt:" not in captured.err  # no lines, no training bar
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # it ran
    assert cli.main(["train", "-q", *TINY, "--out", str(tmp_path / "run")]) == 2  # an error still says why
    assert captured.out == "" and "already holds a run with checkpoints" in capsys.readouterr().err


def test_verbose_adds_each_metrics_row_and_each_save(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert rows == [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"step 2: checkpoint {run / 'checkpoints' / 'step-0000002'} saved" in lines
    assert lines[1] == "600 documents, 51 micro-batches of up to 512 tokens per epoch"  # the info lines too


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--quiet", "--verbose", "--print-config"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_other_ranks_say_warnings_only_unless_verbose(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli._level(cli.parse(["train"])[0]) == logging.WARNING
    assert cli._level(cli.parse(["train", "-v"])[0]) == logging.DEBUG
    monkeypatch.setenv("RANK", "0")
    assert cli._level(cli.parse(["eval", "--model", "m", "--data", "d"])[0]) == logging.INFO


def test_a_message_does_not_tear_a_progress_bar(capsys):
    logger = logging.getLogger("moca.test")
    handler = ConsoleHandler()
    logger.addHandler(handler)
    try:
        with tqdm(total=4, desc="bar", file=sys.stderr) as bar:
            bar.update(1)
            logger.warning("a warning while the bar runs")
            bar.update(1)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    # cleared first (a carriage return), then the message on a line of its own, then the bar again
    assert re.search(r"\r\s*\ra warning while the bar runs\n\rbar:", err), repr(err)


def test_importing_moca_configures_no_logging():
    code = ("import logging, moca, moca.cli, moca.train, moca.encoder; m = logging.getLogger('moca'); "
            "print(len(m.handlers), m.level, len(logging.getLogger().handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "0", "0"]


def test_a_command_that_runs_others_shows_its_own_lines_and_their_warnings(kept):
    """moca ablate's rows: their runs' info lines are dropped, the ablation's and any warning pass."""
    logging.getLogger("moca").setLevel(logging.INFO)
    own, other = logging.getLogger("moca.ablate"), logging.getLogger("moca.train")
    with own_lines_only("moca.ablate"):
        own.info("a row starts")
        other.info("a run's line")
        other.warning("a run's warning")
    other.info("after")
    assert [r.getMessage() for r in kept.records] == ["a row starts", "a run's warning", "after"]
    assert logging.getLogger("moca").level == logging.INFO and own.level == logging.NOTSET
