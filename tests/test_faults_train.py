"""Faults of a training run, end to end on the tiny model and the embedded data: SIGKILL at random
moments (one inside a checkpoint write), a damaged latest checkpoint, a disk that fills during a
save, SIGTERM, a NaN loss, two processes on one run directory, and resumes that must be refused.
Every run that is resumed after a fault ends with the metrics of the run that had none.

Real processes are started (``python -m moca.cli train``) where the fault needs one (a signal, a
second process); the rest run ``moca.cli.main`` in this process. Waits poll for files with
generous timeouts, so that a slow, shared machine makes the suite slower, not flaky."""
import errno
import glob
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import textwrap
import time

import pytest
from processes import WAIT

from moca import checkpoint, cli
from moca.model.heads import MocaCPT
from moca.train import train

SETTINGS = ["--stage", "cpt", "--max-steps", "8", "save_every=2", "log_every=1", "token_budget=512", "prefetch=0"]
TIMED = ("tokens_per_s", "model_tflops")  # measured, so they differ between equal runs
TRAIN = [sys.executable, "-m", "moca.cli", "train"]

# Runs the CLI with the checkpoint writer stopping, for good, inside the save of one step: after
# its first item has reached a shard file of step-N.tmp, and before the manifest.
SLOW_WRITER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed.checkpoint.filesystem as filesystem
    from moca import checkpoint, cli

    slow_step, marker = int(os.environ["SLOW_SAVE_STEP"]), os.environ["SLOW_SAVE_MARKER"]
    save, write_item, saving = checkpoint.save, filesystem._write_item, []

    def announced_save(run_dir, step, *args, **kwargs):
        saving[:] = [step]
        return save(run_dir, step, *args, **kwargs)

    def slow_write_item(transforms, stream, *args, **kwargs):
        result = write_item(transforms, stream, *args, **kwargs)
        if saving == [slow_step]:
            stream.flush()
            with open(marker, "w") as f:
                f.write(stream.name)
            time.sleep(3600)
        return result

    checkpoint.save, filesystem._write_item = announced_save, slow_write_item
    sys.exit(cli.main(sys.argv[1:]))
