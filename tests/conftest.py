"""Without a CUDA device the Triton kernels run in the interpreter on CPU tensors. The variable
must be set before any Triton kernel is defined, so it is set here, before the tests import."""
import os

import pytest
import torch

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
