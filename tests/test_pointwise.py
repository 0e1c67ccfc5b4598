"""The fused pointwise ops (RMSNorm, rotary embedding with M-RoPE sections, SwiGLU) on their Triton
path (the interpreter on CPU, float32 and float16) against transformers' own Qwen2.5-VL code,
forward and every gradient, odd sizes; and a tiny Qwen2.5-VL patched to use them against the
unpatched one."""
import copy

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from moca_kernels.pointwise import rms_norm, rotary_embedding, swiglu
from moca_kernels.pointwise.hf import apply_fused_pointwise
from moca_kernels.pointwise.op import rms_norm_fwd, rotary_embedding_op, swiglu_fwd


def _leaf(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()


def _close_as_torch(ours, torch_low, exact, what):
    """Error against the float64 result at most 2x PyTorch's own in the same precision, plus one
    rounding of the output."""
    rounding = torch.finfo(ours.dtype).eps / 2 if ours.dtype != torch.float32 else 1e-6  # one output rounding
    ours, torch_low, exact = (x.detach().cpu().double() for x in (ours, torch_low, exact))
    err = (ours - exact).abs().max().item()
    scale = exact.abs().max().item()
    bound = 2 * (torch_low - exact).abs().max().item() + rounding * scale + 1e-6
    assert err <= bound, f"{what}: error {err:.3g} against float64, above 2x PyTorch's in {ours.dtype} ({bound:.3g})"


def _check(fn_ours, fn_torch, inputs, what, grads_of=None):
    """Outputs and gradients of ``fn_ours`` against ``fn_torch`` in the inputs' precision and
    against ``fn_torch`` in float64."""
    grads_of = grads_of if grads_of is not None else range(len(inputs))
    exact_inputs = [x.detach().cpu().double().requires_grad_(x.requires_grad) for x in inputs]
    outs = [fn(*xs) for fn, xs in ((fn_ours, inputs), (fn_torch, inputs), (fn_torch, exact_inputs))]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    gen = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs[2]]
    grads = []
    for out, xs in zip(outs, (inputs, inputs, exact_inputs)):
        leaves = [xs[i] for i in grads_of]
        grads.append(torch.autograd.grad(out, leaves, [c.to(o.device, o.dtype) for c, o in zip(cotangents, out)]))
    for i, (a, b, c) in enumerate(zip(*outs)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} output {i}: {a.dtype} {a.shape} vs {b.dtype}"
        _close_as_torch(a, b, c, f"{what} output {i}")
    for i, (a, b, c) in enumerate(zip(*grads)):
        assert a.dtype == b.dtype, f"{what} gradient {i}: {a.dtype} vs {b.dtype}"
        _close_as_torch(a, b, c, f"{what} gradient {i}")


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 1), (5, 37), (9, 130)])
def test_rms_norm_matches_transformers(rows, hidden, dtype, device):
    gen = torch.Generator().manual_seed(rows * hidden)
    x = _leaf(gen, 1, rows, hidden, dtype=dtype, device=device, scale=3.0)
    weight = _leaf(gen, hidden, dtype=dtype, device=device)
    module = hf.Qwen2_5_VLRMSNorm(hidden, eps=1e-6)

    def theirs(x, w):  # the module's own forward, with w as its weight
        return torch.func.functional_call(module.to(x.device), {"weight": w}, (x,))

    _check(lambda x, w: rms_norm(x, w, 1e-6, backend="triton"), theirs, [x, weight], "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype, device):
    gen = torch.Generator().manual_seed(3)
    x, res = (_leaf(gen, 6, 45, dtype=dtype, device=device) for _ in range(2))
    weight = _leaf(gen, 45, dtype=dtype, device=device)
    module = hf.Qwen2_5_VLRMSNorm(45, eps=1e-5)

    def theirs(x, r, w):
        total = x + r
        return torch.func.functional_call(module.to(x.device), {"weight": w}, (total,)), total

    _check(lambda x, r, w: rms_norm(x, w, 1e-5, residual=r, backend="triton"), theirs, [x, res, weight],
           "rms_norm residual")


def _rotary_module(head_dim, sections):
    config = hf.Qwen2_5_VLTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                     rope_parameters={"rope_type": "default", "mrope_section": sections,
                                                      "rope_theta": 1e4})
    return hf.Qwen2_5_VLRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hq, hk, head_dim, sections", [(7, 3, 1, 20, [4, 3, 3]), (11, 4, 2, 16, [2, 3, 3]),
                                                                (1, 2, 2, 12, [0, 6, 0])])
