"""Host synchronisations of a training step, counted on CPU: every call that would make the host
wait for a GPU (``item``, ``tolist``, ``bool``, ``int``, ``float``, ``cpu``, ``numpy``,
``nonzero``) made on the training thread during one step of each stage, by call site. The data
pipeline runs on its own thread (``prefetch=1``) and is not counted.

The step's own syncs are the ones the data needs: each stage reads its logged values once a
step (the NaN guard needs the loss), and stage 1 finds the MLM rows on the host before the batch
moves;
the attention reads each distinct ``cu_seqlens`` once per batch (the vision tower's windows and
images, the language model's documents), whatever the number of layers. Not asserted: what
transformers' Qwen2.5-VL reads from ``image_grid_thw`` (on the device: its rotary positions,
window index and image split, about 6 reads a micro-batch; its window loop's reads are of host
tensors), and the checks inside the loss ops."""
import collections
import contextlib
import os
import threading
import traceback

import pytest
import torch

from moca import checkpoint
from moca.config import Config
from moca.parallel import Single
from moca.stages import STAGES

METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site() -> str:
    """The innermost caller outside torch: 'package/file.py:function'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}torch{os.sep}" not in frame.filename:
            path = frame.filename
            path = os.path.relpath(path, ROOT) if path.startswith(ROOT) and ".venv" not in path else \
                path.split("site-packages" + os.sep)[-1]
            return f"{path}:{frame.name}"
    return "?"


@contextlib.contextmanager
def counting():
    """Counter of (method, call site) for the syncing calls made on this thread."""
    calls, thread, saved = collections.Counter(), threading.get_ident(), {}

    def counted(name, original):
        def call(*args, **kwargs):
            if threading.get_ident() == thread:
                calls[(name, _site())] += 1
            return original(*args, **kwargs)
        return call

    for name in METHODS:
        saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, counted(name, saved[(torch.Tensor, name)]))
    saved[(torch, "nonzero")] = torch.nonzero
    torch.nonzero = counted("nonzero", saved[(torch, "nonzero")])
    try:
        yield calls
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def _step_syncs(tmp_path, stage_name: str) -> collections.Counter:
    config = Config().update({"run.stage": stage_name, "out": str(tmp_path), "token_budget": 512, "prefetch": 1,
                              "cl.pairs_per_batch": 4, "cpt.grad_accum": 2})
    model, tokenizer = checkpoint.model_and_tokenizer(config, lambda *a, **k: None)
    stage = STAGES[stage_name](config, model, tokenizer, Single())
    stage.start(0, 0, 0)
    try:
        stage.step(contextlib.nullcontext(), False)  # a warm-up step: caches and lazy imports
        with counting() as calls:
            stage.step(contextlib.nullcontext(), False)
    finally:
        stage.close()
    return calls


def _by_file(calls, prefix: str) -> int:
    return sum(n for (_, site), n in calls.items() if site.startswith(prefix))


def test_counting_sees_a_sync():
    with counting() as calls:
        torch.ones(2).sum().item()
        bool(torch.ones(1))
    assert calls[("item", f"tests{os.sep}test_host_syncs.py:test_counting_sees_a_sync")] == 1
    assert sum(calls.values()) == 2


@pytest.fixture
def torch_attention(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "torch")


def test_a_stage_one_step_syncs_only_where_the_data_needs_it(tmp_path, torch_attention):
    calls = _step_syncs(tmp_path, "cpt")
    ours = {key: n for key, n in calls.items() if key[1].startswith("moca" + os.sep)}
    assert ours == {("tolist", f"moca{os.sep}stages.py:step"): 1,  # the step's losses, read once
                    ("nonzero", f"moca{os.sep}stages.py:step"): 2}, ours  # MLM rows of each micro-batch, on the host
    # each distinct cu_seqlens of a micro-batch read once (the language model's, the vision
    # tower's windows and images): 2 micro-batches x at most 3, whatever the number of layers
    assert _by_file(calls, f"moca_kernels{os.sep}varlen.py") <= 6


def test_a_stage_two_step_counts(tmp_path, torch_attention):
    calls = _step_syncs(tmp_path, "cl")
    ours = collections.Counter()
    for (_, site), n in calls.items():
        if site.startswith("moca" + os.sep) and not site.startswith(f"moca{os.sep}data"):  # data: host tensors
            ours[site] += n
    # the loss (NaN guard and log), accuracy and temperature, read together
    assert ours == {f"moca{os.sep}stages.py:step": 1}, ours
    assert _by_file(calls, f"moca_kernels{os.sep}varlen.py") <= 2 * 3 + 2  # per packed row, and segment_mean's check
