"""Batches made by ``data.workers`` processes: the same batches as the training process makes
(both stages, several ranks, across epochs), a run killed mid-epoch resuming through ``moca train
--resume`` to the metrics of a run that never stopped and never had workers (JSON Lines, the
authors' Parquet shards, MMEB-train's Parquet), warnings said once as without workers, a worker's
error, a killed worker and workers that make nothing each one line, and the default count."""
import json
import os
import re
import signal
import sys
import time
import warnings

import pytest
import torch
from lines import logged
from processes import WAIT, children
from test_data_parquet import mmeb_train, stage_one_sources
from test_faults_trust_data import _documents

from moca import cli
from moca.config import Config, DataConfig
from moca.data import embedded, loader
from moca.data.cpt import Encoded
from moca.data.index import index_documents, index_pairs
from moca.data.tokenizer import ByteTokenizer
from moca.model.qwen import build

TIMED = ("tokens_per_s", "model_tflops")  # measured, so they differ between equal runs
TRAIN = [sys.executable, "-m", "moca.cli", "train"]
CPU = torch.device("cpu")
DEADLINE = 600  # a loader that hangs fails the test instead of stalling the suite (tests/conftest.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Small stage-1 documents (6 micro-batches of 512 tokens an epoch) and stage-2 pairs (48:
    6 batches of 8 an epoch on one rank), so that a few steps cross epochs."""
    folder = str(tmp_path_factory.mktemp("data"))
    return {"documents": embedded.write(folder, documents=60), "pairs": embedded.write_pairs(folder, pairs=48)}


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _equal(a, b) -> bool:
    """Batches alike, tensor for tensor (documents compared by their fields)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, Encoded):
        return isinstance(b, Encoded) and _equal([a.ids, a.rows, a.grids, a.where],
                                                        [b.ids, b.rows, b.grids, b.where])
    return a == b


def _config(tmp_path, **settings) -> Config:
    return Config().update({"out": str(tmp_path / "run"), "token_budget": 512, "pairs_per_batch": 8, **settings})


def _first(made, count: int) -> list:
    """The first ``count`` batches of a ``loader.Loader``, which is then closed."""
    try:
        return [next(made) for _ in range(count)]
    finally:
        made.close()


@pytest.mark.parametrize("rank", [0, 1])
def test_two_workers_make_the_micro_batches_the_training_process_makes(data, tmp_path, rank):
    # rank 0 or 1 of 2, two micro-batches a step, from the middle of epoch 0 into epoch 2 (6 an epoch)
    tok, model_config = ByteTokenizer(), build("tiny").config
    entries = index_documents(_config(tmp_path, documents=data["documents"]), tok, data["documents"])

    def made(workers):
        config = _config(tmp_path, documents=data["documents"], grad_accum=2, workers=workers)
        return _first(loader.micro_batch_loader(entries, config, tok, model_config, 3, 0, 2, rank, 2, CPU), 6)
    inline, parallel = made(0), made(2)
    assert [(e, p) for _, _, e, p in inline] == [(0, 4), (0, 6), (1, 2), (1, 4), (1, 6), (2, 2)]
    assert _equal(inline, parallel)
    assert inline[0][0]["mae_positions"].numel() > 0 and (inline[0][0]["labels"] != -100).any()  # corrupted


def test_two_workers_make_the_contrastive_batches_the_training_process_makes(data, tmp_path):
    config = _config(tmp_path, pairs=data["pairs"]).update({"run.stage": "cl"})
    entries = index_pairs(config, data["pairs"])

    def made(workers):
        return _first(loader.pair_batch_loader(entries, config.update({"workers": workers}), ByteTokenizer(), 0, 1, 1,
                                               2, CPU), 3)
    inline, parallel = made(0), made(2)
    assert [(e, p) for _, e, p in inline] == [(0, 2), (0, 3), (1, 1)]  # 3 global batches of 16 an epoch
    assert all(len(chosen) == 8 and all(len(negatives) == 2 for _, _, negatives in chosen) for chosen, _, _ in inline)
    assert _equal(inline, parallel)


def _kill_tree(pid: int) -> None:
    for child in children(pid):
        _kill_tree(child)
    os.kill(pid, signal.SIGKILL)


def _authors_rows(folder, data) -> list[str]:
    """Stage 1 on the authors' rows: two Parquet shards (JPEG bytes, their image markers, bad rows),
    a save_to_disk folder and a JSON Lines file, each drawn from."""
    parquet, saved, jsonl, _ = stage_one_sources(folder)
    return ["--stage", "cpt", "--data", f"{parquet}=20,{saved}=0.5x,{jsonl}"]


