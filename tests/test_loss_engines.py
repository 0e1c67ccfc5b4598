"""The losses' engines prove their numbers on first use (moca_kernels/_lse_engine.py): an engine
made wrong (one result of the correct one moved by 1% of its largest entry) is rejected on that
very call with a KernelNumericsWarning naming it with its numbers, never runs again for its shape
class, and the other engine (or the float32 reference) serves: the loss and every gradient still
match float64. Correct engines pass unwarned, and are checked once per shape class."""
import os
import sys
import warnings
from collections import Counter

import pytest
import test_info_nce_triton as nce
import test_linear_cross_entropy as lce
import torch

from moca_kernels import _dense_lse, _lse_engine, _tiled_lse, _verify, info_nce, linear_cross_entropy
from moca_kernels._verify import KernelNumericsWarning

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from loss_overhead import count_host_reads  # noqa: E402

FORWARD, BACKWARD = "forward_lse", "backward_products"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with no engine trusted, rejected or warned about, and checking on."""
    monkeypatch.setattr(_lse_engine, "_TRUSTED", set())
    monkeypatch.setattr(_lse_engine, "_REJECTED", {})
    monkeypatch.setattr(_verify, "_WARNED", set())
    monkeypatch.delenv(_verify.VERIFY_ENV, raising=False)


def make_wrong(monkeypatch, module, function: str, result: int, calls: Counter) -> None:
    """``module.function`` computes as before, then moves the last entry (row) of its ``result``-th
    output by 1% of that output's largest magnitude; ``calls`` counts its calls."""
    original = getattr(module, function)

    def wrong(*args, **kwargs):
        calls[module.__name__] += 1
        out = list(original(*args, **kwargs))
        x = out[result].clone()
        x[-1] += 0.01 * x.abs().max()
        out[result] = x
        return tuple(out)

    monkeypatch.setattr(module, function, wrong)


def numerics_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, KernelNumericsWarning)]


def info_nce_matches_float64(device, symmetric=True, seed=0):
    """nce.check: info_nce (Triton backend, as a user calls it) against the float64 dense loss and
    gradients, within the float32 tolerance (a 1% error would fail it)."""
    query, docs, hard, labels, weights = nce.make(37, 70, 2, 40, seed=seed, dtype=torch.float32, device=device)
    nce.check(query, docs, hard, labels, weights, 0.05, symmetric, True, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("wrong,function,result,what", [
    ("dense", FORWARD, 0, "row_lse"),        # the dense engine: what the size picks
    ("dense", FORWARD, 2, "col_lse"),
    ("tiled", BACKWARD, 1, "dk"),            # the tiled engine, picked with the dense budget at 0
    ("tiled", BACKWARD, 0, "dq"),
])
def test_a_wrong_engine_is_rejected_warned_about_and_replaced(wrong, function, result, what, device, monkeypatch):
    if wrong == "tiled":
        monkeypatch.setenv(_dense_lse.DENSE_ENV, "0")
    module = _dense_lse if wrong == "dense" else _tiled_lse
    calls = Counter()
    make_wrong(monkeypatch, module, function, result, calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info_nce_matches_float64(device)
    (message,) = numerics_warnings(caught)
    pass_name = "forward" if function == FORWARD else "backward"
    assert f"the {module.__name__.split('.')[-1]} engine's {pass_name}" in message
    assert f"{what} error" in message and "> allowed" in message, message
    assert calls[module.__name__] == 1
    with warnings.catch_warnings(record=True) as caught:  # the same shape class again
        warnings.simplefilter("always")
        info_nce_matches_float64(device, seed=1)
    assert numerics_warnings(caught) == [] and calls[module.__name__] == 1  # not run again


def test_both_engines_wrong_the_reference_serves(device, monkeypatch):
    calls = Counter()
    make_wrong(monkeypatch, _dense_lse, FORWARD, 1, calls)
    make_wrong(monkeypatch, _tiled_lse, FORWARD, 1, calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info_nce_matches_float64(device)
    messages = numerics_warnings(caught)
    assert len(messages) == 2 and all("pos error" in m for m in messages), messages
    assert "_dense_lse" in messages[0] and "_tiled_lse" in messages[1]
    assert calls == Counter({_dense_lse.__name__: 1, _tiled_lse.__name__: 1})


def test_linear_cross_entropy_wrong_bias_gradient(device, monkeypatch):
    calls = Counter()
    make_wrong(monkeypatch, _dense_lse, BACKWARD, 2, calls)
    hidden, weight, bias, labels = lce.make(29, 301, 24, torch.float32, device, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lce.check("triton", hidden, weight, bias, labels, "mean", rtol=2e-5, atol=2e-5)
    (message,) = numerics_warnings(caught)
    assert "the _dense_lse engine's backward" in message and "dbias error" in message, message


@pytest.mark.parametrize("engine", ["dense", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_correct_engines_pass_once_per_shape_class(engine, dtype, device, monkeypatch):
    monkeypatch.setenv(_dense_lse.DENSE_ENV, "0" if engine == "tiled" else str(1 << 40))
    checks = Counter()
    for name in ("_check_forward", "_check_backward"):
        original = getattr(_lse_engine, name)
        monkeypatch.setattr(_lse_engine, name, lambda *a, _f=original, _n=name: checks.update([_n]) or _f(*a))
    query, docs, hard, labels, _ = nce.make(45, 50, 2, 48, seed=11, dtype=dtype, device=device)
    hidden, weight, bias, targets = lce.make(29, 301, 24, dtype, device, seed=6)

    def step():
        for symmetric in (False, True):
            info_nce(query, docs, labels=labels, hard_negatives=hard, symmetric=symmetric,
                     backend="triton").backward()
        linear_cross_entropy(hidden, weight, targets, bias=bias, backend="triton").backward()

    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelNumericsWarning)
        step()  # info_nce twice (two shape classes), the cross-entropy once: each pass checked
        assert checks == Counter(_check_forward=3, _check_backward=3)
        with count_host_reads(Counter()) as reads:
            step()
    assert checks == Counter(_check_forward=3, _check_backward=3)  # nothing checked again
    assert sum(reads.values()) == 0, reads  # and nothing read on the host


def test_switched_off_nothing_is_checked(device, monkeypatch):
    monkeypatch.setenv(_verify.VERIFY_ENV, "0")
    calls = Counter()
    make_wrong(monkeypatch, _dense_lse, FORWARD, 0, calls)
    query, docs, hard, labels, _ = nce.make(9, 11, 0, 32, seed=8, dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelNumericsWarning)
        out = info_nce(query, docs, labels=labels, reduction="none", backend="triton")
    ref = info_nce(query, docs, labels=labels, reduction="none", backend="torch")
    assert calls[_dense_lse.__name__] == 1
    assert (out - ref).abs().max() > 1e-3  # the wrong engine's result, unchecked, as asked
