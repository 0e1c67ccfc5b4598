"""The step breakdown on CPU (CPU op times in place of kernel times): every phase and module
class is there, the shares sum to one, a backward counts with its forward's module class, and
the trainer prints it and writes breakdown.json on request."""
import json
import logging

import pytest
import torch
from torch import nn

from moca import breakdown
from moca.config import Config
from moca.profiling import nvtx
from moca.train import train


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(768, 768), nn.Linear(768, 768))  # products far above the rest's time

    def forward(self, x, y):
        return self.mlp(x).sum() + self.self_attn(y).sum()


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])

    def forward(self, x, y):
        return self.layers[0](x, y)


def test_a_backward_counts_with_its_forward_module_class_and_shares_sum_to_one():
    torch.manual_seed(0)
    toy = _Toy()
    optimizer = torch.optim.AdamW(toy.parameters(), foreach=True)
    x, y = torch.randn(1024, 768), torch.randn(4, 8)

    def step():
        with nvtx("data"):
            batch = (x.clone(), y.clone())
        with nvtx("forward"):
            loss = toy(*batch)
        with nvtx("backward"):
            loss.backward()
        with nvtx("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        return loss

    step()
    found, loss = breakdown.measure(step, toy, torch.device("cpu"))
    assert isinstance(loss, torch.Tensor)
    phases, classes = found["phases"], found["classes"]
    assert list(phases) == ["data", "forward", "backward", "optimizer", "communication", "other"]
    assert all(phases[p]["host_ms"] > 0 for p in ("data", "forward", "backward", "optimizer"))
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1, abs=0.01)
    assert list(classes) == list(breakdown.CLASSES)
    assert sum(c["share"] for c in classes.values()) == pytest.approx(1, abs=0.01)
    # the MLP's products dominate the forward and the backward, and its backward (two more
    # products per layer) counts with it: nearly all of both phases is the MLP's; the
    # optimizer's work (outside every module) is "other"
    passes = phases["forward"]["device_ms"] + phases["backward"]["device_ms"]
    assert classes["mlp"]["device_ms"] > 0.8 * passes and classes["mlp"]["device_ms"] > phases["forward"]["device_ms"]
    assert classes["other"]["device_ms"] >= 0.95 * phases["optimizer"]["device_ms"]
    assert 0 < classes["attention"]["device_ms"] < classes["mlp"]["device_ms"] / 10
    kernels = [k["ms"] for k in found["top_kernels"]]
    assert kernels == sorted(kernels, reverse=True) and found["top_kernels"][0]["name"] in ("aten::mm", "aten::addmm")
    assert "| mlp |" in breakdown.table(found)
    assert "forward" not in toy.layers[0].mlp.__dict__  # the class ranges are gone again


def test_the_trainer_prints_and_writes_the_breakdown_of_a_step(tmp_path, caplog):
    """Stage 2 (stage 1's breakdown runs in tests/test_benchmarks.py, through the step benchmark)."""
    stage = "cl"
    config = Config().update({"run.stage": stage, "out": str(tmp_path), "max_steps": 2, "log_every": 1,
                              "token_budget": 512, "cl.pairs_per_batch": 4, "breakdown": True})
    caplog.set_level(logging.INFO, logger="moca")
    train(config)
    found = json.loads((tmp_path / "breakdown.json").read_text())
    assert any("| attention |" in line for line in caplog.messages)
    phases, classes = found["phases"], found["classes"]
    assert all(phases[p]["host_ms"] > 0 for p in ("data", "forward", "backward", "optimizer"))
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1, abs=0.02)
    assert sum(c["share"] for c in classes.values()) == pytest.approx(1, abs=0.01)
    used = ("attention", "mlp", "norms", "vision", "losses")
    assert all(classes[c]["device_ms"] > 0 for c in used), classes
