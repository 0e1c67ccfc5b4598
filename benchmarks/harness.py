"""Shared benchmark harness: providers, CUDA-event timing, FLOP rates, peak memory, result files.

Every ``bench_<op>.py`` describes its cases and providers and hands them to :func:`run`. A provider
is a name plus a ``setup(inputs)`` that returns ``(forward, leaves)`` or ``(forward, leaves, notes)``:
a callable computing the op on inputs prepared in the provider's own layout (outside the timed
region), the tensors that receive gradients, and a dict recorded in the provider's row; or it
raises :class:`Unavailable` with the reason it cannot run; the harness times the
forward, the backward and both, in one process on one card, and writes ``results.json`` and
``results.md``. Every timed callable runs once untimed first (compilation, autotuning), and a
provider's ``tuning()`` (the configurations its autotuners chose) is recorded in its row after
the timing. With ``graph=True`` the forward and the forward+backward are also captured in a CUDA
graph and its replays timed: GPU time alone, beside the eager call's host overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


class Unavailable(Exception):
    """A provider cannot run this case here (missing package, unsupported shape, out of memory)."""


@dataclass
class Provider:
    name: str
    setup: Callable[[Any], tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]]
    # What the provider is, for the report (e.g. which kernel it dispatches to).
    description: str = ""
    # Why it cannot run on this machine at all (a missing package), or None; checked without a GPU.
    unavailable: Callable[[], str | None] = lambda: None
    # The modes it is timed in, when not all that were asked for (e.g. forward-only variants).
    modes: Sequence[str] | None = None
    # The configurations its autotuners chose, read after the timing and recorded in the row.
    tuning: Callable[[], dict] | None = None
    # Environment variables set while it is set up and timed (e.g. a kernel design), restored after.
    env: dict | None = None


@dataclass
class Case:
    name: str
    params: dict
    # FLOPs of one forward pass; the backward counts ``bwd_flop_factor`` times as many.
    fwd_flops: float
    bwd_flop_factor: float = 2.5
    inputs: Callable[[], Any] | None = None
    # Bytes of the differentiable inputs; when set, rows report (inputs + peak) / (2 * inputs):
    # peak memory against the floor of the inputs plus their gradients.
    input_bytes: int | None = None
    # Bytes a memory-bound op must move in the forward and the backward; when set, rows also
    # report GB/s (the same useful-bytes count for every provider).
    fwd_bytes: int | None = None
    bwd_bytes: int | None = None


def environment() -> dict:
    """Card, versions and commit, recorded beside every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=root).stdout.strip() or None
    except OSError:
        info["commit"] = None
    info["source_sha1"] = source_hash(root)
    return info


def source_hash(root: str) -> str:
    """sha1 of the Python sources of moca_kernels, moca and benchmarks: names the code measured even
    where the checkout's git metadata is stale or the tree has uncommitted changes."""
    digest = hashlib.sha1()
    for folder in ("moca_kernels", "moca", "benchmarks"):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:12]


LONG_CALL_MS = 100.0


