"""Without a CUDA device the Triton kernels run in the interpreter on CPU tensors. The variable
must be set before any Triton kernel is defined, so it is set here, before the tests import."""
import os
import signal

import pytest
import torch
from processes import Processes

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check results, not speed: one launch configuration per shape class instead of autotuning.
os.environ.setdefault("MOCA_KERNELS_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the Triton path runs: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def processes(tmp_path) -> Processes:
    """Processes the test starts (``tests/processes.py``), all killed when it ends."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture(autouse=True)
def deadline(request):
    """In a module that sets ``DEADLINE`` (seconds), a test still running then fails with
    TimeoutError instead of stalling the suite (a reader blocked on a FIFO, a loop that does not
    end)."""
    seconds = getattr(request.module, "DEADLINE", None)
    if seconds is None:
        yield
        return

    def expire(*_):
        raise TimeoutError(f"over the {seconds} s deadline of {request.module.__name__}")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
