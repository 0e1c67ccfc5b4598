"""Fused pointwise ops of a Qwen2.5-VL decoder (RMSNorm, rotary embedding, SwiGLU): moca's Triton
kernels against eager PyTorch, torch.compile and Liger-Kernel, one run on one card.

    python benchmarks/bench_pointwise.py --out results/          # every case and provider
    python benchmarks/bench_pointwise.py --cases rmsnorm-3b --providers moca compiled
    python benchmarks/bench_pointwise.py --list

Cases at the 3B shape on a 12,800-token micro-batch, bf16: RMSNorm over hidden 2,048 (and with
the residual add fused in, and the vision tower's 1,280), rotary embedding of 16 query + 2 key
heads of dim 128 (rotated as one (L, 18, 128) tensor so that every provider moves the same
bytes; moca passes it as the queries with an empty key tensor), SwiGLU over the intermediate
size 11,008. Providers:
- moca: moca_kernels.rms_norm / rotary_embedding / swiglu (Triton);
- eager: transformers' Qwen2.5-VL code (Qwen2_5_VLRMSNorm's forward, apply_rotary_pos_emb on
  the attention's transposed (1, H, L, D) views, act(gate) * up);
- compiled: the same under torch.compile;
- liger: Liger-Kernel's LigerRMSNorm, liger_rotary_pos_emb (with a one-head key tensor beside
  the 18-head one: about 5% more bytes) and LigerSiLUMulFunction, when installed.
GB/s count the useful bytes: every input read once and every output written once (weights and
cos/sin included), forward and backward each.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider, Unavailable  # noqa: E402

TOKENS, HIDDEN, VISION_HIDDEN, INTERMEDIATE = 12800, 2048, 1280, 11008
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 128
EPS = 1e-6
CASES = ["rmsnorm-3b", "rmsnorm-res-3b", "rmsnorm-vision", "rope-3b", "swiglu-3b"]


def _spec(name: str) -> dict:
    if name.startswith("rmsnorm"):
        return dict(op="rmsnorm", tokens=TOKENS, hidden=VISION_HIDDEN if "vision" in name else HIDDEN,
                    residual="res" in name)
    if name.startswith("rope"):
        return dict(op="rope", tokens=TOKENS, heads=HEADS + KV_HEADS, head_dim=HEAD_DIM)
    return dict(op="swiglu", tokens=TOKENS, intermediate=INTERMEDIATE)


def make_case(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", spec: dict | None = None) -> Case:
    spec = spec or _spec(name)
    e = torch.finfo(dtype).bits // 8
    tokens = spec["tokens"]

    def inputs():
        gen = torch.Generator(device=device).manual_seed(tokens)
        randn = lambda *shape: torch.randn(*shape, device=device, generator=gen).to(dtype)  # noqa: E731
        if spec["op"] == "rmsnorm":
            return dict(spec, x=randn(tokens, spec["hidden"]), weight=randn(spec["hidden"]),
                        residual=randn(tokens, spec["hidden"]) if spec["residual"] else None)
        if spec["op"] == "rope":
            angles = torch.rand(tokens, spec["head_dim"] // 2, device=device, generator=gen) * 100
            angles = torch.cat([angles, angles], -1)
            return dict(spec, qk=randn(tokens, spec["heads"], spec["head_dim"]), cos=angles.cos().to(dtype),
                        sin=angles.sin().to(dtype))
        return dict(spec, gate=randn(tokens, spec["intermediate"]), up=randn(tokens, spec["intermediate"]))

    if spec["op"] == "rmsnorm":
        n = tokens * spec["hidden"]
        # fwd: x (+ residual) read, y (+ sum) written; bwd: dy (+ d sum), s read, dx written
        streams = 4 if spec["residual"] else 2
        fwd, bwd = streams * n * e, (streams + 1) * n * e
    elif spec["op"] == "rope":
        n = tokens * spec["heads"] * spec["head_dim"]
        fwd = bwd = 2 * n * e + 2 * tokens * spec["head_dim"] * e
    else:
        n = tokens * spec["intermediate"]
        fwd, bwd = 3 * n * e, 5 * n * e
    return Case(name, spec, fwd_flops=float(n), bwd_flop_factor=2.0, inputs=inputs, fwd_bytes=fwd, bwd_bytes=bwd)


def _leaves(x, *names):
    return [x[n].detach().clone().requires_grad_() if x[n] is not None else None for n in names]


def eager_rms(x, weight, residual):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
    s = x + residual if residual is not None else x
    return Qwen2_5_VLRMSNorm.forward(_Norm(weight), s)


class _Norm:
    """Carries the attributes Qwen2_5_VLRMSNorm.forward reads."""

    def __init__(self, weight):
        self.weight, self.variance_epsilon = weight, EPS


def eager_rope(qk, cos, sin):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
    q = qk.transpose(0, 1)[None]  # (1, H, L, D) view, as the attention hands it over
    out, _ = apply_rotary_pos_emb(q, q[:, :0], cos[None], sin[None])
    return out


def eager_swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


EAGER = {"rmsnorm": eager_rms, "rope": eager_rope, "swiglu": eager_swiglu}
_COMPILED: dict = {}


def _args(x):
    """(leaves, the call's arguments) of a case's inputs."""
    if x["op"] == "rmsnorm":
        xs, w, r = _leaves(x, "x", "weight", "residual")
        return [t for t in (xs, w, r) if t is not None], (xs, w, r)
    if x["op"] == "rope":
        qk, = _leaves(x, "qk")
        return [qk], (qk, x["cos"], x["sin"])
    gate, up = _leaves(x, "gate", "up")
    return [gate, up], (gate, up)


def _setup_torch(compiled: bool):
    def setup(x):
        fn = EAGER[x["op"]]
        if compiled:
            fn = _COMPILED.setdefault(x["op"], torch.compile(fn, dynamic=False))
        leaves, args = _args(x)
        return (lambda: fn(*args)), leaves
    return setup


def setup_moca(x):
    from moca_kernels import rms_norm, rotary_embedding, swiglu
    leaves, args = _args(x)
    if x["op"] == "rmsnorm":
        xs, w, r = args
        if r is None:
            return (lambda: rms_norm(xs, w, EPS)), leaves
        return (lambda: _Both.apply(*rms_norm(xs, w, EPS, residual=r))), leaves
    if x["op"] == "rope":
        qk, cos, sin = args
        empty = qk.new_empty(qk.shape[0], 0, qk.shape[2])
        return (lambda: rotary_embedding(qk, empty, cos, sin)[0]), leaves
    return (lambda: swiglu(*args)), leaves


class _Both(torch.autograd.Function):
    """``a`` out of (normalized, residual sum), with the gradient handed to both: the harness
    differentiates one output, and in a decoder the residual stream receives a gradient too."""

    @staticmethod
    def forward(ctx, a, b):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _eager_pair_setup(compiled: bool):
    base = _setup_torch(compiled)

    def setup(x):
        if x["op"] != "rmsnorm" or x["residual"] is None:
            return base(x)
        leaves, (xs, w, r) = _args(x)

        def fn(xs, w, r):
            s = xs + r
            return _Both.apply(eager_rms(s, w, None), s)

        if compiled:
            fn = _COMPILED.setdefault("rmsnorm-res", torch.compile(fn, dynamic=False))
        return (lambda: fn(xs, w, r)), leaves
    return setup


def setup_liger(x):
    leaves, args = _args(x)
    if x["op"] == "rmsnorm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        if x["residual"] is not None:
            raise Unavailable("measured without the residual only (LigerRMSNorm)")
        xs, w, _ = args
        norm = LigerRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)
        norm.weight = torch.nn.Parameter(w)
        return (lambda: norm(xs)), [xs, norm.weight]
    if x["op"] == "rope":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        qk, cos, sin = args
        k = torch.zeros(1, 1, qk.shape[0], qk.shape[2], dtype=qk.dtype, device=qk.device)
        return (lambda: liger_rotary_pos_emb(qk.transpose(0, 1)[None], k, cos[None], sin[None])[0]), leaves
    from liger_kernel.ops import LigerSiLUMulFunction
    gate, up = args
    try:
        LigerSiLUMulFunction.apply(gate[:1], up[:1], 1.0, 1.0)
        return (lambda: LigerSiLUMulFunction.apply(gate, up, 1.0, 1.0)), leaves
    except TypeError:  # versions without the multipliers
        return (lambda: LigerSiLUMulFunction.apply(gate, up)), leaves


PROVIDERS = {
    "moca": Provider("moca", setup_moca, "moca_kernels.pointwise, Triton", harness.missing("triton")),
    "eager": Provider("eager", _eager_pair_setup(False), "transformers' Qwen2.5-VL code, eager"),
    "compiled": Provider("compiled", _eager_pair_setup(True), "the same under torch.compile"),
    "liger": Provider("liger", setup_liger, "Liger-Kernel", harness.missing("liger_kernel")),
}


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], list(PROVIDERS), CASES)
    args = p.parse_args(argv)
    harness.check_case_names(args.cases, CASES)
    if args.list:
        for name in args.cases:
            case = make_case(name, device="cpu")
            print(f"case {name}: {case.params}, forward moves {case.fwd_bytes / 2**20:.0f} MiB, "
                  f"backward {case.bwd_bytes / 2**20:.0f} MiB")
        harness.list_providers(PROVIDERS, args.providers)
        return
    providers = harness.usable(PROVIDERS, args.providers)
    harness.run("Pointwise ops", [make_case(c) for c in args.cases], providers, args.modes, args.out,
                "useful bytes: each input read once, each output written once (forward and backward)")


if __name__ == "__main__":
    main()
