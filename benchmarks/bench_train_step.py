"""A training step of stage 1 (CPT) or stage 2 (CL): moca's packed path against the authors'
padded one, same inputs, same card.

One step = forward and backward over every micro-batch of a global batch of ``--docs``
documents, then one AdamW step. Both ways see the same synthetic documents (random token ids and
pixel rows in Qwen2.5-VL's layout; by default 70% an image of 256 to 1,024 merged tokens with a
caption, 30% text only, at most 1,280 tokens each) and the same MLM/MAE masks.

- ``moca``: documents packed under ``--token-budget`` tokens per micro-batch, one row each with
  ``cu_seqlens``; moca's varlen attention in the language model and the vision tower; the LM head
  on the masked rows only (``linear_cross_entropy``); ``mae_loss``.
- ``authors``: the authors' batching (their released stage-1 code): documents bucketed by
  ``cost = text + 4 * image tokens + 2 * images`` (clipped at 1,280) to thresholds
  ``32 * int(1.3**i)``, ``budget // threshold`` documents per micro-batch, right-padded to a
  multiple of 32; transformers' own attention (``--authors-attention``, sdpa by default; flash-attn
  is not on every card) with a bidirectional padding mask; the LM head over every position
  (Liger's fused linear cross-entropy, as the authors use, else full logits); eager MSE.
  Simplification: text-only micro-batches get no dummy image.

Reported: real (non-padding) tokens per second, documents per second, model TFLOP/s and MFU on
the same FLOP count for both (moca.model.flops), peak memory, and the losses (both must agree).

``--stage cl``: one contrastive step on ``--pairs`` pairs (a text query, an image-and-caption
positive, ``--hard-negatives`` such negatives), in pairs per second: moca's ``contrastive_step``
(every side packed) against the authors' three padded forwards (queries, positives, negatives),
mean pooling over the mask, dense logits and cross-entropy (``measure_cl``).
moca's variants (``--providers``): ``moca`` (eager), ``moca-compiled`` (each decoder layer, vision
block and the MAE decoder compiled: ``moca.model.regions``), ``moca-selective`` (selective
recomputation instead of ``--recompute``, full by default) and ``moca-compiled-selective``.
``--breakdown`` runs one more step under the profiler and reports where its time went (phases,
module classes, top kernels: ``moca.breakdown``), in the table and in results.json.

Usage:
    python benchmarks/bench_train_step.py --shape 3b --out DIR
    python benchmarks/bench_train_step.py --shape 3b --docs 48 --providers moca moca-compiled \
        moca-compiled-selective --breakdown --out DIR
    python benchmarks/bench_train_step.py --stage cl --shape 3b --pairs 24 --out DIR
    python benchmarks/bench_train_step.py --shape tiny --docs 16 --image-tokens 4 16 \
        --text-tokens 8 64 --max-doc-tokens 128 --token-budget 512     # a CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from moca import breakdown  # noqa: E402
from moca.config import RECOMPUTE_HELP, Recompute  # noqa: E402
from moca.data.cpt import Encoded, collate, document_positions  # noqa: E402
from moca.data.images import ROW  # noqa: E402
from moca.data.masking import IGNORE, ROWS_PER_TOKEN  # noqa: E402
from moca.data.packing import pack  # noqa: E402
from moca.data.tokenizer import ByteTokenizer, Specials  # noqa: E402
from moca.model import regions  # noqa: E402
from moca.model.flops import cpt_step_flops, peak_bf16  # noqa: E402
from moca.model.heads import MocaCPT  # noqa: E402
from moca.model.qwen import PRESETS, QWEN_MASK_ID, QWEN_SPECIALS, build, enable_checkpointing  # noqa: E402
from moca.profiling import nvtx  # noqa: E402

# moca's variants: eager, compiled regions (moca.model.regions), selective recomputation, both;
# each with --recompute unless it names its own.
VARIANTS = {"moca": (False, None), "moca-compiled": (True, None), "moca-selective": (False, "selective"),
            "moca-compiled-selective": (True, "selective")}
PROVIDERS = (*VARIANTS, "authors")
PAD_TO = 32
MAE_WEIGHT = 0.5


def specials_for(shape: str) -> Specials:
    if shape == "tiny":
        return ByteTokenizer().specials
    q = QWEN_SPECIALS
    ids = dict(mask=QWEN_MASK_ID, image=q["image_token_id"], vision_start=q["vision_start_token_id"],
               vision_end=q["vision_end_token_id"], eos=q["eos_token_id"])
    return Specials(**ids, all=frozenset(ids.values()) | {q["bos_token_id"], q["video_token_id"]})


def synthetic_documents(n: int, specials: Specials, args, seed: int = 0) -> list[Encoded]:
    """``n`` documents: with probability ``image_share`` one image (a random merged-token grid
    within ``image_tokens``) then a caption, else text only; ids below the special ids."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ordinary = min(specials.all)
    lo, hi = args.image_tokens
    docs = []
    for i in range(n):
        if rng.random() < args.image_share:
            while True:  # a grid (1, 2a, 2b) with a * b merged tokens in [lo, hi]
                a, b = rng.randint(1, hi), rng.randint(1, hi)
                if lo <= a * b <= hi and a * b + 2 < args.max_doc_tokens:
                    break
            caption = min(rng.randint(*args.text_tokens), args.max_doc_tokens - a * b - 2)
            ids = torch.cat([torch.tensor([specials.vision_start] + [specials.image] * (a * b) + [specials.vision_end]),
                             torch.randint(0, ordinary, (caption,), generator=gen)])
            rows = torch.randn(ROWS_PER_TOKEN * a * b, ROW, generator=gen)
            grids = torch.tensor([[1, 2 * a, 2 * b]])
        else:
            ids = torch.randint(0, ordinary, (rng.randint(args.text_tokens[0], args.max_doc_tokens),), generator=gen)
            rows, grids = torch.zeros(0, ROW), torch.zeros(0, 3, dtype=torch.long)
        docs.append(Encoded(ids, rows, grids, f"synthetic:{i}"))
    return docs


