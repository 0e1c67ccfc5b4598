"""The stage-1 loader at the paper's image sizes, in documents per second, with 0, 1 and 2 worker
processes (``data.workers``), beside what one H100 eats at 50% MFU:

    python benchmarks/cpu/bench_loader.py --workers 0 1 2 --out /tmp/loader.json

The corpus is generated: 70% of the documents hold one JPEG of about 140 KB (photo-like: smooth
colour fields, edges and grain; 512 x 384 to 1,600 x 1,200 pixels), after a caption of about 200
characters; the rest are text of 1,500 characters, cut at the recipe's 1,280 tokens. The settings
are the ``moca`` recipe's (images of 256 to 1,024 merged tokens, documents of up to 1,280 tokens,
micro-batches of 12,800, MAE drawn per token) with nothing kept encoded (``cache_bytes=0``: at
paper scale a document is read once an epoch). The whole path is timed: read, decode, resize,
tokenize, pack, mask, collate, and the hand-over to the training process (pinned memory only on a
GPU). The tokenizer is the project's byte tokenizer (no Qwen tokenizer is on these machines): it
gives about one token per character where Qwen's gives one per four, so the texts are about a
quarter of the characters of the documents they stand for, for the same token counts.

Reported per worker count: the first micro-batch's wait (the workers' start); documents/s over
the next ``--batches`` micro-batches (the corpus read again epoch after epoch; the workers' head
start of ``prefetch`` batches each is a share of that count, so keep it well above them) and its
ratio to 23.7 documents/s (the recorded 3B stage-1 step on an H100: 96 documents in 10.1 s at 20%
MFU, scaled to 50%), and the same in tokens/s (18,778: that step's documents averaged 790 tokens);
documents/s over everything since the loader was made, start included; the CPU time spent per
document by the training process and its workers together over the timed batches (what a core
must give a document, whatever else shares the machine); the bytes of one micro-batch and each
worker's proportional memory (PSS, shared pages divided among their sharers). Then the planning
of one epoch of the paper's size (``--plan-documents``): its time and memory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig

from moca.config import Config
from moca.data import loader
from moca.data.index import index_documents
from moca.data.tokenizer import ByteTokenizer
from moca.model.qwen import PRESETS

H100_AT_50_MFU = 96 / 10.1 * 50 / 20  # documents/s: the recorded 3B step at 20% MFU, scaled to 50%
H100_TOKENS_AT_50_MFU = 75_864 / 10.1 * 50 / 20  # tokens/s of the same step (its 96 documents: 790 tokens each)
SIZES = [(512, 384), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (768, 768), (1024, 1024)]
WORDS = ("the a of and to in is that for on with as by this from at it an be are was or which its their "
         "picture shows image red blue green large small shape colour light dark field road house tree sky "
         "water person people table chart figure document page text number year city river mountain").split()


def photo(width: int, height: int, rng: np.random.Generator, target: int = 140_000) -> bytes:
    """A JPEG of about ``target`` bytes that compresses like a photograph: smooth colour fields
    from upsampled noise, a few hard edges, and grain; quality searched for the size."""
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                  Image.Resampling.BICUBIC)
    x = np.asarray(base, dtype=np.float32)
    for _ in range(6):  # hard-edged shapes over it
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        x[y0:y0 + height // 4, x0:x0 + width // 5] = rng.integers(0, 256, 3)
    detail = np.asarray(Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    x = np.clip(0.75 * x + 0.25 * detail + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    image, best = Image.fromarray(x), b""
    for quality in (95, 90, 85, 80, 75, 70, 60, 50):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        best = buffer.getvalue()
        if len(best) <= target * 1.15:
            break
    return best


def text(rng: random.Random, characters: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < characters:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def corpus(folder: str, documents: int, seed: int = 0) -> tuple[str, float]:
    """(the .jsonl path, the JPEGs' mean size in bytes): ``documents`` records, 70% with an image
    (16 distinct JPEGs in turn, each a file beside the records)."""
    rng, words = np.random.default_rng(seed), random.Random(seed)
    jpegs = []
    for k in range(16):
        path = os.path.join(folder, f"photo-{k}.jpg")
        with open(path, "wb") as f:
            f.write(photo(*SIZES[k % len(SIZES)], rng))
        jpegs.append(os.path.basename(path))
    path = os.path.join(folder, "cpt.jsonl")
    with open(path, "w") as f:
        for i in range(documents):
            if i % 10 < 7:
                record = {"text": text(words, 200) + " <image>", "images": [jpegs[i % len(jpegs)]]}
            else:
                record = {"text": text(words, 1500)}
            f.write(json.dumps(record) + "\n")
    return path, float(np.mean([os.path.getsize(os.path.join(folder, j)) for j in jpegs]))


def pss_mib(pid: int) -> float:
    """A process's proportional set size, MiB (/proc/PID/smaps_rollup)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process (every thread) and of ``pids``, seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of stat(5)
    return total


def worker_pids() -> list[int]:
    """This process's children (the loader's workers)."""
    found = []
    for children in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{children}/children") as f:
            found += [int(pid) for pid in f.read().split()]
    return found


def measure(entries, config, workers: int, batches: int) -> dict:
    """One loader with ``workers`` processes: the first micro-batch's wait, then ``batches`` more."""
    config = config.update({"data.workers": workers})
    tok, model_config = ByteTokenizer(), Qwen2_5_VLConfig(**PRESETS["3b"])
    created = started = time.perf_counter()
    made = loader.micro_batch_loader(entries, config, tok, model_config, 0, 0, 0, 0, 1, torch.device("cpu"))
    try:
        first, _, _, _ = next(made)
        startup = time.perf_counter() - started
        workers_now = worker_pids()
        started, documents, tokens, sizes, cpu = time.perf_counter(), 0, 0, [], cpu_seconds(workers_now)
        for _ in range(batches):
            batch, _, _, _ = next(made)
            documents, tokens = documents + len(batch["lengths"]), tokens + batch["input_ids"].numel()
            sizes.append(sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor)))
        seconds, overall = time.perf_counter() - started, time.perf_counter() - created
        cpu = cpu_seconds(workers_now) - cpu
        memory = [round(pss_mib(pid), 1) for pid in worker_pids()]
    finally:
        made.close()
    rate = documents / seconds
    return dict(workers=workers, first_batch_s=round(startup, 2), documents=documents, seconds=round(seconds, 2),
                documents_per_s=round(rate, 2), ratio_to_h100=round(rate / H100_AT_50_MFU, 3),
                documents_per_s_with_start=round((documents + len(first["lengths"])) / overall, 2),
                tokens_per_s=round(tokens / seconds),
                token_ratio_to_h100=round(tokens / seconds / H100_TOKENS_AT_50_MFU, 3),
                cpu_ms_per_document=round(1000 * cpu / documents, 1),
                documents_per_micro_batch=round(documents / batches, 1),
                micro_batch_mib=round(float(np.mean(sizes)) / 2**20, 1), worker_pss_mib=memory,
                training_process_pss_mib=round(pss_mib(os.getpid()), 1))