def test_rotary_with_mrope_sections_matches_transformers(tokens, hq, hk, head_dim, sections, dtype, device):
    gen = torch.Generator().manual_seed(tokens + head_dim)
    rotary = _rotary_module(head_dim, sections)
    positions = torch.randint(0, 50, (3, 1, tokens), generator=gen)  # temporal, height, width differ
    # ours takes the three planes of cos/sin and picks each column's plane itself.
    freqs = positions[:, 0, :, None].float() * rotary.inv_freq
    planes = torch.cat([freqs, freqs], -1)
    cos, sin = planes.cos().to(device, dtype), planes.sin().to(device, dtype)
    # q, k as the attention makes them: (1, H, L, D) transposed views of (L, H, D) projections.
    q = _leaf(gen, tokens, hq, head_dim, dtype=dtype, device=device)
    k = _leaf(gen, tokens, hk, head_dim, dtype=dtype, device=device)

    def theirs(q, k):  # transformers' rotary module composes the sections into per-token cos/sin
        c, s = rotary(torch.zeros(1, dtype=q.dtype), positions)
        qo, ko = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], c.to(q.device),
                                         s.to(q.device))
        return qo[0].transpose(0, 1), ko[0].transpose(0, 1)

    def ours(q, k):
        return rotary_embedding(q, k, cos, sin, sections, backend="triton")

    _check(ours, theirs, [q, k], "rotary_embedding")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_per_token_on_strided_views(dtype, device):
    gen = torch.Generator().manual_seed(5)
    tokens, hq, hk, dim = 9, 3, 1, 14
    qkv = _leaf(gen, tokens, (hq + 2 * hk) * dim + 6, dtype=dtype, device=device)  # a fused projection's rows
    cos, sin = (torch.randn(tokens, dim, generator=gen).to(device, dtype) for _ in range(2))

    def split(x):
        return x[:, :hq * dim].view(tokens, hq, dim), x[:, hq * dim:(hq + hk) * dim].view(tokens, hk, dim)

    def theirs(x):
        q, k = split(x)
        c, s = (t.to(x.dtype)[:, None] for t in (cos, sin))
        rot = lambda t: torch.cat([-t[..., dim // 2:], t[..., :dim // 2]], -1)  # noqa: E731
        return q * c + rot(q) * s, k * c + rot(k) * s

    _check(lambda x: rotary_embedding(*split(x), cos, sin, backend="triton"), theirs, [qkv], "rotary strided")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 77), (2, 5, 129)])
def test_swiglu_matches_transformers_mlp_activation(shape, dtype, device):
    gen = torch.Generator().manual_seed(sum(shape))
    gate, up = (_leaf(gen, *shape, dtype=dtype, device=device, scale=3.0) for _ in range(2))
    act = ACT2FN["silu"]
    _check(lambda g, u: swiglu(g, u, backend="triton"), lambda g, u: act(g) * u, [gate, up], "swiglu")