def _masked(docs: list[Encoded], specials: Specials, index: int) -> dict:
    return collate(docs, specials, 0.4, 0.5, torch.Generator().manual_seed(1_000 + index))


def moca_batches(docs: list[Encoded], specials: Specials, budget: int) -> list[dict]:
    """Packed micro-batches (best-fit decreasing under the token budget), as the trainer makes them."""
    groups = pack([d.ids.numel() for d in docs], budget)
    return [_masked([docs[i] for i in g], specials, k) for k, g in enumerate(groups)]


def authors_groups(docs: list[Encoded], specials: Specials, budget: int, max_len: int,
                   seed: int = 0) -> list[list[int]]:
    """The authors' length buckets: each document to the first threshold >= its cost, then
    ``budget // threshold`` documents per micro-batch of a bucket (shuffled inside it)."""
    thresholds = sorted({32 * int(1.3 ** i) for i in range(100)})
    buckets = defaultdict(list)
    for i, d in enumerate(docs):
        image_tokens, images = int((d.ids == specials.image).sum()), d.grids.shape[0]
        cost = min(max_len, d.ids.numel() - image_tokens - 2 * images + 4 * image_tokens + 2 * images)
        buckets[next(t for t in thresholds if t >= cost)].append(i)
    rng, groups = random.Random(seed), []
    for threshold, members in sorted(buckets.items()):
        rng.shuffle(members)
        size = max(1, budget // threshold)
        groups += [members[k:k + size] for k in range(0, len(members), size)]
    return groups


def authors_batches(docs: list[Encoded], specials: Specials, budget: int, max_len: int) -> list[dict]:
    """The same masking as moca's, laid out the authors' way: right-padded rows (B, L) with a
    padding mask, L rounded up to a multiple of 32."""
    out = []
    for k, group in enumerate(authors_groups(docs, specials, budget, max_len)):
        packed = _masked([docs[i] for i in group], specials, k)
        lengths = packed["lengths"]
        width = -(-max(lengths) // PAD_TO) * PAD_TO
        starts = [0] + torch.tensor(lengths).cumsum(0).tolist()[:-1]
        ids = torch.full((len(group), width), specials.eos, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        positions = torch.zeros(3, len(group), width, dtype=torch.long)
        flat = torch.full((sum(lengths),), -1, dtype=torch.long)  # packed place -> padded place
        for b, (start, n) in enumerate(zip(starts, lengths)):
            ids[b, :n] = packed["input_ids"][0, start:start + n]
            labels[b, :n] = packed["labels"][start:start + n]
            mask[b, :n] = 1
            positions[:, b, :n] = packed["position_ids"][:, 0, start:start + n]
            flat[start:start + n] = torch.arange(b * width, b * width + n)
        out.append(dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions,
                        pixel_values=packed["pixel_values"], image_grid_thw=packed["image_grid_thw"],
                        mae_positions=flat[packed["mae_positions"]], mae_targets=packed["mae_targets"],
                        lengths=lengths))
    return out


def padded_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states (B, L, H) of a right-padded batch through transformers' own path."""
    images = batch["pixel_values"].shape[0] > 0
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], pixel_values=batch["pixel_values"] if images else None,
                       image_grid_thw=batch["image_grid_thw"] if images else None).last_hidden_state