""")


def _rows(run) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _steps(run) -> list[str]:
    return [os.path.basename(p) for p in sorted(glob.glob(os.path.join(run, "checkpoints", "step-*")))]


def _newest(run) -> str | None:
    found = checkpoint.find(str(run))
    return os.path.basename(found) if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, list[dict]]:
    """The uninterrupted run: its directory and metrics."""
    run = str(tmp_path_factory.mktemp("reference") / "run")
    assert cli.main(["train", "--out", run, *SETTINGS]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9)) and _steps(run) == ["step-0000006", "step-0000008"]
    return run, rows


def _copy(reference, to, stop_after: int = 8) -> str:
    """A copy of the reference run as a run stopped after the save of ``stop_after`` leaves it
    (later checkpoints deleted; the later metrics rows stay, as a killed run leaves them)."""
    shutil.copytree(reference[0], to)
    for step in range(stop_after + 1, 9):
        shutil.rmtree(os.path.join(to, "checkpoints", f"step-{step:07d}"), ignore_errors=True)
    return str(to)


def _logged_past(run: str, step: int, before: int | None):
    """A condition: metrics.jsonl, rewritten by this process (its inode is not ``before``), logs
    a step past ``step``."""
    path = os.path.join(run, "metrics.jsonl")

    def condition() -> bool:
        try:
            if os.stat(path).st_ino == before:
                return False
            with open(path) as f:
                return any(line.endswith("\n") and json.loads(line)["step"] > step for line in f)
        except (OSError, ValueError):
            return False
    return condition


def _inode(path: str) -> int | None:
    return os.stat(path).st_ino if os.path.exists(path) else None


def test_sigkill_at_random_moments_then_resume_ends_like_the_uninterrupted_run(reference, tmp_path, processes):
    # One run killed again and again, each time at a moment drawn from a seeded generator: a
    # random delay after the start (before any checkpoint, often before the run directory or its
    # config.json), inside the write of a checkpoint, then in random order after a random step
    # (inside the next step or the save after it) and right after a checkpoint appears. Each
    # restart is `moca train --resume` (the same command with --out while the directory does not
    # exist yet).
    rng = random.Random(1313)
    run = str(tmp_path / "run")
    kinds = ["step", "checkpoint"]
    rng.shuffle(kinds)
    kinds = ["delay", "inside a write", *kinds]
    seen_locks, stale_tmp = [], None
    for kind in kinds:
        newest = _newest(run) if os.path.isdir(run) else None
        done = int(newest[5:]) if newest else 0
        if done == 8:
            break
        where = ["--resume", run] if os.path.isdir(run) else ["--out", run]
        metrics_inode = _inode(os.path.join(run, "metrics.jsonl"))
        marker = str(tmp_path / "inside-the-write")
        if kind == "inside a write":
            slow_step = rng.choice(range(done + 2, 9, 2))
            runner = tmp_path / "slow_writer.py"
            runner.write_text(SLOW_WRITER)
            process = processes.start([sys.executable, str(runner), "train", *where, *SETTINGS],
                                      env={**os.environ, "SLOW_SAVE_STEP": str(slow_step), "SLOW_SAVE_MARKER": marker})
            processes.wait_for(lambda marker=marker: os.path.exists(marker), f"the save of step {slow_step}", process)
        else:
            process = processes.start([*TRAIN, *where, *SETTINGS])
            if kind == "delay":
                time.sleep(rng.uniform(0.0, 3.0))  # a fresh run of 8 steps lasts longer on any machine
            elif kind == "step":
                target = rng.randrange(done, 7)
                processes.wait_for(_logged_past(run, target, metrics_inode), f"step {target + 1}", process)
            else:
                target = f"step-{rng.choice(range(done + 2, 8, 2)):07d}" if done < 6 else None
                if target is None:  # no checkpoint left to wait for before the end: wait for step 7
                    processes.wait_for(_logged_past(run, 6, metrics_inode), "step 7", process)
                else:
                    processes.wait_for(lambda target=target: target in _steps(run), f"checkpoint {target}", process)
        assert process.poll() is None, f"the run ended before the kill ({kind}):\n{processes.output(process)[-3000:]}"
        process.kill()
        assert process.wait(WAIT) == -signal.SIGKILL
        lock = os.path.join(run, ".lock")
        if os.path.exists(lock):
            with open(lock) as f:
                seen_locks.append((process.pid, f.read()))
        left = sorted(os.listdir(run)) + [f"checkpoints/{c}" for c in _steps(run)] if os.path.isdir(run) else []
        print(f"killed ({kind}) {process.pid}: newest {_newest(run) if left else None}; left {left}")  # for -s
        if kind == "inside a write":
            stale_tmp = os.path.join(run, "checkpoints", f"step-{slow_step:07d}.tmp")
            with open(marker) as f:
                shard = f.read()
            assert os.path.getsize(shard) > 0 and not os.path.exists(os.path.join(stale_tmp, "manifest.json"))
            assert _newest(run) == (f"step-{slow_step - 2:07d}" if slow_step > 2 else None)  # never the .tmp
            os.remove(marker)
    assert stale_tmp is not None, "the kill inside a checkpoint write did not happen"
    # the lock of a killed process names it; the next process took it over
    assert any(f"process {pid} on host {socket.gethostname()}" in text for pid, text in seen_locks), seen_locks
    last = processes.start([*TRAIN, "--resume", run, *SETTINGS])
    assert processes.finish(last) == 0, processes.output(last)[-3000:]
    assert _rows(run) == reference[1]
    assert _steps(run) == ["step-0000006", "step-0000008"]  # the half-written folder was removed by a later save
    assert not os.path.exists(stale_tmp) and not glob.glob(os.path.join(run, "*.tmp"))  # nor a killed atomic write's


def _damage_shard(path: str) -> None:
    shard = next(f for f in sorted(os.listdir(path)) if f.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, shard)) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate_shard(path: str) -> None:
    shard = next(os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".distcp"))
    os.truncate(shard, os.path.getsize(shard) // 3)


@pytest.mark.parametrize("harm, why", [
    (_damage_shard, "does not match its checksum"),
    (_truncate_shard, "has .* bytes, the manifest says"),
    (lambda path: os.remove(os.path.join(path, "manifest.json")), "no readable manifest"),
], ids=["flipped-byte", "truncated", "no-manifest"])
def test_a_damaged_latest_checkpoint_is_passed_over(reference, tmp_path, capsys, harm, why):
    run = _copy(reference, tmp_path / "run")
    latest, previous = (os.path.join(run, "checkpoints", s) for s in ("step-0000008", "step-0000006"))
    harm(latest)
    with pytest.warns(UserWarning, match=f"checkpoint {latest} is damaged \\(.*{why}.*\\); using {previous} instead"):
        assert cli.main(["train", "--resume", run, *SETTINGS]) == 0
    assert f"resumed {run} at step 6 from {previous}" in capsys.readouterr().out
    assert _rows(run) == reference[1]
    assert checkpoint.damage(latest) is None  # written again by the resumed run


def test_a_disk_that_fills_during_a_save(reference, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint.filesystem as filesystem
    run = _copy(reference, tmp_path / "run", stop_after=6)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "stage": "cp')  # a line torn by the full disk too
    previous = os.path.join(run, "checkpoints", "step-0000006")
    before = checkpoint.read(previous)

    def full(transforms, stream, *args, **kwargs):
        stream.write(b"\0" * 4096)  # part of a shard, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem, "_write_item", full)
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 2
    err = capsys.readouterr().err
    assert (f"moca train: could not write the checkpoint of step 8 in {run}/checkpoints ([Errno 28] No space left "
            f"on device); the newest complete checkpoint is {previous}") in err
    assert _steps(run) == ["step-0000006"] and not glob.glob(os.path.join(run, "checkpoints", "*.tmp"))
    assert checkpoint.damage(previous) is None
    after = checkpoint.read(previous)
    assert after["model"].keys() == before["model"].keys()
    assert all(after["model"][k].equal(v) for k, v in before["model"].items())
    monkeypatch.undo()
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 0
    assert _rows(run) == reference[1]


def test_a_second_process_is_refused_and_sigterm_saves_and_exits_75(reference, tmp_path, capsys, processes):
    run = str(tmp_path / "run")
    first = processes.start([*TRAIN, "--out", run, *SETTINGS])
    processes.wait_for(_logged_past(run, 0, None), "step 1", first)
    # the same command again, while the first runs: refused, naming the holder
    assert cli.main(["train", "--out", run, *SETTINGS]) == 2
    err = capsys.readouterr().err
    assert f"{run} is in use by process {first.pid} on host {socket.gethostname()}" in err
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = max(json.loads(line)["step"] for line in f if line.endswith("\n"))
    processes.wait_for(_logged_past(run, logged, None), f"a step past {logged}", first)  # the first runs on
    first.send_signal(signal.SIGTERM)
    assert processes.finish(first) == 75, processes.output(first)[-3000:]
    stopped = max(r["step"] for r in _rows(run))
    assert stopped < 8, "the run ended before SIGTERM reached it"
    newest = os.path.join(run, "checkpoints", f"step-{stopped:07d}")
    assert (f"moca train: SIGTERM: stopped after step {stopped} with checkpoint {newest}; continue with moca train "
            f"--resume {run}") in processes.output(first)
    assert checkpoint.find(run) == newest
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 0
    assert f"resumed {run} at step {stopped} from {newest}" in capsys.readouterr().out
    assert _rows(run) == reference[1]


def test_a_nan_loss_stops_the_cli_and_the_run_resumes(reference, tmp_path, capsys, monkeypatch):
    run = _copy(reference, tmp_path / "run", stop_after=6)
    original = MocaCPT.forward

    def poisoned(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MocaCPT, "forward", poisoned)
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 2
    previous = os.path.join(run, "checkpoints", "step-0000006")
    assert (f"moca train: the loss became nan at step 6; stopped. The last good checkpoint is {previous}"
            in capsys.readouterr().err)
    assert _steps(run) == ["step-0000006"]
    monkeypatch.undo()
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 0
    assert _rows(run) == reference[1]


def test_resume_refuses_settings_that_change_results(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "run", stop_after=6)
    assert cli.main(["train", "--resume", run, *SETTINGS, "mlm_ratio=0.3", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert (f"resuming {run} with settings that change its results: run.seed: 0 -> 1; cpt.mlm_ratio: 0.4 -> 0.3. "
            "Pass --force") in err
    assert _steps(run) == ["step-0000006"]  # nothing ran
    assert cli.main(["train", "--resume", run, "--force", *SETTINGS, "mlm_ratio=0.3"]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[:6] == reference[1][:6] and rows[6]["loss"] != reference[1][6]["loss"]  # now masking 30%
    # schedule-only settings may change: two more steps, saved every 3
    run = _copy(reference, tmp_path / "longer")
    assert cli.main(["train", "--resume", run, *SETTINGS, "cpt.max_steps=10", "save_every=3"]) == 0
    assert [r["step"] for r in _rows(run)] == list(range(1, 11)) and _newest(run) == "step-0000010"


def test_runs_that_must_not_start(reference, tmp_path, capsys):
    # a new run into a directory that holds checkpoints would overwrite them
    run = _copy(reference, tmp_path / "run")
    assert cli.main(["train", "--out", run, *SETTINGS]) == 2
    assert (f"moca train: {run} already holds a run with checkpoints: continue it with --resume {run}, or choose "
            "another --out") in capsys.readouterr().err
    assert _rows(run) == reference[1] and _steps(run) == ["step-0000006", "step-0000008"]
    # resuming a finished run trains nothing and reports its last logged step
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 0
    out = capsys.readouterr().out
    assert f"resumed {run} at step 8" in out and f"MLM loss {reference[1][-1]['mlm_loss']:.3f}" in out
    assert _rows(run) == reference[1]
    missing = str(tmp_path / "never-started")
    assert cli.main(["train", "--resume", missing, *SETTINGS]) == 2
    assert f"--resume {missing}: no such directory" in capsys.readouterr().err
    os.remove(os.path.join(run, "config.json"))
    assert cli.main(["train", "--resume", run, *SETTINGS]) == 2
    assert "checkpoints without the config.json" in capsys.readouterr().err


def test_resume_of_a_run_killed_before_its_config_starts_at_step_zero(reference, tmp_path, caplog):
    # what a kill in the first seconds leaves: the directory and its lock, nothing else
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("process 1 on host elsewhere\n")
    (run / "config.json.1.tmp").write_text('{"run": {"st')  # a kill inside the atomic write of config.json
    config = cli.train_config(cli.parse(["train", "--resume", str(run), *SETTINGS])[0])
    caplog.set_level(logging.INFO, logger="moca")
    train(config, resume=True, stop_at=2)
    assert f"{run}: no checkpoint yet, starting at step 0" in caplog.messages
    assert _rows(run) == reference[1][:2] and not list(run.glob("*.tmp"))