def _time_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median milliseconds of ``fn``: triton's do_bench (L2 flushed between calls), except for
    calls of over LONG_CALL_MS, which take the mean of two timed calls (the estimate loop of
    do_bench alone would run them five times). One untimed call comes first, so that compilation
    and autotuning never decide how a call is timed."""
    from triton.testing import do_bench
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        for x in grad_to_none:
            x.grad = None
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for x in grad_to_none:
        x.grad = None
    fn()  # warm-up: compiles and autotunes
    torch.cuda.synchronize()
    if timed() < LONG_CALL_MS:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none), return_mode="median")
    return sum(timed() for _ in range(2)) / 2


def _graph_ms(fn: Callable[[], Any], leaves: Sequence[torch.Tensor]) -> float:
    """Median milliseconds of replaying ``fn`` captured in a CUDA graph (after warm-up on a side
    stream, as capture requires): the GPU time of the call without its host work."""
    from triton.testing import do_bench
    for x in leaves:
        x.grad = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            for x in leaves:
                x.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def measure(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], modes: Sequence[str],
            graph: bool = False) -> dict:
    """Milliseconds of each mode, the peak memory (bytes above the inputs) of one fwd+bwd, and with
    ``graph`` the CUDA-graph replay time of the forward and the forward+backward (``*_graph_ms``,
    or ``graph_skipped`` with the reason the capture failed)."""
    result: dict = {}
    backward = "bwd" in modes or "fwd+bwd" in modes
    out = forward() if backward else None
    grad = torch.randn_like(out) if backward else None
    if "bwd" not in modes:  # keep no graph alive while the other modes run
        del out

    def fwd_bwd():
        forward().backward(grad)

    if "fwd" in modes:
        with torch.no_grad():
            result["fwd_ms"] = _time_ms(forward)
    if "bwd" in modes:
        result["bwd_ms"] = _time_ms(lambda: out.backward(grad, retain_graph=True), leaves)
        del out
    if "fwd+bwd" in modes:
        result["fwd+bwd_ms"] = _time_ms(fwd_bwd, leaves)
    if graph:
        try:
            if "fwd" in modes:
                with torch.no_grad():
                    result["fwd_graph_ms"] = _graph_ms(forward, ())
            if "fwd+bwd" in modes:
                result["fwd+bwd_graph_ms"] = _graph_ms(fwd_bwd, leaves)
        except Exception as exc:  # capture is not open to every provider (host syncs, CPU work)
            result["graph_skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    for x in leaves:
        x.grad = None
    if not leaves:  # nothing to differentiate: the peak of a forward
        fwd_bwd = forward
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    result["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    return result


def rates(case: Case, timings: dict) -> dict:
    """TFLOP/s of each timed mode, from the case's FLOP count."""
    flops = {"fwd": case.fwd_flops, "bwd": case.fwd_flops * case.bwd_flop_factor,
             "fwd+bwd": case.fwd_flops * (1 + case.bwd_flop_factor)}
    out = {f"{mode}_tflops": flops[mode] / (timings[f"{mode}_ms"] * 1e-3) / 1e12
           for mode in MODES if f"{mode}_ms" in timings}
    if case.fwd_bytes is not None:
        moved = {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes or 0, "fwd+bwd": case.fwd_bytes + (case.bwd_bytes or 0)}
        out.update({f"{mode}_gbps": moved[mode] / (timings[f"{mode}_ms"] * 1e-3) / 1e9
                    for mode in MODES if f"{mode}_ms" in timings})
    return out


def parser(description: str, providers: Sequence[str], cases: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--providers", nargs="+", default=list(providers), choices=list(providers), metavar="NAME",
                   help=f"providers to measure (default: all of {', '.join(providers)})")
    p.add_argument("--cases", nargs="+", default=list(cases), metavar="NAME",
                   help="cases to run (default: all); --list shows them")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument("--list", action="store_true", help="list cases and providers (with availability) and exit")
    return p


def missing(module: str) -> Callable[[], str | None]:
    """A Provider's ``unavailable``: why it cannot run when ``module`` is not installed."""
    import importlib.util
    return lambda: None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def list_providers(providers: dict, names: Sequence[str], log: Callable[[str], None] = print) -> None:
    """``--list``: each provider, what it is, and whether it can run here (or why not)."""
    width = max(map(len, names), default=0)
    for name in names:
        why = providers[name].unavailable()
        log(f"provider {name:<{width}} {providers[name].description}: {'available' if not why else why}")


def usable(providers: dict, names: Sequence[str], log: Callable[[str], None] = print) -> list:
    """The named providers that can run here; each one that cannot is reported with its reason."""
    out = []
    for name in names:
        why = providers[name].unavailable()
        if why:
            log(f"provider {name} skipped: {why}")
        else:
            out.append(providers[name])
    return out


def check_case_names(requested: Sequence[str], known: Sequence[str]) -> None:
    unknown = [c for c in requested if c not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(known)}")