class AuthorsCPT(torch.nn.Module):
    """The authors' stage-1 forward on a padded batch: the LM head over every position, the MAE
    decoder over the whole padded sequence, eager MSE on the masked image tokens."""

    def __init__(self, model):
        super().__init__()
        self.cpt = MocaCPT(model, MAE_WEIGHT)  # the same decoder copy and projection
        self.model = model
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            self.lce, self.head = LigerFusedLinearCrossEntropyLoss(), "liger fused linear CE, all positions"
        except ImportError:
            self.lce, self.head = None, "full logits + cross_entropy, all positions"

    def forward(self, batch: dict) -> dict:
        hidden = padded_hidden(self.model, batch)
        flat, weight = hidden.reshape(-1, hidden.shape[-1]), self.model.lm_head.weight
        if self.lce is not None:
            mlm = self.lce(weight, flat, batch["labels"].reshape(-1))
        else:
            mlm = torch.nn.functional.cross_entropy((flat @ weight.T).float(), batch["labels"].reshape(-1))
        mae = flat.new_zeros((), dtype=torch.float32)
        if batch["mae_positions"].numel():
            cos_sin = self.model.model.language_model.rotary_emb(hidden, batch["position_ids"])
            keys = batch["attention_mask"][:, None, None, :].bool()
            decoded = self.cpt.mae_decoder(hidden, attention_mask=keys, position_embeddings=cos_sin,
                                           position_ids=batch["position_ids"])
            decoded = decoded[0] if isinstance(decoded, tuple) else decoded
            pred = self.cpt.mae_proj(decoded.reshape(-1, hidden.shape[-1])[batch["mae_positions"]]).reshape(-1, ROW)
            mae = ((pred.float() - batch["mae_targets"].float()) ** 2).mean()
        return dict(loss=mlm + MAE_WEIGHT * mae, mlm_loss=mlm.detach(), mae_loss=mae.detach())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model(provider: str, args, device):
    """The shape with seeded random weights (bf16 on a GPU), on moca's attention or the authors'."""
    torch.manual_seed(0)
    model = build(args.shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
                  attention="moca_varlen" if provider in VARIANTS else args.authors_attention)
    if args.checkpointing and provider == "authors":
        enable_checkpointing(model)
    return model


def _prepare(provider: str, module, args, device) -> dict:
    """moca's variant of ``provider`` applied to its stage module (recomputation, then compiled
    regions); the settings it ran with, for its row."""
    if provider not in VARIANTS:
        return {}
    compiled, recompute = VARIANTS[provider]
    recompute = (recompute or args.recompute) if args.checkpointing else "none"
    used = regions.prepare(module, module.model.config, Recompute.parse(recompute), compiled, args.token_budget,
                           device)
    return dict(recompute=str(used), compiled=compiled)


def _breakdown(row: dict, step, module, device) -> None:
    """One more step under the profiler (``moca.breakdown``): its table printed, the numbers in the row."""
    found, _ = breakdown.measure(step, module, device)
    row["breakdown"] = found
    print(f"{row['provider']}:\n{breakdown.table(found)}", flush=True)


