"""Regions of the tiny model: recomputation (full, selective, every-K) and regional compilation
give the losses and gradients of the eager model in both stages; a decoder layer and a vision
block compile without graph breaks; packed micro-batches of other lengths and document counts
reuse the compiled graphs; the memory estimate orders the modes and ``auto`` follows it.

Compilation here uses the ``aot_eager`` backend (Dynamo's graph capture and AOTAutograd's joint
graph, without Inductor's C++ code generation, which would take minutes on the CI machines). The
graph-break check runs moca's own attention op (its Triton kernel in the interpreter); the
equality checks run a stand-in op of the same contract over the reference, for speed."""
import copy
import logging

import pytest
import torch
import torch._dynamo.testing
from documents import random_document

import moca_kernels.transformers
from moca.config import Recompute
from moca.data.cpt import collate
from moca.data.tokenizer import ByteTokenizer
from moca.model import regions
from moca.model.embed import MocaEmbedder, contrastive_step
from moca.model.heads import MocaCPT
from moca.model.qwen import PRESETS, TINY_SPECIALS, build

IMAGE = TINY_SPECIALS["image_token_id"]


@pytest.fixture
def triton_attention(monkeypatch):
    """Attention as moca's custom op (its Triton kernel in the interpreter, not the reference's
    Python loop over documents), and a fresh Dynamo cache."""
    monkeypatch.setenv("MOCA_KERNELS_BACKEND", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dense(q, k, v, cu, scale):
    """Per head, the probabilities (H, L, L) of attention inside documents, k and v repeated to
    q's heads (GQA), all float32."""
    ids = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.float().transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    scores = (q @ k.transpose(1, 2) * scale).masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    return scores.softmax(-1), q, k, v, group


@torch.library.custom_op("moca_test::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    p, _, _, v_, _ = _dense(q, k, v, cu, scale)
    return (p @ v_).transpose(0, 1).to(q.dtype).contiguous()


@_attention_fwd.register_fake
def _(q, k, v, cu, scale):
    return torch.empty_like(q)


@torch.library.custom_op("moca_test::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, q_, k_, v_, group = _dense(q, k, v, cu, scale)
    do = dout.float().transpose(0, 1)
    dv = p.transpose(1, 2) @ do
    dp = do @ v_.transpose(1, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ k_, ds.transpose(1, 2) @ q_

    def back(x, like):  # (Hq, L, D) -> like's (L, Hkv, D), summing each group of query heads
        return x.unflatten(0, (-1, group)).sum(1).transpose(0, 1).to(like.dtype).contiguous()
    return dq.transpose(0, 1).to(q.dtype).contiguous(), back(dk, k), back(dv, v)


@_attention_bwd.register_fake
def _(dout, q, k, v, cu, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.scale = inputs[4]


_attention_fwd.register_autograd(lambda ctx, dout: (*_attention_bwd(dout, *ctx.saved_tensors, ctx.scale),
                                                     None, None), setup_context=_save)


@pytest.fixture
def stand_in_attention(monkeypatch):
    """The model's attention as a custom op with moca's contract (one opaque node with a fake
    implementation, forward and backward) over the reference: what the compiled graph sees of
    moca's op, at the reference's speed instead of the Triton interpreter's."""
    def attention(q, k, v, cu, cu_k=None, softmax_scale=None, causal=False):
        assert not causal and (cu_k is None or cu_k is cu or torch.equal(cu_k, cu))
        return _attention_fwd(q, k, v, cu, softmax_scale or q.shape[-1] ** -0.5)
    monkeypatch.setattr(moca_kernels.transformers, "varlen_attention", attention)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()



def _batch(lengths, grids, seed: int) -> dict:
    docs = [random_document(n, seed + i, g) for i, (n, g) in enumerate(zip(lengths, grids))]
    return collate(docs, ByteTokenizer().specials, 0.4, 0.5, torch.Generator().manual_seed(seed))


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    out = module(dict(batch))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def cpt():
    torch.manual_seed(0)
    return MocaCPT(build("tiny"))


def test_recomputation_gives_the_gradients_of_none(cpt):
    batch = _batch([9, 20, 5], [None, (1, 4, 4), (1, 4, 8)], seed=1)
    want = _loss_and_grads(cpt, batch)
    assert len(want[1]) > 20 and all(g.abs().sum() > 0 for g in want[1].values())
    for mode, count in (("full", 5), ("selective", 5), ("every-2", 2)):  # 2 layers, 2 vision blocks, the MAE decoder
        module = copy.deepcopy(cpt)
        assert regions.apply_recompute(module, Recompute.parse(mode)) == count
        _assert_same(_loss_and_grads(module, batch), want)


def test_selective_recomputation_saves_products_and_recomputes_pointwise_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ran = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ran.append(func)
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    def region(x):
        a = torch.nn.functional.silu(x @ w)
        return a * a  # the product's backward needs a: recomputed from the kept x @ w

    for selective, products in ((True, 2), (False, 3)):  # full recomputation runs x @ w again
        out = regions._checkpointed(region, selective=selective)(x).sum()
        with Ops() as ops:
            out.backward()
        assert ops.ran.count(torch.ops.aten.silu.default) == 1  # recomputed in the backward
        assert ops.ran.count(torch.ops.aten.mm.default) == products  # dx, dw (and the forward's again)
    verdicts = {op: regions._keep_products(None, op) for op in (torch.ops.aten.mm.default, torch.ops.aten.silu.default)}
    assert verdicts == {torch.ops.aten.mm.default: regions.CheckpointPolicy.MUST_SAVE,
                        torch.ops.aten.silu.default: regions.CheckpointPolicy.PREFER_RECOMPUTE}


def _compiled(module, mode="none"):
    module = copy.deepcopy(module)
    regions.apply_recompute(module, Recompute.parse(mode))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    assert regions.compile_regions(module, backend=counter) == 5
    return module, counter


def test_compiled_regions_with_selective_recomputation_match_eager_and_reuse_their_graphs(cpt, stand_in_attention):
    module, counter = _compiled(cpt, "selective")  # compilation alone: the stage-two test below
    for i, (lengths, grids) in enumerate([([9, 20, 5], [None, (1, 4, 4), (1, 4, 8)]),
                                          ([31, 3, 6, 12], [(1, 8, 4), None, None, (1, 4, 4)])]):
        batch = _batch(lengths, grids, seed=10 + i)
        _assert_same(_loss_and_grads(module, batch), _loss_and_grads(cpt, batch))
        if i == 0:
            first = counter.frame_count
            assert first == 3  # one graph for the decoder layers, one for the vision blocks, one for the MAE decoder
    assert counter.frame_count == first, "another token count or document count compiled anew"


def test_a_decoder_layer_and_a_vision_block_have_no_graph_break(cpt, triton_attention):
    captured = {}

    def keep(kind):
        def hook(module, args, kwargs):
            captured.setdefault(kind, (module.forward, args, kwargs))
        return hook

    handles = [cpt.model.model.language_model.layers[0].register_forward_pre_hook(keep("decoder"), with_kwargs=True),
               cpt.model.model.visual.blocks[0].register_forward_pre_hook(keep("vision"), with_kwargs=True)]
    try:
        with torch.no_grad():
            cpt(_batch([9, 20], [None, (1, 4, 4)], seed=3))
    finally:
        for h in handles:
            h.remove()
    for kind, (forward, args, kwargs) in captured.items():
        explained = torch._dynamo.explain(forward)(*args, **kwargs)
        assert explained.graph_break_count == 0, (kind, explained.break_reasons)
        assert explained.graph_count == 1


def test_compiled_stage_two_step_matches_eager(stand_in_attention):
    torch.manual_seed(0)
    eager = MocaEmbedder(build("tiny"))
    compiled = copy.deepcopy(eager)
    regions.compile_regions(compiled, backend="aot_eager")
    queries = [random_document(6 + i, i) for i in range(3)]
    positives = [random_document(5, 10 + i, (1, 4, 4)) for i in range(3)]
    negatives = [[random_document(7, 20 + i)] for i in range(3)]
    results = []
    for module in (eager, compiled):
        module.zero_grad(set_to_none=True)
        out = contrastive_step(module, queries, positives, negatives, IMAGE, 64, torch.device("cpu"))
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((out["loss"], grads))
    _assert_same(results[1], results[0])


def test_memory_estimate_orders_the_modes_and_auto_picks_the_least_recomputation_that_fits():
    shape = regions.Shape.of(build("tiny").config)
    sizes = {m: regions.activation_bytes(shape, 1000, Recompute.parse(m)) for m in ("none", "every-2", "selective",
                                                                                    "full")}
    assert sizes["none"] > sizes["every-2"] > sizes["full"] and sizes["none"] > sizes["selective"] > sizes["full"]
    assert regions.activation_bytes(shape, 2000, Recompute("none")) == pytest.approx(2 * sizes["none"])
    state = 10 * 2**20
    for mode in ("none", "selective", "full"):
        memory = int((sizes[mode] + state) / 0.85) + 1  # just enough for this mode
        assert regions.choose_recompute(shape, 1000, memory, state)[0] == Recompute(mode)
    assert regions.choose_recompute(shape, 1000, 1, state)[0] == Recompute("full")  # nothing fits: the largest saving
    assert regions.choose_recompute(shape, 1000, None, state)[0] == Recompute("none")


def test_the_3b_shape_at_the_authors_budget():
    """On the 3B shape with 12,800-token rows (every token an image token, the conservative
    case), bf16 weights and AdamW state: no recomputation fits no card; selective fits a 141 GB
    card, not an 80 GB one (full does: the measured peak with full recomputation on 96 documents
    of the benchmark was 37.5 GiB, weights and state included)."""
    from transformers import Qwen2_5_VLConfig
    shape = regions.Shape.of(Qwen2_5_VLConfig(**PRESETS["3b"]))
    state = regions.state_bytes(3_750_000_000, 2)
    assert regions.choose_recompute(shape, 12800, 141 * 10**9, state)[0] == Recompute("selective")
    assert regions.choose_recompute(shape, 12800, 80 * 10**9, state)[0] == Recompute("full")


@pytest.mark.parametrize("bad", ["every-1", "every-x", "some", "every-"])
def test_bad_recompute_settings_are_refused(bad):
    with pytest.raises(ValueError, match="model.recompute"):
        Recompute.parse(bad)


@pytest.mark.parametrize("text", ["none", "full", "selective", "auto", "every-2", "every-12"])
def test_a_recompute_setting_parses_once_and_gives_its_text_back(text):
    mode = Recompute.parse(text)
    assert str(mode) == text and mode.kind == text.split("-")[0]
    assert mode.period == (int(text[6:]) if "-" in text else 0)


def test_prepare_logs_its_choice_and_the_settings_are_checked(cpt, caplog):
    from moca.config import Config
    caplog.set_level(logging.INFO, logger="moca")
    module, cpu = copy.deepcopy(cpt), torch.device("cpu")
    assert regions.prepare(module, module.model.config, Recompute("auto"), False, 1024, cpu) == Recompute("none")
    assert caplog.messages == ["recompute=auto -> no device memory limit known (CPU): no recomputation"]
    assert regions.prepare(module, module.model.config, Recompute("every", 3), False, 1024, cpu) == Recompute.parse(
        "every-3")
    assert caplog.messages[-1] == "recompute=every-3: 1 regions recompute in the backward"
    Config().update({"recompute": "selective", "compile": "true"}).validate()
    with pytest.raises(ValueError, match="model.recompute must be one of"):
        Config().update({"recompute": "every-x"}).validate()
    with pytest.raises(ValueError, match="gradient_checkpointing=true means recompute=full"):
        Config().update({"gradient_checkpointing": True, "recompute": "selective"}).validate()
