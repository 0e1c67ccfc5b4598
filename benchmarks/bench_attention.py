"""Attention over packed documents: moca's Triton kernel against its peers, one run on one card.

    python benchmarks/bench_attention.py --out results/           # every case and provider
    python benchmarks/bench_attention.py --cases moca-16k --providers moca flex
    python benchmarks/bench_attention.py --list                   # cases, providers, availability (no GPU needed)
    python benchmarks/bench_attention.py --graph --check ...      # + CUDA-graph replay times, errors against FA2

Providers get the same documents in their own input layout, built outside the timed region:
- moca: varlen_attention, Triton, with the designs its launcher picks on this card;
- moca-fwd-wide, moca-fwd-short (forward only), moca-bwd-atomic, moca-bwd-split, moca-bwd-fused
  (backward only):
  each design forced (MOCA_KERNELS_ATTENTION_FWD / _BWD), so every candidate is timed;
- moca-tma: moca with its experimental TMA loads of K/V (MOCA_KERNELS_TMA=1); forward only;
- moca-bwd-atomic-tma: the atomic backward with MOCA_KERNELS_TMA=1, dQ added by TMA bulk
  reduce-add instead of per-element atomics; backward only;
- moca-flash: varlen_attention(backend="flash"), FlashAttention-2 behind the op;
- sdpa-padded: scaled_dot_product_attention on a padded batch with a key-padding mask (K/V heads
  repeated: with a mask, GQA would leave only the math kernel);
- sdpa-njt: SDPA on nested jagged tensors, PyTorch's FlashAttention-2 varlen kernel (K/V heads
  repeated: it cannot take GQA while training);
- varlen-attn: torch.nn.attention.varlen, the same kernel;
- flex: compiled FlexAttention with a document BlockMask, built once per batch outside the timing;
- flash-attn (FlashAttention-2 flash_attn_varlen_func) and fa3 (flash_attn_interface,
  FlashAttention-3) when importable.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Provider, Unavailable  # noqa: E402

FLOP_CONVENTION = ("forward 4 * sum_docs(len^2) * Hq * D (useful work only: padding and masked tiles do not "
                   "count); backward 2.5x forward; fwd+bwd 3.5x forward")


def _doc_lengths(total: int, low: int, high: int, seed: int) -> list[int]:
    """Random document lengths in [low, high] summing to exactly ``total``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


CASES = {
    **{f"moca-{t // 1024}k": dict(lengths=("random", t, 32, 1280), hq=16, hkv=2, dim=128)
       for t in (16384, 32768, 65536)},
    "docs400-16k": dict(lengths=("equal", 16000, 400), hq=16, hkv=2, dim=128),
    **{f"long-{n // 1024}k": dict(lengths=("equal", 32768, n), hq=16, hkv=2, dim=128) for n in (4096, 8192, 16384)},
    "vision-windows": dict(lengths=("random", 16384, 64, 1024), hq=16, hkv=16, dim=80),
}