def _timed(warm_up, step, repeats: int, device):
    """(fastest seconds, every time, the last step's result) of ``repeats`` steps after a warm-up
    (compilation, autotuning, allocator); peak memory counted from after the warm-up."""
    warm_up()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), times, result


def measure(provider: str, args, docs, specials, device) -> dict:
    if provider in VARIANTS:
        batches = moca_batches(docs, specials, args.token_budget)
    else:
        batches = authors_batches(docs, specials, args.token_budget, args.max_doc_tokens)
    model = _model(provider, args, device)
    module = (MocaCPT(model, MAE_WEIGHT) if provider in VARIANTS else AuthorsCPT(model)).to(device, model.dtype)
    variant = _prepare(provider, module, args, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6, fused=device.type == "cuda")
    batches = [_to(b, device) for b in batches]

    def step(chosen):
        sums = defaultdict(float)
        for b in chosen:
            with nvtx("forward"):
                out = module(b)
            with nvtx("backward"):
                out["loss"].backward()
            for k in ("loss", "mlm_loss", "mae_loss"):
                sums[k] += out[k].detach()
        with nvtx("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {k: float(v) / len(chosen) for k, v in sums.items()}

    seconds, times, losses = _timed(lambda: step(batches[:2]), lambda: step(batches), args.repeats, device)
    tokens = sum(d.ids.numel() for d in docs)
    slots = sum(b["input_ids"].numel() for b in batches)
    row = dict(provider=provider, **variant, micro_batches=len(batches), real_tokens=tokens,
               padded_tokens=slots - tokens,
               step_s=round(seconds, 4), step_s_all=[round(t, 4) for t in times],
               tokens_per_s=round(tokens / seconds, 1), docs_per_s=round(len(docs) / seconds, 2),
               **{k: round(v, 4) for k, v in losses.items()})
    grids = [tuple(g) for d in docs for g in d.grids.tolist()]
    flops = cpt_step_flops(model.config, [d.ids.numel() for d in docs], grids,
                           mlm_rows=sum(int((b["labels"] != IGNORE).sum()) for b in batches),
                           mae_tokens=sum(b["mae_positions"].numel() for b in batches))
    row["model_tflops"] = round(flops / seconds / 1e12, 1)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = peak_bf16(torch.cuda.get_device_name())
        if peak:
            row["mfu"] = round(flops / seconds / peak, 3)
    if provider == "authors":
        row["lm_head"] = module.head
        row["attention"] = args.authors_attention
    if args.breakdown:
        _breakdown(row, lambda: step(batches), module, device)
    return row  # the model, optimizer and batches go with this frame; main() frees the memory


def synthetic_pairs(n: int, specials: Specials, args, seed: int = 1) -> tuple[list, list, list]:
    """(queries, positives, negatives) for ``n`` pairs: a text query (an instruction and a
    request of ``--query-tokens`` tokens), an image-and-caption positive, ``--hard-negatives``
    image-and-caption negatives, drawn like the stage-1 documents with every one an image."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ordinary = min(specials.all)
    queries = [Encoded(torch.randint(0, ordinary, (rng.randint(*args.query_tokens),), generator=gen),
                       torch.zeros(0, ROW), torch.zeros(0, 3, dtype=torch.long), f"query:{i}") for i in range(n)]
    image_args = argparse.Namespace(**{**vars(args), "image_share": 1.0})
    sides = synthetic_documents(n * (1 + args.hard_negatives), specials, image_args, seed=seed + 1)
    positives, rest = sides[:n], sides[n:]
    negatives = [rest[i * args.hard_negatives:(i + 1) * args.hard_negatives] for i in range(n)]
    return queries, positives, negatives


def _padded(docs: list[Encoded], specials: Specials) -> dict:
    """Documents right-padded into one (B, L) batch with a padding mask (L a multiple of 32)."""
    lengths = [d.ids.numel() for d in docs]
    width = -(-max(lengths) // PAD_TO) * PAD_TO
    ids = torch.full((len(docs), width), specials.eos, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    positions = torch.zeros(3, len(docs), width, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, :lengths[b]], mask[b, :lengths[b]] = d.ids, 1
        positions[:, b, :lengths[b]] = document_positions(d.ids, d.grids, specials.image)
    pixels = torch.cat([d.rows for d in docs])
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                image_grid_thw=torch.cat([d.grids for d in docs]))


def _authors_embed(model, batch: dict) -> torch.Tensor:
    """The authors' embedding: the padded batch through the model, mean over the mask, L2."""
    hidden = padded_hidden(model, batch)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1)


