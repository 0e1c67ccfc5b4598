"""The losses' fixed cost at the batch sizes a step uses: info_nce at B = 24 to 1,024 and
linear_cross_entropy on a micro-batch's masked rows.

    python benchmarks/loss_overhead.py --count                # CPU: host work per call, no GPU needed
    python benchmarks/loss_overhead.py --out results/         # GPU: results/bench_loss_{info_nce,linear_ce}/

``--count`` runs each path once (forward and backward) on CPU tensors and reports what a call
costs the host: tensor values read on the host (``.item()``, ``.tolist()``, ``bool()``,
``float()``, ``int()``, ``.cpu()``, ``.numpy()``: each a synchronization on a GPU), Triton kernel
launches (counted, not run: the kernels are replaced by stubs, so the results are not computed),
and PyTorch operations that launch work (top-level aten operations other than views and
allocations: an estimate of the eager launches). The tiled and the dense engine are counted
apart (``MOCA_KERNELS_DENSE_MAX_BYTES``).

Without ``--count`` it times, on a GPU, info_nce at B = M = 24, 256, 1,024 (d = 2,048, bf16, 2
hard negatives per query as MoCa's stage 2 uses, and without them so that Inf-CL can join) and
linear_cross_entropy at 256, 1,024 and 4,096 rows of the 3B head, with the providers of
``bench_infonce.py`` / ``bench_linear_ce.py`` plus moca with the dense engine switched off
(``moca-tiled``), each also replayed in a CUDA graph (GPU time without the host's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_infonce  # noqa: E402
import bench_linear_ce  # noqa: E402
import harness  # noqa: E402
from harness import Provider  # noqa: E402

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
NO_LAUNCH = {"aten::view", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::t", "aten::transpose",
             "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias",
             "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::lift_fresh",
             "aten::resolve_conj", "aten::resolve_neg", "aten::permute", "aten::split", "aten::unbind",
             "aten::narrow", "aten::view_as", "aten::numpy_T", "aten::result_type", "aten::is_nonzero",
             "aten::_local_scalar_dense", "aten::item"}
# Composite operations that launch nothing of their own: counted by what they call, if anything.
PASS_THROUGH = {"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten", "aten::matmul", "aten::einsum",
                "aten::linalg_vector_norm"}


@contextlib.contextmanager
def count_host_reads(counts: Counter):
    """Count every call of a Tensor method that reads values on the host."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class _StubLaunch:
    """Stands in for an autotuned Triton kernel: ``kernel[grid](...)`` counts the launch."""

    def __init__(self, name: str, counts: Counter):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
        return launch


def _launching_ops(prof) -> int:
    """Top-level aten operations that launch work (see the module's docstring)."""
    total = 0

    def visit(event, top: bool):
        nonlocal total
        name = event.name
        if not name.startswith("aten::"):
            for child in event.cpu_children:
                visit(child, top)
            return
        if name in PASS_THROUGH:
            for child in event.cpu_children:
                visit(child, top)
            return
        if top and name not in NO_LAUNCH:
            total += 1

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, True)
    return total


def host_work(call, stub_kernels: bool = True) -> dict:
    """What one call of ``call`` (forward and backward) costs the host: host reads by method,
    Triton launches (stubbed), launching PyTorch operations. Stubbed kernels compute nothing to
    check, so the engines' first-call check is off, as it is for every later call of a shape class."""
    from moca_kernels import _tiled_lse, _verify
    reads: Counter = Counter()
    launches: Counter = Counter()
    patches = [(_tiled_lse, "_fwd", _StubLaunch("_fwd_kernel", launches)),
               (_tiled_lse, "_coef", _StubLaunch("_coef_kernel", launches)),
               (_verify, "can_verify", lambda: False)] if stub_kernels else []
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, stub in patches:
        setattr(module, name, stub)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                count_host_reads(reads):
            call()
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    return dict(host_reads=sum(reads.values()), reads=dict(reads), triton_launches=sum(launches.values()),
                torch_ops=_launching_ops(prof))


