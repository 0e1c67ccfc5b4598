"""Masked-LM head + cross-entropy: moca's Triton loss against its peers, one run on one card.

    python benchmarks/bench_linear_ce.py --out results/                   # every case and provider
    python benchmarks/bench_linear_ce.py --cases n16k-3b --providers moca liger cce
    python benchmarks/bench_linear_ce.py --list

Cases: N masked tokens (4k to 32k) through Qwen2.5-VL's LM head, "3b" (H 2,048, V 151,936) or
"7b" (H 3,584, V 152,064), bf16, no bias, no ignored rows (the masked rows are gathered first).
Providers:
- moca: moca_kernels.linear_cross_entropy (Triton + cuBLAS; float32 weight-gradient accumulation);
- eager: bf16 logits, float32 cross_entropy; compiled: the same under torch.compile;
- liger: Liger-Kernel's LigerFusedLinearCrossEntropyLoss as MoCa's code calls it (bf16 weight-
  gradient accumulation); liger-fp32: the same with accum_dtype=float32;
- cce: Cut Cross-Entropy's linear_cross_entropy (default gradient filtering); cce-exact: the same
  without filtering (filter_eps=None);
- matmul: the forward's bf16 logits product alone: the card's matrix rate at this shape.
TFLOP/s count useful work: 2*N*V*H forward, 6*N*V*H forward + backward (moca recomputes the logits:
8*N*V*H executed). Peak memory is also given against hidden and weight plus their gradients.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider  # noqa: E402

SHAPES = {"3b": (2048, 151936), "7b": (3584, 152064)}
CASES = [f"n{n}k-{s}" for s in SHAPES for n in (4, 8, 16, 32)]


def _spec(name: str) -> dict:
    rows, shape = name.split("-")
    hidden, vocab = SHAPES[shape]
    return dict(rows=int(rows[1:-1]) * 1024, hidden=hidden, vocab=vocab)


def make_case(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", spec: dict | None = None) -> Case:
    spec = spec or _spec(name)
    n, h, v = spec["rows"], spec["hidden"], spec["vocab"]

    def inputs():
        gen = torch.Generator(device=device).manual_seed(n + v)
        return dict(hidden=torch.randn(n, h, device=device, dtype=dtype, generator=gen),
                    weight=torch.randn(v, h, device=device, dtype=dtype, generator=gen) * 0.02,
                    labels=torch.randint(0, v, (n,), device=device, generator=gen))

    element = torch.finfo(dtype).bits // 8
    return Case(name, spec, fwd_flops=2.0 * n * v * h, bwd_flop_factor=2.0, inputs=inputs,
                input_bytes=element * (n + v) * h)


def _leaves(x):
    return x["hidden"].detach().clone().requires_grad_(), x["weight"].detach().clone().requires_grad_()


def setup_moca(x):
    from moca_kernels import linear_cross_entropy
    h, w = _leaves(x)
    return (lambda: linear_cross_entropy(h, w, x["labels"], backend="triton")), [h, w]


def eager_loss(hidden, weight, labels):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels)


_COMPILED = {}


def setup_eager(x, compiled=False):
    fn = _COMPILED.setdefault("fn", torch.compile(eager_loss, dynamic=False)) if compiled else eager_loss
    h, w = _leaves(x)
    return (lambda: fn(h, w, x["labels"])), [h, w]


def _setup_liger(accum_dtype):
    def setup(x):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        loss_fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=accum_dtype)
        h, w = _leaves(x)
        return (lambda: loss_fn(w, h, x["labels"])), [h, w]
    return setup


def _setup_cce(filter_eps):
    def setup(x):
        from cut_cross_entropy import linear_cross_entropy
        h, w = _leaves(x)
        return (lambda: linear_cross_entropy(h, w, x["labels"], filter_eps=filter_eps)), [h, w]
    return setup


def setup_matmul(x):
    h, w = x["hidden"], x["weight"]
    return (lambda: h @ w.T), []


PROVIDERS = {
    "moca": Provider("moca", setup_moca, "moca_kernels.linear_cross_entropy, Triton + cuBLAS",
                     harness.missing("triton")),
    "eager": Provider("eager", setup_eager, "bf16 logits + float32 cross_entropy"),
    "compiled": Provider("compiled", lambda x: setup_eager(x, compiled=True), "the same under torch.compile"),
    "liger": Provider("liger", _setup_liger(None), "LigerFusedLinearCrossEntropyLoss (bf16 dW accumulation)",
                      harness.missing("liger_kernel")),
    "liger-fp32": Provider("liger-fp32", _setup_liger(torch.float32), "the same, accum_dtype=float32",
                           harness.missing("liger_kernel")),
    "cce": Provider("cce", _setup_cce("high"), "Cut Cross-Entropy, gradient filtering",
                    harness.missing("cut_cross_entropy")),
    "cce-exact": Provider("cce-exact", _setup_cce(None), "Cut Cross-Entropy, filter_eps=None",
                          harness.missing("cut_cross_entropy")),
    "matmul": Provider("matmul", setup_matmul, "bf16 logits product alone: the matrix rate", modes=("fwd",)),
}


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], list(PROVIDERS), CASES)
    p.set_defaults(modes=["fwd", "fwd+bwd"])
    args = p.parse_args(argv)
    harness.check_case_names(args.cases, CASES)
    if args.list:
        for name in args.cases:
            case = make_case(name)
            print(f"case {name}: {case.params}, fwd+bwd {case.fwd_flops * 3 / 1e12:.3g} TFLOP useful, "
                  f"inputs {case.input_bytes / 2**20:.0f} MiB")
        harness.list_providers(PROVIDERS, args.providers)
        return
    providers = harness.usable(PROVIDERS, args.providers)
    harness.run("masked-LM linear cross-entropy", [make_case(c) for c in args.cases], providers, args.modes,
                args.out, "useful work: forward 2*N*V*H, forward + backward 6*N*V*H")


if __name__ == "__main__":
    main()