@contextlib.contextmanager
def environment_set(env: dict | None):
    """Set the variables of ``env`` for the duration; restore what was there before."""
    before = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(title: str, cases: Sequence[Case], providers: Sequence[Provider], modes: Sequence[str],
        out_dir: str | None, flop_convention: str, log: Callable[[str], None] = print, graph: bool = False,
        check: Callable[[Any, torch.Tensor], dict] | None = None) -> list[dict]:
    """Measure every provider on every case; providers that cannot run a case are reported with
    their reason. ``check(inputs, output)``, when given, compares each provider's forward output
    with baselines and returns ``err_*`` numbers for its row (e.g. the error against
    FlashAttention-2).
    Returns the rows (also written under ``out_dir``)."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks time CUDA kernels: no CUDA device here (use --list to check the setup)")
    env = environment()
    log(f"{title}: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    log(f"FLOP convention: {flop_convention}")
    rows = []
    for case in cases:
        inputs = case.inputs() if case.inputs else None
        for provider in providers:
            row = {"case": case.name, **case.params, "provider": provider.name}
            if provider.env:
                row["env"] = dict(provider.env)
            try:
                with environment_set(provider.env):
                    row.update(_measure_provider(case, provider, inputs, modes, graph, check))
            except Unavailable as why:
                row["skipped"] = str(why)
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"
            except Exception as exc:  # a peer that breaks on a case is reported, not fatal to the run
                row["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            torch.cuda.empty_cache()  # also after an out-of-memory error: the next provider starts clean
            rows.append(row)
            log(format_row(row))
            if out_dir:  # after every row: a run cut short keeps what it measured
                write(out_dir, title, env, flop_convention, rows)
        del inputs
    return rows


def _measure_provider(case: Case, provider: Provider, inputs, modes: Sequence[str], graph: bool,
                      check: Callable[[Any, torch.Tensor], dict] | None) -> dict:
    """One provider on one case: its notes, the check's numbers, timings, rates, memory, tuning."""
    row: dict = {}
    forward, leaves, *notes = provider.setup(inputs)
    row.update(*notes)
    if check is not None:
        with torch.no_grad():
            row.update(check(inputs, forward()))
    timings = measure(forward, leaves, [m for m in modes if m in (provider.modes or modes)], graph)
    row.update(timings, **rates(case, timings))
    if case.input_bytes:
        row["peak_over_floor"] = (case.input_bytes + timings["peak_mem_bytes"]) / (2 * case.input_bytes)
    if provider.tuning is not None:
        row["tuning"] = provider.tuning()
    return row


def format_row(row: dict) -> str:
    head = f"{row['case']:<28} {row['provider']:<14}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    parts = [f"{m} {row[f'{m}_ms']:.3f} ms " + (f"{row[f'{m}_gbps']:.0f} GB/s" if f"{m}_gbps" in row
                                                 else f"{row[f'{m}_tflops']:.0f} TFLOP/s")
             for m in MODES if f"{m}_ms" in row]
    parts += [f"{m} graph {row[f'{m}_graph_ms']:.3f} ms" for m in MODES if f"{m}_graph_ms" in row]
    if "graph_skipped" in row:
        parts.append(f"graph skipped: {row['graph_skipped']}")
    parts += [f"{key} {value:.2e}" for key, value in row.items() if key.startswith("err_")]
    floor = f" ({row['peak_over_floor']:.2f}x floor)" if "peak_over_floor" in row else ""
    return f"{head} " + " | ".join(parts) + f" | peak {row['peak_mem_bytes'] / 2**20:.0f} MiB{floor}"


def write(out_dir: str, title: str, env: dict, flop_convention: str, rows: list[dict]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"title": title, "environment": env, "flop_convention": flop_convention, "rows": rows}, f, indent=1)
    lines = [f"# {title}", "", f"{env['gpu']}; torch {env['torch']}; triton {env['triton']}; commit {env['commit']} "
             f"(sources {env.get('source_sha1')}); {env['date']}", "", f"FLOP convention: {flop_convention}", "",
             "| case | provider | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| peak MiB "
             "| peak / floor | graph fwd ms | graph fwd+bwd ms | error |", "|---" * 13 + "|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['case']} | {row['provider']} | skipped: {row['skipped']} |||||||||||")
            continue
        cells = []
        for m in MODES:
            rate = f"{row[f'{m}_gbps']:.0f} GB/s" if f"{m}_gbps" in row else f"{row.get(f'{m}_tflops', 0):.0f}"
            cells += [f"{row[f'{m}_ms']:.3f}", rate] if f"{m}_ms" in row else ["", ""]
        floor = f"{row['peak_over_floor']:.2f}" if "peak_over_floor" in row else ""
        cells += [f"{row[f'{m}_graph_ms']:.3f}" if f"{m}_graph_ms" in row else "" for m in ("fwd", "fwd+bwd")]
        cells.append(", ".join(f"{key} {value:.2e}" for key, value in row.items() if key.startswith("err_")))
        lines.append(f"| {row['case']} | {row['provider']} | " + " | ".join(cells[:6]) +
                     f" | {row['peak_mem_bytes'] / 2**20:.0f} | {floor} | " + " | ".join(cells[6:]) + " |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