def info_nce_call(batch: int, dim: int, hard: int, labels_given: bool = True):
    from moca_kernels import info_nce
    gen = torch.Generator().manual_seed(batch)
    q, d = (torch.randn(batch, dim, generator=gen).requires_grad_() for _ in range(2))
    h = torch.randn(batch, hard, dim, generator=gen).requires_grad_() if hard else None
    temp = torch.tensor(0.03, requires_grad=True)
    labels = torch.arange(batch) if labels_given else None

    def call():
        info_nce(q, d, labels=labels, hard_negatives=h, temperature=temp, normalize=True, backend="triton").backward()
    return call


def linear_ce_call(rows: int, hidden: int, vocab: int):
    from moca_kernels import linear_cross_entropy
    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)

    def call():
        linear_cross_entropy(h, w, labels, backend="triton").backward()
    return call


def count(log=print) -> list[dict]:
    """Host work per call of each path at the sizes a step uses (CPU, kernels stubbed)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = []
    cases = [("info_nce", b, dict(batch=b, dim=2048, hard=2)) for b in (24, 256, 1024)] + \
        [("linear_cross_entropy", n, dict(rows=n, hidden=2048, vocab=151936)) for n in (24, 256)]
    for op, size, spec in cases:
        for engine, limit in (("tiled", "0"), ("dense", str(1 << 40))):
            if op == "linear_cross_entropy" and engine == "dense" and size > 24:
                continue  # (256, 151936) float32 logits are past the dense budget, and slow on a CPU
            with harness.environment_set({"MOCA_KERNELS_DENSE_MAX_BYTES": limit}):
                call = info_nce_call(**spec) if op == "info_nce" else linear_ce_call(**spec)
                host_work(call)  # the first call imports and registers
                row = dict(op=op, size=size, engine=engine, **host_work(call))
            rows.append(row)
            log(f"{op:<21} {size:>5} {engine:<6} host reads {row['host_reads']} {row['reads'] or ''} | "
                f"Triton launches {row['triton_launches']} | PyTorch ops {row['torch_ops']}")
    return rows


# --- GPU timing ------------------------------------------------------------------------------------

INFONCE_SIZES = (24, 256, 1024)
LINEAR_CE_ROWS = (256, 1024, 4096)


def _tiled(provider: Provider) -> Provider:
    return Provider(provider.name + "-tiled", provider.setup, provider.description + ", dense engine off",
                    provider.unavailable, env={"MOCA_KERNELS_DENSE_MAX_BYTES": "0"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", action="store_true", help="CPU: host work per call (no GPU needed)")
    p.add_argument("--out", default=None, help="folder for results (GPU timing)")
    args = p.parse_args(argv)
    if args.count:
        count()
        return
    nce = bench_infonce.PROVIDERS
    nce_providers = [nce["moca"], _tiled(nce["moca"]), nce["dense"], nce["dense-compiled"], nce["inf-cl"]]
    cases = []
    for b in INFONCE_SIZES:
        for hard in (0, 2):
            spec = dict(batch=b, dim=2048, hard=hard, symmetric=False)
            cases.append(bench_infonce.make_case(f"nce-b{b}" + ("-h2" if hard else ""), torch.bfloat16, spec=spec))
    out = os.path.join(args.out, "bench_loss_info_nce") if args.out else None
    harness.run("InfoNCE fixed cost", cases, harness.usable({x.name: x for x in nce_providers},
                                                             [x.name for x in nce_providers]),
                ["fwd", "fwd+bwd"], out, bench_infonce.FLOP_CONVENTION, graph=True)
    ce = bench_linear_ce.PROVIDERS
    names = [n for n in ("moca", "compiled", "liger", "cce", "eager") if n in ce]
    ce_providers = [ce[n] for n in names] + [_tiled(ce["moca"])]
    cases = [bench_linear_ce.make_case(f"ce-n{n}-3b", torch.bfloat16, spec=dict(rows=n, hidden=2048, vocab=151936))
             for n in LINEAR_CE_ROWS]
    out = os.path.join(args.out, "bench_loss_linear_ce") if args.out else None
    harness.run("linear_cross_entropy fixed cost", cases, harness.usable({x.name: x for x in ce_providers},
                                                                         [x.name for x in ce_providers]),
                ["fwd", "fwd+bwd"], out, "6 * N * V * H useful FLOPs for fwd+bwd", graph=True)


if __name__ == "__main__":
    main()