def test_bad_arguments_are_named(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="residual must match x"):
        rms_norm(x, torch.ones(8, device=device), residual=torch.randn(3, 7, device=device))
    q, k = torch.randn(4, 2, 8, device=device), torch.randn(4, 1, 8, device=device)
    with pytest.raises(ValueError, match="mrope_section must be 3 non-negative ints summing to half the head dim"):
        rotary_embedding(q, k, torch.randn(3, 4, 8), torch.randn(3, 4, 8), [1, 1, 1])
    with pytest.raises(ValueError, match="cos must be a floating-point tensor \\(T, D\\)"):
        rotary_embedding(q, k, torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="k must have q's tokens"):
        rotary_embedding(q, torch.randn(5, 1, 8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="up must match gate"):
        swiglu(torch.randn(3), torch.randn(4))


def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(3, 10, generator=gen), torch.randn(10, generator=gen), torch.randn(3, 10, generator=gen)
    x, w, r = (t.to(device).requires_grad_() for t in (x, w, r))
    torch.library.opcheck(rms_norm_fwd, (x, w, r, 1e-6))
    q, k = torch.randn(4, 2, 8, generator=gen).to(device), torch.randn(4, 1, 8, generator=gen).to(device)
    cos, sin = torch.randn(3, 4, 8, generator=gen).to(device), torch.randn(3, 4, 8, generator=gen).to(device)
    torch.library.opcheck(rotary_embedding_op, (q.requires_grad_(), k.requires_grad_(), cos, sin, [2, 1, 1], False,
                                                torch.float32))
    g, u = (torch.randn(2, 9, generator=gen).to(device).requires_grad_() for _ in range(2))
    torch.library.opcheck(swiglu_fwd, (g, u))


def test_patched_tiny_qwen_matches_unpatched(monkeypatch):
    from moca.data.cpt import document_positions
    from moca.model.qwen import TINY_SPECIALS, build
    from moca_kernels.varlen import lengths_to_cu_seqlens
    torch.manual_seed(0)
    plain = build("tiny")
    fused = copy.deepcopy(plain)
    counts = apply_fused_pointwise(fused)
    # 2 layers x 2 norms + the final one, 2 vision blocks x 2 + the merger's; 2 + 2 MLPs; 1 rotary.
    assert counts == {"rms_norm": 10, "swiglu": 4, "rope": 1}
    assert apply_fused_pointwise(fused) == {"rms_norm": 0, "swiglu": 0, "rope": 0}
    gen = torch.Generator().manual_seed(1)
    image = TINY_SPECIALS["image_token_id"]
    grid = torch.tensor([[1, 4, 4]])
    with_image = torch.cat([torch.randint(0, 200, (3,), generator=gen),
                            torch.tensor([TINY_SPECIALS["vision_start_token_id"]]), torch.full((4,), image),
                            torch.tensor([TINY_SPECIALS["vision_end_token_id"]]), torch.randint(0, 200, (2,),
                                                                                                generator=gen)])
    text = torch.randint(0, 200, (5,), generator=gen)
    ids = torch.cat([with_image, text])
    positions = torch.cat([document_positions(with_image, grid, image), document_positions(text, None, image)], 1)
    cu = lengths_to_cu_seqlens(torch.tensor([with_image.numel(), text.numel()]))
    pixels = torch.randn(16, 1176, generator=gen)
    weights = torch.randn(ids.numel(), 64, generator=gen)

    def run(model):
        out = model.model(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                          position_ids=positions[:, None], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11,
                          max_length_k=11).last_hidden_state[0]
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(plain)
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "triton")  # the fused ops' kernels, in the interpreter
    got, got_grads = run(fused)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
    # The rotary module of the fused copy returns per-token cos/sin, the stock one the batched ones.
    x = torch.zeros(1, dtype=torch.float32)
    assert fused.model.language_model.rotary_emb(x, positions[:, None])[0].dim() == 2
    assert plain.model.language_model.rotary_emb(x, positions[:, None])[0].dim() == 3
    # revert_class_patches restores transformers' apply_rotary_pos_emb; the fused copy then gives
    # transformers its own shapes and still computes the same
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    from moca_kernels.transformers import revert_class_patches
    wrapper = modeling.apply_rotary_pos_emb
    revert_class_patches()
    assert modeling.apply_rotary_pos_emb is wrapper.__wrapped__ and not hasattr(modeling.apply_rotary_pos_emb,
                                                                                "_moca_fused")
    assert fused.model.language_model.rotary_emb(x, positions[:, None])[0].dim() == 3
    fused.zero_grad(set_to_none=True)
    got, _ = run(fused)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_bf16_at_the_3b_shapes_on_gpu():
    # bf16 on the card (the interpreter's bf16 is not trusted): the 2x-PyTorch-error rule at the
    # shapes a 3B step runs.
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.bfloat16, device="cuda")
    x, res = _leaf(gen, 2048, 2048, **kw), _leaf(gen, 2048, 2048, **kw)
    weight = _leaf(gen, 2048, **kw)
    module = hf.Qwen2_5_VLRMSNorm(2048, eps=1e-6).cuda()
    _check(lambda x, r, w: rms_norm(x, w, 1e-6, residual=r),
           lambda x, r, w: (torch.func.functional_call(module, {"weight": w}, (x + r,)), x + r), [x, res, weight],
           "rms_norm bf16")
    rotary = _rotary_module(128, [16, 24, 24])
    positions = torch.randint(0, 4000, (3, 1, 1024), generator=gen)
    freqs = positions[:, 0, :, None].float() * rotary.inv_freq
    planes = torch.cat([freqs, freqs], -1).cuda()
    q, k = _leaf(gen, 1024, 16, 128, **kw), _leaf(gen, 1024, 2, 128, **kw)

    def theirs(q, k):
        c, s = rotary(torch.zeros(1, dtype=q.dtype), positions)
        qo, ko = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], c.to(q.device),
                                         s.to(q.device))
        return qo[0].transpose(0, 1), ko[0].transpose(0, 1)

    _check(lambda q, k: rotary_embedding(q, k, planes.cos().bfloat16(), planes.sin().bfloat16(), [16, 24, 24]),
           theirs, [q, k], "rotary bf16")
    gate, up = _leaf(gen, 1024, 11008, **kw, scale=3.0), _leaf(gen, 1024, 11008, **kw)
    _check(lambda g, u: swiglu(g, u), lambda g, u: ACT2FN["silu"](g) * u, [gate, up], "swiglu bf16")


