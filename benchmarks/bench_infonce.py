"""InfoNCE with in-batch and hard negatives: moca's Triton loss against its peers, one run on one card.

    python benchmarks/bench_infonce.py --out results/              # every case and provider
    python benchmarks/bench_infonce.py --cases b64k-d2048 --providers moca inf-cl matmul
    python benchmarks/bench_infonce.py --list                      # cases, providers, availability

Every case is B = M queries and docs (labels = arange) of bf16 embeddings, L2-normalized inside
the loss, temperature 0.03; "-h2" adds 2 private hard negatives per query, "-sym" the symmetric
loss. Providers:
- moca: moca_kernels.info_nce, Triton;
- dense: what training scripts write: normalize, the (B, M) logits in float32, cross_entropy
  (twice for -sym); the hard negatives' scores concatenated to each row;
- dense-compiled: the same under torch.compile;
- inf-cl: Inf-CL's single-GPU cal_flash_loss (float32 inputs, TF32 products), called twice for
  -sym; it has no private hard negatives, so it skips -h2 cases;
- matmul: one bf16 cuBLAS product of the (B, d) x (d, M) scores, forward only: the card's matrix
  rate at this shape, the ceiling the others are read against.
Peak memory is reported above the inputs, and against the floor of inputs plus gradients.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider, Unavailable  # noqa: E402

FLOP_CONVENTION = ("forward 2 * B * M * d (+ 2 * B * K * d for K hard negatives; the symmetric direction "
                   "reuses the same scores); backward 3x forward; fwd+bwd 8 * B * M * d, the floor for a "
                   "loss that stores no (B, M) matrix")
TEMPERATURE = 0.03


def _case_spec(name: str) -> dict:
    """'b64k-d2048-h2-sym' -> dict(batch=65536, dim=2048, hard=2, symmetric=True)."""
    parts = name.split("-")
    return dict(batch=int(parts[0][1:-1]) * 1024, dim=int(parts[1][1:]), hard=2 if "h2" in parts else 0,
                symmetric="sym" in parts)


CASES = [f"b{n}k-d2048" for n in (1, 4, 16, 64, 256)] + \
    [f"b{n}k-d2048-{v}" for n in (16, 64) for v in ("h2", "sym", "h2-sym")] + \
    [f"b{n}k-d3584" for n in (16, 64)]


def make_case(name: str, dtype: torch.dtype, device: str = "cuda", spec: dict | None = None) -> Case:
    spec = spec or _case_spec(name)
    batch, dim, hard = spec["batch"], spec["dim"], spec["hard"]

    def inputs():
        gen = torch.Generator(device=device).manual_seed(batch + dim)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        return dict(query=randn(batch, dim), docs=randn(batch, dim), hard=randn(batch, hard, dim) if hard else None,
                    labels=torch.arange(batch, device=device), symmetric=spec["symmetric"])

    element = torch.finfo(dtype).bits // 8
    return Case(name, spec, fwd_flops=2.0 * batch * (batch + hard) * dim, bwd_flop_factor=3.0, inputs=inputs,
                input_bytes=element * batch * (2 + hard) * dim)


def _leaves(x):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in (x["query"], x["docs"], x["hard"])]


def setup_moca(x):
    from moca_kernels import info_nce
    q, d, h = _leaves(x)
    return (lambda: info_nce(q, d, labels=x["labels"], hard_negatives=h, symmetric=x["symmetric"],
                             temperature=TEMPERATURE, backend="triton")), [t for t in (q, d, h) if t is not None]


def dense_loss(q, d, h, labels, symmetric: bool):
    f = torch.nn.functional
    q, d = f.normalize(q, dim=-1), f.normalize(d, dim=-1)
    scores = (q @ d.T).float() / TEMPERATURE
    rows = scores
    if h is not None:
        hard = torch.einsum("bd,bkd->bk", q, f.normalize(h, dim=-1)).float() / TEMPERATURE
        rows = torch.cat([scores, hard], 1)
    loss = f.cross_entropy(rows, labels)
    if symmetric:  # each query's positive against every query (labels = arange here, so scores.T)
        loss = 0.5 * (loss + f.cross_entropy(scores.T, labels))
    return loss


def _setup_dense(x, fn):
    q, d, h = _leaves(x)
    return (lambda: fn(q, d, h, x["labels"], x["symmetric"])), [t for t in (q, d, h) if t is not None]


_COMPILED = {}


def setup_dense_compiled(x):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(dense_loss, dynamic=False)
    return _setup_dense(x, _COMPILED["fn"])


def setup_inf_cl(x):
    if x["hard"] is not None:
        raise Unavailable("Inf-CL has no per-query hard negatives")
    from inf_cl import cal_flash_loss
    q, d, _ = _leaves(x)
    labels, f = x["labels"], torch.nn.functional

    def forward():
        qn, dn = f.normalize(q, dim=-1), f.normalize(d, dim=-1)
        loss = cal_flash_loss(qn, dn, labels, scale=1 / TEMPERATURE).mean()
        if x["symmetric"]:
            loss = 0.5 * (loss + cal_flash_loss(dn, qn, labels, scale=1 / TEMPERATURE).mean())
        return loss

    return forward, [q, d]


def setup_matmul(x):
    q, d = x["query"], x["docs"]
    return (lambda: q @ d.T), []


PROVIDERS = {
    "moca": Provider("moca", setup_moca, "moca_kernels.info_nce, Triton + cuBLAS", harness.missing("triton")),
    "dense": Provider("dense", lambda x: _setup_dense(x, dense_loss), "float32 logits + cross_entropy, eager"),
    "dense-compiled": Provider("dense-compiled", setup_dense_compiled, "the same under torch.compile"),
    "inf-cl": Provider("inf-cl", setup_inf_cl, "Inf-CL cal_flash_loss (float32, TF32 products)",
                       harness.missing("inf_cl")),
    "matmul": Provider("matmul", setup_matmul, "bf16 cuBLAS q @ docs.T: the matrix rate", modes=("fwd",)),
}


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], list(PROVIDERS), CASES)
    p.set_defaults(modes=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    harness.check_case_names(args.cases, CASES)
    dtype = getattr(torch, args.dtype)
    if args.list:
        for name in args.cases:
            case = make_case(name, dtype)
            print(f"case {name}: {case.params}, fwd+bwd {case.fwd_flops * 4 / 1e12:.3g} TFLOP, "
                  f"inputs {case.input_bytes / 2**20:.0f} MiB")
        harness.list_providers(PROVIDERS, args.providers)
        return
    providers = harness.usable(PROVIDERS, args.providers)
    harness.run("InfoNCE", [make_case(c, dtype) for c in args.cases], providers, args.modes, args.out,
                FLOP_CONVENTION)
    if PROVIDERS["moca"] in providers:  # what the autotuner chose, per (d, size class, ...) key
        from moca_kernels import _tiled_lse
        for name, kernel in (("forward", _tiled_lse._fwd), ("coef", _tiled_lse._coef)):
            for key, config in kernel.cache.items():
                print(f"moca {name} kernel, key {key}: {config}")


if __name__ == "__main__":
    main()
