"""Where a training step's time goes: per phase, per module class, and the top kernels, from one
step under the torch profiler (CUDA kernel times on a GPU, CPU op times on CPU).

- Phases come from the named ranges that ``moca.profiling.nvtx`` opens (they are profiler ranges
  too): ``data``, ``forward``, ``backward``, ``optimizer`` and ``all-reduce`` (communication).
  Each gets its host wall time and the device (kernel) time launched inside it; ``other`` is the
  step's rest, so the shares sum to one.
- Module classes: for the duration of the measurement each module of a class runs inside a range
  of that class (``attention``, ``mlp``, ``norms``, ``decoder (rest)``, ``vision``,
  ``embeddings``, ``heads``, ``losses``). An op belongs to its innermost range; its backward (the
  autograd node with the forward op's sequence number) belongs where the forward op did;
  recomputation under checkpointing runs inside a backward node and counts there. Inside a
  compiled region the kernels are fused across modules and count as ``decoder (rest)``/``vision``.
  ``other`` holds the rest (the optimizer among it); the shares sum to one.
- Top kernels: device time per kernel name (CPU: per op), largest first.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.autograd.profiler import record_function

PHASES = {"data": "data", "forward": "forward", "backward": "backward", "optimizer": "optimizer",
          "all-reduce": "communication"}
CLASSES = ("attention", "mlp", "norms", "decoder (rest)", "vision", "embeddings", "heads", "losses", "other")
_PREFIX = "moca.class::"
# The losses are functions, not modules: wrapped where the heads call them.
_LOSSES = (("moca.model.heads", "linear_cross_entropy"), ("moca.model.heads", "mae_loss"),
           ("moca.model.embed", "info_nce"))


def module_classes(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(class, module) for every module of ``module`` that the breakdown times (a stage's module
    or a Qwen2.5-VL model)."""
    compiled: list[str] = []
    for name, m in module.named_modules():
        parts = name.split(".")
        last = parts[-1]
        if any(name.startswith(c + ".") for c in compiled):
            continue  # inside a compiled region: its ops are fused across modules
        if getattr(m, "moca_compiled", False):
            compiled.append(name)
        if "mae_decoder" in parts or "mae_proj" in parts or last == "lm_head":
            if last in ("mae_decoder", "mae_proj", "lm_head"):
                yield "heads", m
        elif last == "visual":
            yield "vision", m
        elif "visual" in parts:
            continue  # the vision tower counts whole
        elif last == "self_attn":
            yield "attention", m
        elif last == "mlp":
            yield "mlp", m
        elif "norm" in type(m).__name__.lower():
            yield "norms", m
        elif parts[-2:-1] == ["layers"]:
            yield "decoder (rest)", m
        elif last in ("embed_tokens", "rotary_emb"):
            yield "embeddings", m