def make_case(name: str, dtype: torch.dtype, device: str = "cuda", spec: dict | None = None) -> Case:
    spec = spec or CASES[name]
    kind, total, *rest = spec["lengths"]
    if kind == "random":
        lengths = _doc_lengths(total, rest[0], rest[1], seed=len(name))
    else:
        lengths = [rest[0]] * (total // rest[0])
    hq, hkv, dim = spec["hq"], spec["hkv"], spec["dim"]

    def inputs():
        gen = torch.Generator(device=device).manual_seed(0)
        total = sum(lengths)
        q = torch.randn(total, hq, dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(total, hkv, dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(total, hkv, dim, device=device, dtype=dtype, generator=gen)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
        return dict(q=q, k=k, v=v, cu=cu, lengths=lengths, max_len=max(lengths))

    params = dict(docs=len(lengths), tokens=sum(lengths), max_len=max(lengths), hq=hq, hkv=hkv, dim=dim,
                  dtype=str(dtype).replace("torch.", ""))
    return Case(name, params, fwd_flops=4.0 * sum(n * n for n in lengths) * hq * dim, inputs=inputs)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------

def _moca_forward(x, backend: str = "triton"):
    from moca_kernels import varlen_attention
    q, k, v = _leaf(x["q"]), _leaf(x["k"]), _leaf(x["v"])
    cu, max_len = x["cu"], x["max_len"]
    return (lambda: varlen_attention(q, k, v, cu, cu, max_len, max_len, backend=backend)), (q, k, v)


def setup_moca(x):
    return _moca_forward(x)


def setup_moca_tma(x):
    """moca with MOCA_KERNELS_TMA=1 (the provider's environment); refused where TMA cannot read
    these K/V tensors (the launcher would fall back to moca's loads)."""
    from moca_kernels.varlen_attention import triton_kernels
    d0, d1 = triton_kernels.head_dim_split(x["q"].shape[2])
    if triton_kernels._tma_descriptors(x["k"], d0, d1) is None:
        raise Unavailable("TMA cannot read these K/V tensors; moca-tma would be moca")
    return _moca_forward(x)


def setup_moca_dq_tma(x):
    """The atomic backward with MOCA_KERNELS_TMA=1; refused where the launcher could not add dQ
    through TMA (float32 inputs, a head width the descriptors cannot address)."""
    from moca_kernels.varlen_attention import triton_kernels
    q = x["q"]
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # as the launcher's dQ buffer
    if triton_kernels.dq_tma_descriptors(q, dq) is None:
        raise Unavailable("TMA cannot add this dQ; moca-bwd-atomic-tma would be moca-bwd-atomic")
    return _moca_forward(x)


def setup_moca_flash(x):
    return _moca_forward(x, backend="flash")


def moca_tuning() -> dict:
    from moca_kernels.varlen_attention import triton_kernels
    return triton_kernels.tuning_report()


def setup_sdpa_padded(x):
    lengths, max_len = x["lengths"], x["max_len"]
    batch = len(lengths)
    device = x["q"].device
    mask = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]

    def padded(t):  # (total, H, D) -> (B, H, S, D)
        out = t.new_zeros(batch, max_len, *t.shape[1:])
        out[mask] = t
        return _leaf(out.transpose(1, 2))

    # K/V heads repeated for GQA: with a mask, enable_gqa would leave only the math kernel.
    k_rep, v_rep = _repeat_kv(x)
    q, k, v = padded(x["q"]), padded(k_rep), padded(v_rep)
    key_mask = mask[:, None, None, :]
    f = torch.nn.functional.scaled_dot_product_attention
    return (lambda: f(q, k, v, attn_mask=key_mask)), (q, k, v)


def _repeat_kv(x):
    group = x["q"].shape[1] // x["k"].shape[1]
    return x["k"].repeat_interleave(group, 1), x["v"].repeat_interleave(group, 1)


def setup_sdpa_njt(x):
    offsets = x["cu"].long()
    k_rep, v_rep = _repeat_kv(x)
    q, k, v = _leaf(x["q"]), _leaf(k_rep), _leaf(v_rep)
    f = torch.nn.functional.scaled_dot_product_attention

    def forward():
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
        return f(qn, kn, vn).transpose(1, 2).values()

    return forward, (q, k, v)


def _varlen_attn_unavailable():
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def setup_varlen_attn(x):
    from torch.nn.attention.varlen import varlen_attn
    cu, max_len = x["cu"], x["max_len"]
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        q, k, v = _leaf(x["q"]), _leaf(x["k"]), _leaf(x["v"])
        return (lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len, enable_gqa=True)), (q, k, v)
    k_rep, v_rep = _repeat_kv(x)
    q, k, v = _leaf(x["q"]), _leaf(k_rep), _leaf(v_rep)
    return (lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len)), (q, k, v)


_FLEX = {}


def setup_flex(x):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    total = x["q"].shape[0]
    cu = x["cu"].long()
    doc = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
    start, end = cu[doc], cu[doc + 1]

    # Document bounds indexed by the query row: the form FlexAttention's maintainers advise over
    # comparing document ids.
    def same_document(b, h, q_idx, kv_idx):
        return (kv_idx >= start[q_idx]) & (kv_idx < end[q_idx])

    block_mask = create_block_mask(same_document, None, None, total, total, device=cu.device, _compile=True)
    q, k, v = (_leaf(t.transpose(0, 1).unsqueeze(0)) for t in (x["q"], x["k"], x["v"]))
    return (lambda: _FLEX["fn"](q, k, v, block_mask=block_mask, enable_gqa=True)), (q, k, v)


def setup_flash_attn(x):
    from flash_attn import flash_attn_varlen_func
    q, k, v = _leaf(x["q"]), _leaf(x["k"]), _leaf(x["v"])
    cu, max_len = x["cu"], x["max_len"]
    return (lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)), (q, k, v)


def setup_fa3(x):
    from flash_attn_interface import flash_attn_varlen_func
    q, k, v = _leaf(x["q"]), _leaf(x["k"]), _leaf(x["v"])
    cu, max_len = x["cu"], x["max_len"]

    def forward():
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
        return out[0] if isinstance(out, tuple) else out

    return forward, (q, k, v)


def _triton_unavailable():
    from moca_kernels._registry import triton_device_reason
    return triton_device_reason(torch.device("cuda")) or (None if torch.cuda.is_available() else "no CUDA device")


def _flash_unavailable():
    from moca_kernels.varlen_attention.flash import flash_reasons
    return "; ".join(flash_reasons(None, None)) or None


def _design_env(kind: str, design: str) -> dict:
    from moca_kernels.varlen_attention.triton_kernels import DESIGN_ENV
    return {DESIGN_ENV[kind]: design}