def test_ops_stay_single_nodes_under_torch_compile(device, monkeypatch):
    # Custom ops with fake implementations: dynamo traces through the wrappers without a break
    # and keeps each op as one call.
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "triton")

    def block(x, w, r, q, k, cos, sin, gate, up):
        y, s = rms_norm(x, w, 1e-6, residual=r)
        qo, ko = rotary_embedding(q, k, cos, sin, [2, 1, 1])
        return y.sum() + s.sum() + qo.sum() + ko.sum() + swiglu(gate, up).sum()

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, generator=gen).to(device) for shape in
            ((3, 10), (10,), (3, 10), (4, 2, 8), (4, 1, 8), (3, 4, 8), (3, 4, 8), (2, 9), (2, 9))]
    explained = torch._dynamo.explain(block)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert sum("moca.rms_norm_fwd" in op for op in ops) == 1 and sum("moca.rotary_embedding" in op for op in ops) == 1
    assert sum("moca.swiglu_fwd" in op for op in ops) == 1
    torch.testing.assert_close(torch.compile(block, backend="aot_eager")(*args), block(*args))


def test_the_trainer_setting_patches_the_model():
    from moca.checkpoint import model_and_tokenizer
    from moca.config import Config
    config = Config()
    config.model.fused_pointwise = True
    model, _ = model_and_tokenizer(config)
    kinds = {getattr(type(m), "_moca_fused", None) for m in model.modules()}
    assert {"rms_norm", "swiglu", "rope"} <= kinds
    config.model.fused_pointwise = False
    model, _ = model_and_tokenizer(config)
    assert not any(getattr(type(m), "_moca_fused", None) for m in model.modules())


def test_the_hugging_face_patch_takes_the_fused_ops_on_request():
    from moca.model.qwen import build
    from moca_kernels.transformers import apply_moca_kernels_to_qwen2_5_vl
    model = build("tiny")  # already on moca's attention, not on the fused ops
    assert apply_fused_pointwise(copy.deepcopy(model))["rms_norm"] == 10
    apply_moca_kernels_to_qwen2_5_vl(model, pointwise=True)
    assert apply_fused_pointwise(model) == {"rms_norm": 0, "swiglu": 0, "rope": 0}  # all were fused already
