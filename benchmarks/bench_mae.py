"""MAE reconstruction loss: moca's CUDA and Triton kernels against PyTorch, one run on one card.

    python benchmarks/bench_mae.py --out results/                  # every case and provider
    python benchmarks/bench_mae.py --cases n16k --providers cuda eager copy
    python benchmarks/bench_mae.py --list

Cases: N rows of P = 4,704 values (one merged Qwen2.5-VL image token), bf16 predictions and
float32 targets (the processor's pixels), every row counted ("-masked": half of them, selected
by a mask, not gathered), norm_pix off ("-norm": on). Providers:
- cuda, triton: moca_kernels.mae_loss, loss and gradient in one pass;
- eager: the PyTorch loss MoCa's code writes (mse over the counted rows), and compiled: the same
  under torch.compile;
- copy: a device-to-device copy of as many bytes as the forward must move: the bandwidth ceiling.
GB/s count the useful bytes: forward reads pred and target and writes the gradient, backward
reads it and writes the scaled one.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider  # noqa: E402

P = 4704
CASES = [f"n{n}k" for n in (1, 4, 16, 64)] + ["n16k-masked", "n16k-norm"]


def _spec(name: str) -> dict:
    parts = name.split("-")
    return dict(rows=int(parts[0][1:-1]) * 1024, masked="masked" in parts, norm_pix="norm" in parts)


def make_case(name: str, device: str = "cuda", spec: dict | None = None, p: int = P) -> Case:
    spec = spec or _spec(name)
    rows = spec["rows"]

    def inputs():
        gen = torch.Generator(device=device).manual_seed(rows)
        x = dict(pred=torch.randn(rows, p, device=device, generator=gen).to(torch.bfloat16),
                 target=torch.randn(rows, p, device=device, generator=gen), norm_pix=spec["norm_pix"])
        x["mask"] = torch.rand(rows, device=device, generator=gen) < 0.5 if spec["masked"] else None
        return x

    pred_bytes, target_bytes = 2 * rows * p, 4 * rows * p
    return Case(name, spec, fwd_flops=3.0 * rows * p, bwd_flop_factor=1 / 3, inputs=inputs,
                fwd_bytes=2 * pred_bytes + target_bytes, bwd_bytes=2 * pred_bytes)


def _leaf(x):
    return x["pred"].detach().clone().requires_grad_()


def _setup_moca(backend):
    def setup(x):
        from moca_kernels import mae_loss
        pred = _leaf(x)
        return (lambda: mae_loss(pred, x["target"], mask=x["mask"], norm_pix=x["norm_pix"], backend=backend)), [pred]
    return setup


def eager_loss(pred, target, mask, norm_pix: bool):
    if mask is not None:
        pred, target = pred[mask], target[mask]
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return torch.nn.functional.mse_loss(pred.float(), target)


_COMPILED = {}


def _setup_eager(compiled: bool):
    def setup(x):
        fn = eager_loss
        if compiled:
            fn = _COMPILED.setdefault("fn", torch.compile(eager_loss, dynamic=False))
        pred = _leaf(x)
        return (lambda: fn(pred, x["target"], x["mask"], x["norm_pix"])), [pred]
    return setup


def setup_copy(x):
    # reads and writes half of the forward's useful bytes each: as many bytes moved in all
    half = (2 * x["pred"].numel() * x["pred"].element_size() + x["target"].numel() * x["target"].element_size()) // 2
    source = torch.empty(half, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return (lambda: target.copy_(source)), []


def _cuda_unavailable():
    from moca_kernels import _cuda
    return _cuda.unavailable_reason()


PROVIDERS = {
    "cuda": Provider("cuda", _setup_moca("cuda"), "moca_kernels.mae_loss, CUDA C++", _cuda_unavailable),
    "triton": Provider("triton", _setup_moca("triton"), "moca_kernels.mae_loss, Triton"),
    "eager": Provider("eager", _setup_eager(False), "gather + mse_loss, eager"),
    "compiled": Provider("compiled", _setup_eager(True), "the same under torch.compile"),
    "copy": Provider("copy", setup_copy, "device-to-device copy of the forward's bytes", modes=("fwd",)),
}


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], list(PROVIDERS), CASES)
    args = p.parse_args(argv)
    harness.check_case_names(args.cases, CASES)
    if args.list:
        for name in args.cases:
            case = make_case(name)
            print(f"case {name}: {case.params}, forward moves {case.fwd_bytes / 2**20:.0f} MiB")
        harness.list_providers(PROVIDERS, args.providers)
        return
    providers = harness.usable(PROVIDERS, args.providers)
    harness.run("MAE loss", [make_case(c) for c in args.cases], providers, args.modes, args.out,
                "useful bytes: forward reads pred (bf16) and target (fp32) and writes d pred; backward reads d pred "
                "and writes the scaled gradient")


if __name__ == "__main__":
    main()