def _moca_providers() -> dict:
    """moca as the user gets it, and each design of the forward and backward on its own."""
    from moca_kernels.varlen_attention.triton_kernels import DESIGNS, TMA_ENV
    base = dict(unavailable=_triton_unavailable, tuning=moca_tuning)
    out = {"moca": Provider("moca", setup_moca, "moca_kernels.varlen_attention, Triton, designs picked on this card",
                            **base)}
    for kind, mode in (("fwd", "fwd"), ("bwd", "bwd")):
        for design in DESIGNS[kind]:
            name = f"moca-{kind}-{design}"
            out[name] = Provider(name, setup_moca, f"moca, {kind} design {design!r} forced", modes=(mode,),
                                 env=_design_env(kind, design), **base)
    out["moca-tma"] = Provider("moca-tma", setup_moca_tma,
                               "moca, K/V loaded through TMA descriptors (MOCA_KERNELS_TMA=1)",
                               modes=("fwd",), env={TMA_ENV: "1"}, **base)
    out["moca-bwd-atomic-tma"] = Provider(
        "moca-bwd-atomic-tma", setup_moca_dq_tma, "moca, bwd design 'atomic', dQ added by TMA bulk reduce-add "
        "(MOCA_KERNELS_TMA=1)", modes=("bwd",), env={TMA_ENV: "1", **_design_env("bwd", "atomic")}, **base)
    out["moca-flash"] = Provider("moca-flash", setup_moca_flash, "varlen_attention(backend='flash'): FlashAttention-2",
                                 _flash_unavailable)
    return out


PROVIDERS = {
    **_moca_providers(),
    "sdpa-padded": Provider("sdpa-padded", setup_sdpa_padded, "SDPA, padded batch + key-padding mask"),
    "sdpa-njt": Provider("sdpa-njt", setup_sdpa_njt, "SDPA on nested jagged tensors (FA2 varlen kernel)"),
    "varlen-attn": Provider("varlen-attn", setup_varlen_attn, "torch.nn.attention.varlen (FA2 varlen kernel)",
                            _varlen_attn_unavailable),
    "flex": Provider("flex", setup_flex, "compiled FlexAttention, document BlockMask"),
    "flash-attn": Provider("flash-attn", setup_flash_attn, "flash_attn_varlen_func (FlashAttention-2)",
                           harness.missing("flash_attn")),
    "fa3": Provider("fa3", setup_fa3, "flash_attn_interface.flash_attn_varlen_func (FlashAttention-3)",
                    harness.missing("flash_attn_interface")),
}


def error_check(x, out: torch.Tensor) -> dict:
    """A provider's forward output against FlashAttention-2's (torch.nn.attention.varlen, computed
    once per case, on a GPU) and against a float32 computation: max |out - ref| / max |ref|.
    ``out`` is in packed (total, H, D) rows or flex's (1, H, total, D); sdpa-padded's padded output
    is not compared."""
    if out.dim() == 4 and out.shape[0] == 1:
        out = out[0].transpose(0, 1)
    if out.dim() != 3 or out.shape[0] != x["q"].shape[0]:
        return {}
    if "fp32" not in x:
        from moca_kernels import varlen_attention
        q, k, v = (x[n].float() for n in "qkv")
        x["fp32"] = varlen_attention(q, k, v, x["cu"], backend="torch")
        if x["q"].is_cuda and _varlen_attn_unavailable() is None:
            forward, _ = setup_varlen_attn(x)
            x["fa2"] = forward().detach()
    out = out.reshape(x["fp32"].shape).float()
    errors = {}
    for name, ref in (("fa2", x.get("fa2")), ("fp32", x["fp32"])):
        if ref is not None:
            ref = ref.float()
            errors[f"err_vs_{name}"] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errors


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], list(PROVIDERS), list(CASES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--graph", action="store_true",
                   help="also time CUDA-graph replays of fwd and fwd+bwd (GPU time without host overhead)")
    p.add_argument("--check", action="store_true",
                   help="record each provider's forward error against FlashAttention-2 and a float32 computation")
    args = p.parse_args(argv)
    harness.check_case_names(args.cases, list(CASES))
    dtype = getattr(torch, args.dtype)
    if args.list:
        for name in args.cases:
            case = make_case(name, dtype)
            print(f"case {name}: {case.params}, forward {case.fwd_flops / 1e12:.2f} TFLOP")
        harness.list_providers(PROVIDERS, args.providers)
        return
    providers = harness.usable(PROVIDERS, args.providers)
    harness.run("varlen attention", [make_case(c, dtype) for c in args.cases], providers, args.modes, args.out,
                FLOP_CONVENTION, graph=args.graph, check=error_check if args.check else None)


if __name__ == "__main__":
    main()