def _ranged(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def class_ranges(module: nn.Module):
    """Each module class's forward (and the loss functions) inside a profiler range of its class,
    while the context lasts."""
    import importlib
    undo = []
    for cls, m in module_classes(module):
        had = "forward" in m.__dict__
        old = m.__dict__.get("forward")
        m.forward = _ranged(_PREFIX + cls, m.forward)
        undo.append((m, had, old))
    patched = []
    for where, name in _LOSSES:
        mod = importlib.import_module(where)
        fn = getattr(mod, name)
        setattr(mod, name, _ranged(_PREFIX + "losses", fn))
        patched.append((mod, name, fn))
    try:
        yield
    finally:
        for m, had, old in undo:
            if had:
                m.forward = old
            else:
                del m.forward
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def _device_self(event, cuda: bool) -> float:
    """An event's own time in microseconds: kernels it launched (CUDA) or its CPU time."""
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def summarize(events, cuda: bool, step_wall_ms: float, top: int = 15) -> dict:
    """The breakdown of one profiled step's ``events`` (``profile.events()``); ``step_wall_ms``:
    the step's wall time."""
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]  # kernels count through them
    roots = [e for e in host if e.cpu_parent is None]
    total = sum(_device_self(e, cuda) for e in host) / 1e3
    phases = defaultdict(lambda: dict(host_ms=0.0, device_ms=0.0))
    classes = defaultdict(float)
    by_sequence: dict[tuple[int, int], str] = {}

    def visit(event, phase: str | None, cls: str | None, backward_cls: str | None):
        if event.name in PHASES:
            phase = PHASES[event.name]
            phases[phase]["host_ms"] += event.cpu_time_total / 1e3
        if event.name.startswith(_PREFIX):
            cls = event.name[len(_PREFIX):]
        if event.name.startswith("autograd::engine::evaluate_function"):
            backward_cls = by_sequence.get((event.fwd_thread, event.sequence_nr))
            cls = None  # recomputation inside opens its own ranges; else the node's class
        elif cls is not None and event.sequence_nr >= 0:
            by_sequence.setdefault((event.thread, event.sequence_nr), cls)
        own = _device_self(event, cuda) / 1e3
        if phase is not None:
            phases[phase]["device_ms"] += own
        classes[cls or backward_cls or "other"] += own
        for child in event.cpu_children:
            visit(child, phase, cls, backward_cls)

    for root in sorted(roots, key=lambda e: e.time_range.start):
        visit(root, None, None, None)
    covered_host = sum(p["host_ms"] for p in phases.values())
    out_phases = {}
    for name in dict.fromkeys(PHASES.values()):
        p = phases.get(name, dict(host_ms=0.0, device_ms=0.0))
        out_phases[name] = dict(host_ms=round(p["host_ms"], 3), device_ms=round(p["device_ms"], 3),
                                share=round(p["host_ms"] / step_wall_ms, 4) if step_wall_ms else 0.0)
    rest = max(0.0, step_wall_ms - covered_host)
    out_phases["other"] = dict(host_ms=round(rest, 3),
                               device_ms=round(max(0.0, total - sum(p["device_ms"] for p in phases.values())), 3),
                               share=round(rest / step_wall_ms, 4) if step_wall_ms else 0.0)
    out_classes = {c: dict(device_ms=round(classes.get(c, 0.0), 3),
                           share=round(classes.get(c, 0.0) / total, 4) if total else 0.0) for c in CLASSES}
    kernels = defaultdict(lambda: [0.0, 0])
    for e in events:
        if cuda:
            for k in e.kernels:
                kernels[k.name][0] += k.duration / 1e3
                kernels[k.name][1] += 1
        elif e.device_type == torch.autograd.DeviceType.CPU and not e.name.startswith(_PREFIX) \
                and e.name not in PHASES and not e.name.startswith("autograd::engine") and e.self_cpu_time_total:
            kernels[e.name][0] += e.self_cpu_time_total / 1e3
            kernels[e.name][1] += 1
    busy = sum(ms for ms, _ in kernels.values()) if cuda else total
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(timer="cuda kernels" if cuda else "cpu ops", step_ms=round(step_wall_ms, 3),
                busy_ms=round(busy, 3), busy_share=round(busy / step_wall_ms, 4) if step_wall_ms else 0.0,
                phases=out_phases, classes=out_classes,
                top_kernels=[dict(name=n[:120], ms=round(ms, 3), calls=c, share=round(ms / busy, 4) if busy else 0.0)
                             for n, (ms, c) in ranked])


def measure(step: Callable[[], object], module: nn.Module, device: torch.device, top: int = 15) -> tuple[dict, object]:
    """Run ``step`` once under the profiler with ``module``'s class ranges: (its summary
    (``summarize``), what ``step`` returned). Warm ``step`` up first: compilation and autotuning
    would count."""
    import time

    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with class_ranges(module), profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        returned = step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - started) * 1e3
    return summarize(prof.events(), cuda, wall, top), returned


def table(result: dict) -> str:
    """The breakdown as Markdown tables: phases, module classes, top kernels."""
    lines = [f"step {result['step_ms']:.1f} ms wall; {result['timer']} busy {result['busy_ms']:.1f} ms "
             f"({result['busy_share']:.0%} of the wall time)", "",
             "| phase | host ms | device ms | share of wall |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['host_ms']:.1f} | {p['device_ms']:.1f} | {p['share']:.1%} |"
              for n, p in result["phases"].items()]
    lines += ["", "| module class | device ms | share |", "|---|---|---|"]
    lines += [f"| {n} | {c['device_ms']:.1f} | {c['share']:.1%} |" for n, c in result["classes"].items()]
    lines += ["", "| kernel | ms | calls | share |", "|---|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['ms']:.2f} | {k['calls']} | {k['share']:.1%} |" for k in result["top_kernels"]]
    return "\n".join(lines)
