"""``python -m moca_kernels.check``: does moca work, and is it faster, on this machine?

For each op, backend and design at the shapes of Qwen2.5-VL 3B and 7B (``--quick``: small
shapes), the forward and every gradient are checked against a float64 reference by the numerics
rule (``moca_kernels._verify``: at most twice the error of the plain PyTorch computation in the
same precision, plus a floor) and printed as a pass/fail table. On a CUDA device each op is then
timed (forward and backward, median of ``triton.testing.do_bench``) beside eager and compiled
PyTorch and the peers that are installed (FlashAttention-2, compiled FlexAttention, Liger-Kernel,
Cut Cross-Entropy, Inf-CL), as the ratio of their time to ours. ``--json FILE`` writes the whole
report, to attach to a bug report. The exit status is 1 when any check fails.

On a machine without CUDA the Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``
is set when nothing else is), at the quick shapes in float32 and float16, with nothing timed.

    python -m moca_kernels.check              # 3B and 7B shapes (GPU)
    python -m moca_kernels.check --quick      # small shapes; the CPU subset without a GPU
    python -m moca_kernels.check --ops varlen_attention info_nce --json report.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import (
    __version__,
    info_nce,
    linear_cross_entropy,
    mae_loss,
    rms_norm,
    rotary_embedding,
    swiglu,
    varlen_attention,
)
from ._registry import REGISTRY
from ._verify import VERIFY_ENV, disagreement, error, outputs_and_grads
from .varlen_attention.reference import varlen_attention_reference

OPS = ("varlen_attention", "linear_cross_entropy", "info_nce", "mae_loss", "rms_norm", "rotary_embedding", "swiglu")
# Qwen2.5-VL's language models: hidden size, query and KV heads, MLP width, vocabulary.
MODELS = {"3b": dict(hidden=2048, heads=16, kv_heads=2, mlp=11008, vocab=151936),
          "7b": dict(hidden=3584, heads=28, kv_heads=4, mlp=18944, vocab=152064)}
QUICK = dict(hidden=48, heads=4, kv_heads=2, mlp=96, vocab=300)
# Document lengths of a packed batch: the quick ones cross block edges; the full ones sum to 16,384
# tokens of mixed text and image documents, as a stage-1 micro-batch packs them.
QUICK_LENGTHS = [1, 17, 70, 0, 33]
FULL_LENGTHS = [1, 31, 700, 129, 1280, 517, 4096, 2048, 3000, 1000, 3583]


def _attention_kernels():
    from .varlen_attention import triton_kernels  # after main() chose the interpreter or the GPU
    return triton_kernels


def _engines() -> tuple[tuple[str, dict], ...]:
    """The losses' two engines, each forced by the dense budget's variable."""
    from ._dense_lse import DENSE_ENV
    return ("dense", {DENSE_ENV: str(1 << 40)}), ("tiled", {DENSE_ENV: "0"})


@dataclass
class Case:
    """One op, variant (backend, design or engine) and shape: ``make()`` gives the inputs and the
    positions differentiated; ``ours``/``plain`` compute it (plain: as PyTorch users would, in the
    inputs' precision; in float64 it is the reference); ``env`` selects the variant; ``peers``
    maps a peer's name to a function of the inputs (speed only); ``compiled``: whether
    ``torch.compile`` of ``plain`` is a provider (not for attention, whose plain form loops over
    the documents on the host: compiled FlexAttention is its compiled-PyTorch peer)."""
    op: str
    variant: str
    shape: str
    make: Callable[[], tuple[list[torch.Tensor], Sequence[int]]]
    ours: Callable
    plain: Callable
    env: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)
    compiled: bool = True


@contextlib.contextmanager
def _environment(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _randn(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _attention_cases(m: dict, lengths: list[int], dtype, device, shape: str, timed: bool) -> list[Case]:
    hq, hkv, dim = m["heads"], m["kv_heads"], max(16, m["hidden"] // m["heads"])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = sum(lengths)

    def make():
        heads = (hq, hkv, hkv)
        return [_randn(total, h, dim, dtype=dtype, device=device, seed=i) for i, h in enumerate(heads)], (0, 1, 2)

    def plain(q, k, v):
        accumulate = None if q.dtype == torch.float64 else q.dtype
        return varlen_attention_reference(q, k, v, cu, cu, dim ** -0.5, accumulate=accumulate)[0]

    peers = _attention_peers(cu, total) if timed else {}
    ours = lambda q, k, v: varlen_attention(q, k, v, cu, backend="triton")  # noqa: E731
    cases = [Case("varlen_attention", f"triton fwd={f} bwd={b}", shape, make, ours, plain,
                  {_attention_kernels().DESIGN_ENV["fwd"]: f, _attention_kernels().DESIGN_ENV["bwd"]: b}, peers,
                  compiled=False)
             for f, b in _design_pairs(dim)]
    if device.type == "cuda" and not REGISTRY["varlen_attention"].get("flash").reasons(device, dtype):
        cases.append(Case("varlen_attention", "flash", shape, make,
                          lambda q, k, v: varlen_attention(q, k, v, cu, backend="flash"), plain))
    return cases


def _design_pairs(dim: int) -> list[tuple[str, str]]:
    """Each forward design beside the first backward one, then each other backward design."""
    fwd, bwd = _attention_kernels().offered("fwd", dim), _attention_kernels().offered("bwd", dim)
    return [(f, bwd[0]) for f in fwd] + [(fwd[0], b) for b in bwd[1:]]


def _attention_peers(cu: torch.Tensor, total: int) -> dict:
    def flex(q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        compiled = _compiled("flex", flex_attention)
        doc = torch.searchsorted(cu[1:].long(), torch.arange(total, device=cu.device), right=True)
        start, end = cu.long()[doc], cu.long()[doc + 1]
        mask = _memo("flex-mask", lambda: create_block_mask(
            lambda b, h, qi, ki: (ki >= start[qi]) & (ki < end[qi]), None, None, total, total, device=cu.device))
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)

    return {"flash-attn-2": lambda q, k, v: varlen_attention(q, k, v, cu, backend="flash"), "flex (compiled)": flex}


_MEMO: dict = {}


def _memo(key, make):
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def _compiled(key, fn):
    return _memo(("compiled", key), lambda: torch.compile(fn, dynamic=False))


def _loss_cases(m: dict, rows: int, dtype, device, shape: str, timed: bool) -> list[Case]:
    h, v = m["hidden"], m["vocab"]
    labels = torch.randint(0, v, (rows,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[::7] = -100

    def make_lce():
        return [_randn(rows, h, dtype=dtype, device=device, seed=1),
                _randn(v, h, dtype=dtype, device=device, seed=2, scale=h ** -0.5)], (0, 1)

    lce_peers = {}
    if timed:
        def liger(x, w):
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            return _memo("liger-lce", LigerFusedLinearCrossEntropyLoss)(w, x, labels)

        def cce(x, w):
            from cut_cross_entropy import linear_cross_entropy as cut
            return cut(x, w, labels)

        lce_peers = {"liger": liger, "cut-cross-entropy": cce}
    lce = [Case("linear_cross_entropy", f"triton {name}", shape, make_lce,
                lambda x, w: linear_cross_entropy(x, w, labels, backend="triton"),
                lambda x, w: torch.nn.functional.cross_entropy(x @ w.T, labels), env, lce_peers)
           for name, env in _engines()]

    batch = max(8, rows // 4)

    def make_nce():
        return [_randn(batch, h, dtype=dtype, device=device, seed=4 + i) for i in range(3)], (0, 1, 2)

    nce_peers = {}
    if timed:
        def inf_cl(qv, d, _hard):
            from inf_cl import cal_flash_loss
            f = torch.nn.functional
            return cal_flash_loss(f.normalize(qv, dim=-1), f.normalize(d, dim=-1),
                                  torch.arange(batch, device=device), scale=1 / 0.03).mean()
        nce_peers = {"inf-cl (no hard negatives)": inf_cl}
    nce = [Case("info_nce", f"triton {name}{' symmetric' if sym else ''}", shape, make_nce,
                lambda qv, d, hard, sym=sym: info_nce(qv, d, hard_negatives=hard[:, None], symmetric=sym,
                                                      backend="triton"),
                lambda qv, d, hard, sym=sym: _plain_info_nce(qv, d, hard, sym), env, nce_peers)
           for name, env in _engines() for sym in (False, True)]
    patch = 48 if shape == "quick" else 1176  # Qwen2.5-VL: 3 channels x 2 frames x 14 x 14

    def make_mae():
        return [_randn(rows, patch, dtype=dtype, device=device, seed=8),
                _randn(rows, patch, dtype=dtype, device=device, seed=9)], (0,)

    mae_mask = torch.arange(rows, device=device) % 3 != 0
    mae = [Case("mae_loss", backend, shape, make_mae,
                lambda p, t, backend=backend: mae_loss(p, t, mask=mae_mask, norm_pix=True, backend=backend),
                lambda p, t: mae_loss(p, t, mask=mae_mask, norm_pix=True, backend="torch"))
           for backend in ("cuda", "triton")
           if not REGISTRY["mae_loss"].get(backend).reasons(device, dtype)]
    return lce + nce + mae


def _plain_info_nce(query: torch.Tensor, docs: torch.Tensor, hard: torch.Tensor, symmetric: bool,
                    temperature: float = 0.03) -> torch.Tensor:
    """InfoNCE as a PyTorch user writes it, in the inputs' precision: one hard negative per query,
    positives on the diagonal, the (B, B) scores held."""
    f = torch.nn.functional
    q, d, h = (f.normalize(x, dim=-1) for x in (query, docs, hard))
    scores = q @ d.T / temperature
    rows = torch.cat([scores, (q * h).sum(-1, keepdim=True) / temperature], 1)
    labels = torch.arange(q.shape[0], device=q.device)
    if not symmetric:
        return f.cross_entropy(rows, labels)
    columns = d @ q.T / temperature
    return (0.5 * (rows.logsumexp(1) + columns.logsumexp(1)) - scores.diagonal()).mean()


def _pointwise_cases(m: dict, tokens: int, dtype, device, shape: str, timed: bool) -> list[Case]:
    h, mlp, hq, hkv = m["hidden"], m["mlp"], m["heads"], m["kv_heads"]
    dim = max(16, h // hq)
    sections = [dim // 8, 3 * dim // 16, dim // 2 - dim // 8 - 3 * dim // 16]

    def make_rms():
        return [_randn(tokens, h, dtype=dtype, device=device, seed=10),
                _randn(h, dtype=dtype, device=device, seed=11)], (0, 1)

    def make_rotary():
        return [_randn(tokens, hq, dim, dtype=dtype, device=device, seed=12),
                _randn(tokens, hkv, dim, dtype=dtype, device=device, seed=13),
                _randn(3, tokens, dim, dtype=dtype, device=device, seed=14).cos(),
                _randn(3, tokens, dim, dtype=dtype, device=device, seed=15).sin()], (0, 1)

    def make_swiglu():
        return [_randn(tokens, mlp, dtype=dtype, device=device, seed=16),
                _randn(tokens, mlp, dtype=dtype, device=device, seed=17)], (0, 1)

    rms_peers = {}
    if timed:
        def liger_rms(x, w):
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return LigerRMSNormFunction.apply(x, w, 1e-6)
        rms_peers = {"liger": liger_rms}
    return [
        Case("rms_norm", "triton", shape, make_rms, lambda x, w: rms_norm(x, w, backend="triton"),
             lambda x, w: rms_norm(x, w, backend="torch"), peers=rms_peers),
        Case("rotary_embedding", "triton (M-RoPE)", shape, make_rotary,
             lambda q, k, c, s: rotary_embedding(q, k, c, s, sections, backend="triton"),
             lambda q, k, c, s: rotary_embedding(q, k, c, s, sections, backend="torch")),
        Case("swiglu", "triton", shape, make_swiglu, lambda g, u: swiglu(g, u, backend="triton"),
             lambda g, u: swiglu(g, u, backend="torch")),
    ]


def cases(quick: bool, device: torch.device, ops: Sequence[str]) -> list[Case]:
    """What to check: quick shapes in float32 and float16 on CPU (the interpreter's bfloat16 is not
    trusted), bfloat16 on CUDA; else the 3B and 7B shapes in bfloat16."""
    cpu = device.type == "cpu"
    if quick:
        plans = [("quick", QUICK, QUICK_LENGTHS, 37, dt) for dt in
                 ((torch.float32, torch.float16) if cpu else (torch.bfloat16,))]
    else:
        plans = [(name, m, FULL_LENGTHS, 4096, torch.bfloat16) for name, m in MODELS.items()]
    timed = not cpu
    out = []
    for name, m, lengths, rows, dtype in plans:
        shape = f"{name} {str(dtype).removeprefix('torch.')}"
        out += _attention_cases(m, lengths, dtype, device, shape, timed)
        out += _loss_cases(m, rows, dtype, device, shape, timed)
        out += _pointwise_cases(m, sum(lengths), dtype, device, shape, timed)
    return [c for c in out if c.op in ops]


def check_case(case: Case) -> dict:
    """The case's numbers: each output's and gradient's error against float64 and what the rule
    allows. The kernels' own first-use check is off here: it would serve a failing kernel's calls
    with the PyTorch definition and hide what this check is for."""
    with _environment({**case.env, VERIFY_ENV: "0"}):
        inputs, wrt = case.make()
        try:
            ours = outputs_and_grads(case.ours, inputs, wrt)
        except Exception as exc:  # a kernel that cannot run here is a failure of this check, not of the tool
            return {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
        ref = outputs_and_grads(case.plain, inputs, wrt, torch.float64)
        plain = outputs_and_grads(case.plain, inputs, wrt)
    why = disagreement(case.variant, ours, ref, plain)
    ratios = [error(ours[k], ref[k]) / error(plain[k], ref[k]) for k in ref if error(plain[k], ref[k]) > 0]
    worst = max(ratios, default=None)
    return {"ok": why is None, "why": why, "worst_ratio_to_plain": worst,
            "errors": {k: error(ours[k], ref[k]) for k in ref},
            "plain_errors": {k: error(plain[k], ref[k]) for k in ref}}


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], wrt: Sequence[int]) -> Callable[[], None]:
    leaves = [x.detach().requires_grad_(i in wrt) for i, x in enumerate(inputs)]

    def step():
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), [leaves[i] for i in wrt], allow_unused=True)
    return step


def time_case(case: Case) -> dict:
    """Median forward+backward milliseconds of ours (with the designs and engines it picks itself),
    eager and compiled PyTorch and each peer, and each one's time over ours; a provider that
    cannot run says why."""
    import triton.testing
    inputs, wrt = case.make()
    providers = {"moca": case.ours, "torch eager": case.plain}
    if case.compiled:
        providers["torch compiled"] = _compiled((case.op, case.shape), case.plain)
    providers.update(case.peers)
    with _environment({k: "" for k in case.env}):  # moca's own choice of design and engine
        times = {}
        for name, fn in providers.items():
            try:
                times[name] = triton.testing.do_bench(_fwd_bwd(fn, inputs, wrt), return_mode="median")
            except Exception as exc:  # a missing or failing peer is reported, not fatal
                times[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    ours = times["moca"]
    return {name: {"ms": t, "ratio": t / ours} if isinstance(t, float) and isinstance(ours, float) else {"error": t}
            for name, t in times.items()}


def _table(rows: list[dict]) -> str:
    lines = ["| op | variant | shape | result | worst error / plain's |", "|---|---|---|---|---|"]
    for r in rows:
        c = r["check"]
        lines.append(f"| {r['op']} | {r['variant']} | {r['shape']} | {'pass' if c['ok'] else 'FAIL'} | "
                     f"{_ratio(c.get('worst_ratio_to_plain'))} |")
    failed = [r for r in rows if not r["check"]["ok"]]
    lines += [f"FAIL {r['op']} {r['variant']} {r['shape']}: {r['check']['why']}" for r in failed]
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _speed_table(rows: list[dict]) -> str:
    lines = ["| op | variant | shape | provider | ms (fwd+bwd) | time / moca's |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name, t in r.get("speed", {}).items():
            ms = f"{t['ms']:.3f} | {t['ratio']:.2f}" if "ms" in t else f"- | {t['error']}"
            lines.append(f"| {r['op']} | {r['variant']} | {r['shape']} | {name} | {ms} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moca_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the only ones on a CPU)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops (default: all)")
    parser.add_argument("--no-speed", action="store_true", help="check numbers only, time nothing")
    parser.add_argument("--json", metavar="FILE", help="write the whole report to FILE")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.quick = True
        # the kernels' modules decide at import whether Triton interprets them: they are imported
        # after this (the ops import them on first use)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    started = time.monotonic()
    rows, timed = [], set()
    for case in cases(args.quick, device, args.ops):
        row = {"op": case.op, "variant": case.variant, "shape": case.shape, "check": check_case(case)}
        # each op and shape timed once (with moca's own choices: time_case lifts the variant's)
        if device.type == "cuda" and not args.no_speed and (case.op, case.shape) not in timed:
            timed.add((case.op, case.shape))
            row["speed"] = time_case(case)
        rows.append(row)
        print(f"{case.op:22s} {case.variant:32s} {case.shape:12s} {'pass' if row['check']['ok'] else 'FAIL'}",
              flush=True)
    print("\n" + _table(rows))
    if any("speed" in r for r in rows):
        print("\n" + _speed_table(rows))
    elif device.type == "cpu":
        print("\nNo CUDA device: the Triton kernels ran in the CPU interpreter and nothing was timed.")
    report = {"moca_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "quick": args.quick, "seconds": round(time.monotonic() - started, 1), "rows": rows,
              "triton": _triton_version(), "design_choices": _attention_kernels().tuning_report()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"report: {args.json}")
    failed = sum(not r["check"]["ok"] for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} checks passed in {report['seconds']} s")
    return 1 if failed else 0


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