def measure_cl(provider: str, args, pairs, specials, device) -> dict:
    """A stage-2 step on ``--pairs`` pairs: moca's packed contrastive step (``contrastive_step``,
    every side packed under the token budget, ``info_nce``) or the authors' (queries, positives
    and negatives as three padded forwards, mean pooling over the mask, dense logits and
    cross-entropy); then AdamW."""
    from moca.model.embed import MocaEmbedder, contrastive_step
    queries, positives, negatives = pairs
    embedder = MocaEmbedder(_model(provider, args, device)).to(device)
    variant = _prepare(provider, embedder, args, device)
    optimizer = torch.optim.AdamW(embedder.parameters(), lr=1e-6, fused=device.type == "cuda")
    k = args.hard_negatives
    if provider == "authors":
        sides = (queries, positives, [n for per in negatives for n in per])
        groups = [_to(_padded(g, specials), device) for g in sides]

    def step(count):
        if provider in VARIANTS:
            out = contrastive_step(embedder, queries[:count], positives[:count], negatives[:count], specials.image,
                                   args.token_budget, device)
            loss = out["loss"]
        else:
            if count < len(queries):  # the warm-up: the first pairs only
                sub = (queries[:count], positives[:count], [n for per in negatives[:count] for n in per])
                batches = [_to(_padded(g, specials), device) for g in sub]
            else:
                batches = groups
            q, p, n = (_authors_embed(embedder.model, b) for b in batches)
            n = n.reshape(q.shape[0], k, -1)
            logits = torch.cat([q @ p.T, torch.einsum("bd,bkd->bk", q, n)], 1) / 0.03
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
            loss.backward()
        with nvtx("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    seconds, times, loss = _timed(lambda: step(2), lambda: step(len(queries)), args.repeats, device)
    docs = queries + positives + [n for per in negatives for n in per]
    tokens = sum(d.ids.numel() for d in docs)
    row = dict(provider=provider, **variant, pairs=len(queries), hard_negatives=k, real_tokens=tokens,
               step_s=round(seconds, 4), step_s_all=[round(t, 4) for t in times],
               pairs_per_s=round(len(queries) / seconds, 2), tokens_per_s=round(tokens / seconds, 1),
               loss=round(loss, 4))
    if provider == "authors":
        slots = sum(g["input_ids"].numel() for g in groups)
        row.update(padded_tokens=slots - tokens, attention=args.authors_attention)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.breakdown:
        _breakdown(row, lambda: step(len(queries)), embedder, device)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="3b", choices=sorted(PRESETS), help="model shape, random weights (default 3b)")
    p.add_argument("--providers", nargs="+", default=["moca", "authors"], choices=PROVIDERS,
                   help="moca (eager), moca-compiled, moca-selective, moca-compiled-selective, authors "
                   "(default: moca authors)")
    p.add_argument("--docs", type=int, default=128, help="documents in the global batch (default 128)")
    p.add_argument("--token-budget", type=int, default=12800,
                   help="tokens per packed micro-batch, and the authors' padded micro-batch budget (default 12800)")
    p.add_argument("--max-doc-tokens", type=int, default=1280)
    p.add_argument("--image-tokens", type=int, nargs=2, default=(256, 1024), metavar=("LO", "HI"),
                   help="merged tokens of an image (default 256 1024: min/max pixels 256*28^2 / 1024*28^2)")
    p.add_argument("--text-tokens", type=int, nargs=2, default=(32, 512), metavar=("LO", "HI"),
                   help="caption length; text-only documents take LO .. --max-doc-tokens")
    p.add_argument("--image-share", type=float, default=0.7)
    p.add_argument("--stage", default="cpt", choices=("cpt", "cl"),
                   help="cpt: a stage-1 step on --docs documents; cl: a stage-2 step on --pairs pairs")
    p.add_argument("--pairs", type=int, default=32, help="stage 2: pairs in the global batch (default 32)")
    p.add_argument("--hard-negatives", type=int, default=2, help="stage 2: hard negatives per query (default 2)")
    p.add_argument("--query-tokens", type=int, nargs=2, default=(16, 96), metavar=("LO", "HI"),
                   help="stage 2: query length (default 16 96)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per provider (the fastest counts)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="turn activation checkpointing off (on by default, as in the authors' runs)")
    p.add_argument("--recompute", default="full", help=f"moca's recomputation unless its variant names one: "
                   f"{RECOMPUTE_HELP} (default full, the authors' checkpointing)")
    p.add_argument("--breakdown", action="store_true",
                   help="after the timed steps, one more under the profiler: phases, module classes, top kernels")
    p.add_argument("--authors-attention", default="sdpa", help="transformers attention for the authors' path")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = p.parse_args(argv)
    if args.image_tokens[0] < 1 or args.image_tokens[0] > args.image_tokens[1]:
        p.error("--image-tokens LO HI needs 1 <= LO <= HI")
    if args.image_tokens[0] + 2 >= args.max_doc_tokens:
        p.error("--image-tokens LO must leave room in --max-doc-tokens")
    if args.max_doc_tokens > args.token_budget:
        p.error("--max-doc-tokens must not exceed --token-budget")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.environment()
    specials = specials_for(args.shape)
    if args.stage == "cpt":
        data = synthetic_documents(args.docs, specials, args)
        what = f"CPT step, shape {args.shape}, {args.docs} documents, {sum(d.ids.numel() for d in data)} tokens"
    else:
        data = synthetic_pairs(args.pairs, specials, args)
        what = f"CL step, shape {args.shape}, {args.pairs} pairs with {args.hard_negatives} hard negatives each"
    print(f"{what}, on {env['gpu'] or 'CPU'}; torch {env['torch']}, commit {env['commit']}", flush=True)
    rows = []
    for provider in args.providers:
        try:
            row = (measure if args.stage == "cpt" else measure_cl)(provider, args, data, specials, device)
        except torch.cuda.OutOfMemoryError:
            row = dict(provider=provider, skipped="out of memory")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write(args, env, rows)
    done = {r["provider"]: r for r in rows if "skipped" not in r}
    rate = "tokens_per_s" if args.stage == "cpt" else "pairs_per_s"
    for name in VARIANTS:
        if name in done and "authors" in done:
            print(f"{name} / authors {rate}: {done[name][rate] / done['authors'][rate]:.2f}x")


def write(args, env: dict, rows: list[dict]) -> None:
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "providers")}
    title = "CPT step" if args.stage == "cpt" else "CL step"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"title": title, "environment": env, "settings": settings, "rows": rows}, f, indent=1)
    if args.stage == "cpt":
        head = f"# CPT step: shape {args.shape}, {args.docs} documents"
        columns = ("provider", "recompute", "compiled", "micro_batches", "padded_tokens", "step_s", "tokens_per_s",
                   "docs_per_s", "model_tflops", "mfu", "peak_mem_gib", "mlm_loss", "mae_loss")
    else:
        head = f"# CL step: shape {args.shape}, {args.pairs} pairs, {args.hard_negatives} hard negatives each"
        columns = ("provider", "recompute", "compiled", "padded_tokens", "step_s", "pairs_per_s", "tokens_per_s",
                   "peak_mem_gib", "loss")
    lines = [head, "", f"{env['gpu']}; torch {env['torch']}; triton {env['triton']}; commit {env['commit']} "
             f"(sources {env.get('source_sha1')}); {env['date']}", "", f"settings: {json.dumps(settings)}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['provider']} | skipped: {r['skipped']} |" + "|" * (len(columns) - 2))
            continue
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    for r in rows:
        if "breakdown" in r:
            lines += ["", f"## Breakdown: {r['provider']}", "", breakdown.table(r["breakdown"])]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