def _mmeb_train(folder, data) -> list[str]:
    """Stage 2 on MMEB-train's Parquet layout (two subsets, images under an image root, bad rows)."""
    images = folder / "images"
    images.mkdir(parents=True)
    pairs, _ = mmeb_train(folder / "MMEB-train", images)
    return ["--stage", "cl", "--data", pairs, f"image_root={images}", "pairs_per_batch=4"]


RUNS = {
    "stage 1, JSON Lines": lambda folder, data: ["--stage", "cpt", "--data", data["documents"]],
    "stage 1, the authors' Parquet shards": _authors_rows,
    "stage 2, JSON Lines": lambda folder, data: ["--stage", "cl", "--data", data["pairs"], "pairs_per_batch=8"],
    "stage 2, MMEB-train Parquet": _mmeb_train,
}


@pytest.mark.parametrize("kind", RUNS)
def test_a_run_with_two_workers_killed_mid_epoch_resumes_to_the_metrics_of_one_without(data, tmp_path, processes,
                                                                                         kind):
    settings = [*RUNS[kind](tmp_path / "data", data), "--max-steps", "9", "save_every=3", "log_every=1",
                "token_budget=512", "max_doc_tokens=256", "keep_checkpoints=4"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    with warnings.catch_warnings():  # the bad rows' warnings
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--out", whole, *settings, "workers=0"]) == 0
    rows = _rows(whole)
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert rows[2]["epoch"] == rows[3]["epoch"] < rows[-1]["epoch"]  # step 3's checkpoint is mid-epoch; epochs pass

    process = processes.start([*TRAIN, "--out", cut, *settings, "workers=2"])
    checkpoint_3 = os.path.join(cut, "checkpoints", "step-0000003")

    def past_step_3() -> bool:
        try:
            return os.path.isdir(checkpoint_3) and len(_rows(cut)) >= 4
        except (OSError, ValueError):
            return False
    processes.wait_for(past_step_3, "step 4, after the checkpoint of step 3", process)
    workers = children(process.pid)
    assert len(workers) == 2, workers  # the run's two data workers
    _kill_tree(process.pid)
    assert process.wait(WAIT) == -signal.SIGKILL
    assert not any(os.path.isdir(os.path.join(cut, "checkpoints", f"step-{s:07d}")) for s in (6, 9))

    resumed = processes.start([*TRAIN, "--resume", cut])
    assert processes.finish(resumed) == 0, processes.output(resumed)[-3000:]
    assert "resumed" in processes.output(resumed) and f"at step 3 from {cut}" in processes.output(resumed)
    assert _rows(cut) == rows


def test_passed_over_batches_and_skipped_documents_are_said_as_without_workers(tmp_path, capsys):
    """The cut image's document is micro-batch 2 of each epoch, made by worker 2 then worker 0
    of three: each says it could not read it; the run says so once, and numbers the batches it
    passed over across the run, as without workers. Under --strict the worker's error is the line."""
    data, line = _documents(tmp_path)
    bad = f"{data}:{line}: image 'cut.png' could not be decoded: image file is truncated"
    settings = ["--stage", "cpt", "--data", data, "--max-steps", "7", "token_budget=256", "max_doc_tokens=256",
                "log_every=1", "cache_bytes=0"]
    said = {}
    for workers in (0, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert cli.main(["train", "--out", str(tmp_path / f"w{workers}"), *settings, f"workers={workers}"]) == 0
        said[workers] = [s for s in capsys.readouterr().out.splitlines() if "passed over" in s or "skipped" in s]
    assert said[3] == said[0] == [f"{bad}; document skipped",
                                  f"micro-batch 2 of epoch 0 passed over (1 so far): none of its 1 documents could "
                                  f"be read (first: {bad})",
                                  f"micro-batch 2 of epoch 1 passed over (2 so far): none of its 1 documents could "
                                  f"be read (first: {bad})"]
    assert _rows(tmp_path / "w3") == _rows(tmp_path / "w0")

    assert cli.main(["train", "--out", str(tmp_path / "strict"), *settings, "workers=2", "--strict"]) == 2
    errors = [s for s in capsys.readouterr().err.splitlines() if s.startswith("moca train")]
    assert errors == [f"moca train: {bad}"]


def test_a_killed_worker_stops_the_run_with_one_line_naming_it(data, tmp_path, processes):
    run = str(tmp_path / "run")
    process = processes.start([*TRAIN, "--stage", "cpt", "--data", data["documents"], "--out", run, "--max-steps",
                               "100000", "log_every=1", "token_budget=512", "workers=2"])
    processes.wait_for(lambda: os.path.exists(os.path.join(run, "metrics.jsonl")), "step 1", process)
    victim = children(process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert processes.finish(process, timeout=120) == 2
    last = processes.output(process).strip().splitlines()[-1]
    # torch's words: from its SIGCHLD handler, or from its check of the workers while waiting for a batch
    assert re.fullmatch(rf"moca train: DataLoader worker \(pid(\(s\))? {victim}\) (is killed by signal: Killed\."
                        r"|exited unexpectedly)", last), last


def test_the_default_worker_count_follows_the_cores_and_the_device(tmp_path, capsys):
    cuda, default = torch.device("cuda"), DataConfig()
    assert loader.worker_count(default, cuda, cpus=64, ranks=8) == 7  # a node of 8 GPUs and 64 cores
    assert loader.worker_count(default, cuda, cpus=16, ranks=1) == 15
    assert loader.worker_count(default, cuda, cpus=2, ranks=4) == 1
    assert loader.worker_count(default, CPU, cpus=64, ranks=1) == 0  # the model's threads take the cores
    assert loader.worker_count(DataConfig(image_decoder="dali-gpu"), cuda, cpus=64, ranks=8) == 0
    assert loader.worker_count(DataConfig(workers=3), CPU) == 3
    for setting, why in [("workers=-2", "got -2 with image_decoder=pil"),
                         ("image_decoder=dali-cpu", "and 0 with DALI"),
                         ("workers=257", "data.workers takes at most 256")]:
        capsys.readouterr()
        argv = ["train", "--out", str(tmp_path / "run"), "--stage", "cpt", setting]
        assert cli.main(argv + (["workers=2"] if "dali" in setting else [])) == 2
        err = capsys.readouterr().err
        assert why in err and "workers" in err, err
    assert not os.path.exists(tmp_path / "run")


def test_a_worker_plans_an_epoch_only_to_pass_over_a_batch_it_cannot_read(data, tmp_path):
    # the training process plans each epoch (shuffle and pack: seconds and hundreds of MB at 3.4M
    # documents); a ticket carries its batch's documents, so a worker makes it without the plan
    tok, config = ByteTokenizer(), _config(tmp_path, documents=data["documents"])
    entries = index_documents(config, tok, data["documents"])
    dataset = loader.MicroBatches(entries, loader.documents(entries, config, tok), tok,
                                  build("tiny").config, config, 0, 1)
    tickets = loader.micro_batch_tickets(dataset.epochs, 1, 0, 0, 0, 0, 1)
    first, second = next(tickets), next(tickets)
    plan = dataset.epochs(0)
    planned = []
    dataset.epochs = loader.Epochs(lambda epoch: planned.append(epoch) or plan)  # as in a worker: nothing planned
    batch, _, epoch, after = dataset[first]
    assert planned == [] and (epoch, after) == (0, 1) and len(batch["lengths"]) == len(first.indices)
    load = dataset.cache.load

    def second_unreadable(i):
        if i in second.indices:
            raise ValueError(f"cpt.jsonl: document {i} cannot be read")
        return load(i)
    dataset.cache.load = second_unreadable
    with logged() as logs:
        batch, _, epoch, after = dataset[second]  # passed over for batch 2, which only the plan names
    assert planned == [0] and (epoch, after) == (0, 2) and len(batch["lengths"]) == len(plan[2])
    assert logs[-1].startswith("micro-batch 1 of epoch 0 passed over (1 so far)")


class _Stuck:
    """A dataset whose workers never finish a batch (a read wedged on a dead file system)."""

    def __init__(self):
        self.cache = loader.Cache(lambda i: i, lambda _: 0, "document", 0, False)

    def __getitem__(self, ticket):
        time.sleep(60)

    def send(self, item):
        return item

    def receive(self, sent):
        return sent


def test_workers_that_make_no_batch_stop_the_run_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(loader, "WORKER_WAIT_S", 2)
    tickets = iter([loader.Ticket(0, 0, 1, 1, (0,))] * 4)
    made = loader.in_workers(_Stuck(), tickets, 1, 1, False)
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 2 seconds"):
        next(made)
    made.close()