class Costs:
    """An index as the loader reads it for planning an epoch: ``len`` and ``costs``."""

    def __init__(self, costs: np.ndarray):
        self.costs = costs

    def __len__(self) -> int:
        return len(self.costs)


def plan(documents: int, budget: int = 12800) -> dict:
    """Planning one epoch of ``documents`` (shuffle and pack: what the training process does at
    the start and every worker at each epoch it reaches): seconds, the plan's bytes, and the
    most memory Python held while making it (tracemalloc, in a second, untimed call)."""
    costs = Costs(np.random.default_rng(0).integers(64, 1281, documents))
    started = time.perf_counter()
    batches = loader.micro_batches(costs, budget, 0, 0)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    loader.micro_batches(costs, budget, 0, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dict(documents=documents, seconds=round(seconds, 2), micro_batches=len(batches),
                plan_mib=round((batches.flat.nbytes + batches.starts.nbytes) / 2**20, 1),
                peak_python_mib=round(peak / 2**20, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--documents", type=int, default=200, help="documents generated (the corpus)")
    parser.add_argument("--batches", type=int, default=16, help="micro-batches timed per worker count")
    parser.add_argument("--plan-documents", type=int, default=3_400_000,
                        help="documents of the epoch whose planning is timed (the paper's epoch: 3.4M)")
    parser.add_argument("--out", help="where to write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path, jpeg_bytes = corpus(folder, args.documents)
        config = Config.recipe("moca").update({"data.documents": path, "run.out": folder, "data.cache_bytes": 0,
                                               "data.prefetch": 2})
        started = time.perf_counter()
        entries = index_documents(config, ByteTokenizer(), path)
        indexed = time.perf_counter() - started
        rows = [measure(entries, config, w, args.batches) for w in args.workers]
    planned = plan(args.plan_documents)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(commit=commit, date=time.strftime("%Y-%m-%d"), cpus=len(os.sched_getaffinity(0)),
                  load_average=os.getloadavg(), python=platform.python_version(), torch=torch.__version__,
                  documents=len(entries), mean_jpeg_bytes=round(jpeg_bytes), index_s=round(indexed, 2),
                  h100_documents_per_s=round(H100_AT_50_MFU, 1), rows=rows, epoch_plan=planned)
    print(f"{len(entries)} documents (70% with a JPEG of {jpeg_bytes / 1000:.0f} KB on average), indexed in "
          f"{indexed:.1f} s; {result['cpus']} CPUs, load average {result['load_average'][0]:.1f}")
    print(f"{'workers':>7} {'first batch s':>13} {'documents/s':>11} {'x H100 at 50% MFU (23.7/s)':>27} "
          f"{'tokens/s':>8} {'x H100 tokens/s':>15} {'docs/s with start':>17} {'CPU ms/doc':>10} "
          f"{'docs/micro-batch':>16} {'MiB/micro-batch':>15} {'worker PSS MiB':>15}")
    for r in rows:
        print(f"{r['workers']:>7} {r['first_batch_s']:>13} {r['documents_per_s']:>11} {r['ratio_to_h100']:>27} "
              f"{r['tokens_per_s']:>8} {r['token_ratio_to_h100']:>15} {r['documents_per_s_with_start']:>17} "
              f"{r['cpu_ms_per_document']:>10} {r['documents_per_micro_batch']:>16} {r['micro_batch_mib']:>15} "
              f"{str(r['worker_pss_mib']):>15}")
    print(f"planning an epoch of {planned['documents']:,} documents: {planned['seconds']} s, "
          f"{planned['micro_batches']:,} micro-batches, a plan of {planned['plan_mib']} MiB "
          f"(Python held {planned['peak_python_mib']} MiB at most while making it)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
