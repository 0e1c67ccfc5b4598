"""The corpus index at paper scale: build rate with 1 and 2 processes, bytes per document, and
the time a cached index takes to be ready, on generated documents in the authors' row form:

    python benchmarks/cpu/bench_index.py --docs 1000000 --workers 1 2 --out /tmp/index.json

The corpus is Parquet shards of ``{"text", "images": [bytes]}`` rows (100,000 rows a shard, row
groups of 1,000): 30% text of about 1,200 characters, 70% a caption of about 400 characters with
one image marked by the authors' ``<|vision_start|><|image_pad|><|vision_end|>``, whose bytes are
the first 2 KB of a real JPEG of the paper's sizes (512 x 384 to 1,600 x 1,200): its header, all
that the index reads. The settings are the ``moca`` recipe's (documents of up to 1,280 tokens,
images of 256 to 1,024 merged tokens). The tokenizer is a real fast (Rust) tokenizer, the
project's byte tokenizer as transformers loads it (``ByteTokenizer.to_transformers``; no Qwen
tokenizer is on these machines), run single-threaded (``TOKENIZERS_PARALLELISM=false``) so that
a process is one core.

Reported: documents/s of a build from nothing with each ``--workers`` count (``data.index_workers``;
a fresh cache each), and documents per CPU-second (this process and its pool together: what a
core must give a document, whatever else shares the machine); the same for the per-document path
that indexed JSON Lines before the compact index (``read_cpt`` and ``layout`` a document at a
time, images as base64), on the first ``--baseline-docs`` rows written as JSON Lines, and for the
tokenizer alone on those rows' texts (the floor of any build with this tokenizer); bytes per
document of the index's arrays and of the Python heap that loading the cached index adds; the
seconds until a cached index is ready (median of three loads in this process, verification
included).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from moca.config import Config  # noqa: E402
from moca.data.cpt import layout  # noqa: E402
from moca.data.index import Entry, index_documents  # noqa: E402
from moca.data.records import AUTHORS_MARKER, read_cpt  # noqa: E402
from moca.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

SIZES = [(512, 384), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (768, 768), (1024, 1024)]
SHARD_ROWS, GROUP_ROWS, HEADER_BYTES = 100_000, 1_000, 2048
WORDS = ("the a of and to in is that for on with as by this from at it an be are was or which its their "
         "picture shows image red blue green large small shape colour light dark field road house tree sky "
         "water person people table chart figure document page text number year city river mountain "
         "measurement experiment analysis structure function process development government").split()


def headers() -> list[bytes]:
    """The first ``HEADER_BYTES`` of a real JPEG of each of ``SIZES`` (markers, tables, frame)."""
    out = []
    for width, height in SIZES:
        buffer = io.BytesIO()
        gradient = np.linspace(0, 255, width * height * 3).astype(np.uint8).reshape(height, width, 3)
        Image.fromarray(gradient).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue()[:HEADER_BYTES])
    return out


def rows(count: int, seed: int, jpegs: list[bytes]) -> list[dict]:
    """``count`` rows of the mix (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    out = []
    for _ in range(count):
        if rng.random() < 0.3:
            out.append({"text": " ".join(words[rng.integers(0, len(words), int(rng.integers(120, 260)))]),
                        "images": []})
        else:
            caption = " ".join(words[rng.integers(0, len(words), int(rng.integers(40, 90)))])
            out.append({"text": AUTHORS_MARKER + caption, "images": [jpegs[int(rng.integers(0, len(jpegs)))]]})
    return out


SCHEMA = pa.schema([("text", pa.string()), ("images", pa.list_(pa.binary()))])


def corpus(folder: str, docs: int) -> list[str]:
    """The Parquet shards of ``docs`` rows under ``folder`` (written unless already there)."""
    os.makedirs(folder, exist_ok=True)
    jpegs, paths = headers(), []
    shards = (docs + SHARD_ROWS - 1) // SHARD_ROWS
    for k in range(shards):
        path = os.path.join(folder, f"train-{k:05d}-of-{shards:05d}.parquet")
        count = min(SHARD_ROWS, docs - k * SHARD_ROWS)
        if not (os.path.exists(path) and pq.ParquetFile(path).metadata.num_rows == count):
            pq.write_table(pa.Table.from_pylist(rows(count, k, jpegs), schema=SCHEMA), path + ".tmp",
                           row_group_size=GROUP_ROWS)
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (a build's pool)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rates(docs: int, seconds: float, cpu: float) -> dict:
    return {"docs": docs, "seconds": round(seconds, 2), "docs_per_s": round(docs / seconds),
            "docs_per_cpu_s": round(docs / cpu)}


def baseline(shard: str, count: int, tokenizer, config: Config, folder: str) -> dict:
    """The per-document path on the first ``count`` rows as JSON Lines (images as base64):
    documents/s, and the heap bytes of its ``Entry`` list per document."""
    path = os.path.join(folder, f"first-{count}.jsonl")
    if not os.path.exists(path):
        table = pq.ParquetFile(shard).read_row_groups(list(range((count + GROUP_ROWS - 1) // GROUP_ROWS)))
        with open(path + ".tmp", "w") as f:
            for row in table.slice(0, count).to_pylist():
                f.write(json.dumps({"text": row["text"].replace(AUTHORS_MARKER, "<image>"),
                                    "images": [base64.b64encode(b).decode() for b in row["images"]]}) + "\n")
        os.replace(path + ".tmp", path)
    d = config.data
    tracemalloc.start()
    start, cpu = time.perf_counter(), cpu_seconds()
    entries = []
    for doc in read_cpt(path, decode=False):
        ids, _ = layout(doc, tokenizer, d.max_doc_tokens, d.min_pixels, d.max_pixels)
        entries.append(Entry(path, doc.offset, doc.where, len(ids)))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {**rates(len(entries), seconds, cpu), "heap_bytes_per_doc": round(heap / len(entries))}


def tokenizer_alone(path: str, tokenizer) -> dict:
    """The texts of the JSON Lines rows, split at their images, counted in batches of 1,024."""
    with open(path) as f:
        pieces = [json.loads(line)["text"].split("<image>") for line in f]
    texts = [p for parts in pieces for p in parts]
    counter = tokenizer.counter()
    start, cpu = time.perf_counter(), cpu_seconds()
    for k in range(0, len(texts), 1024):
        counter.lengths(texts[k:k + 1024])
    return rates(len(pieces), time.perf_counter() - start, cpu_seconds() - cpu)


def build(folder: str, workers: int, tokenizer, config: Config, cache: str) -> dict:
    """A build from nothing into ``cache`` with ``workers`` processes: documents/s."""
    config = config.update({"index_cache": cache, "index_workers": workers})
    start, cpu = time.perf_counter(), cpu_seconds()
    index = index_documents(config, tokenizer, folder)
    return {"workers": workers, **rates(len(index), time.perf_counter() - start, cpu_seconds() - cpu)}


def cached(folder: str, tokenizer, config: Config, cache: str) -> dict:
    """Three loads of the cached index: the median seconds until ready, the arrays' bytes per
    document and the Python heap that a load adds per document."""
    config = config.update({"index_cache": cache})
    times = []
    for _ in range(3):
        tracemalloc.start()
        start = time.perf_counter()
        index = index_documents(config, tokenizer, folder)
        costs = index.costs  # what batching reads first
        times.append(time.perf_counter() - start)
        heap, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    arrays = sum(a.nbytes for part in index.parts for a in part.arrays.values())
    return {"ready_s_median": round(statistics.median(times), 3), "ready_s": [round(t, 3) for t in times],
            "array_bytes_per_doc": round(arrays / len(index), 2), "heap_bytes_per_doc": round(heap / len(index), 3),
            "dtypes": {k: str(a.dtype) for k, a in index.parts[0].arrays.items()}, "costs_mean": float(costs.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline-docs", type=int, default=20_000)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "moca-bench-index"),
                        help="where the generated shards are kept (reused when already there)")
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args()

    folder = os.path.join(args.data, f"shards-{args.docs}")
    start = time.perf_counter()
    shards = corpus(folder, args.docs)
    generated = time.perf_counter() - start
    tokenizer_folder = os.path.join(args.data, "tokenizer")
    ByteTokenizer().to_transformers().save_pretrained(tokenizer_folder)
    tokenizer = HFTokenizer(tokenizer_folder)
    config = Config.recipe("moca").update({"out": os.path.join(args.data, "run"), "sample_per_source": None})
    result = {"docs": args.docs, "shards": len(shards), "corpus_bytes": sum(os.path.getsize(s) for s in shards),
              "generated_s": round(generated, 1), "cpus": os.cpu_count(), "load": os.getloadavg(),
              "python": platform.python_version(), "machine": platform.machine()}
    print(json.dumps(result), flush=True)
    result["baseline"] = baseline(shards[0], min(args.baseline_docs, args.docs), tokenizer, config, args.data)
    print("per-document path (JSON Lines):", json.dumps(result["baseline"]), flush=True)
    result["tokenizer_alone"] = tokenizer_alone(os.path.join(args.data, f"first-{result['baseline']['docs']}.jsonl"),
                                                tokenizer)
    print("tokenizer alone:", json.dumps(result["tokenizer_alone"]), flush=True)
    result["builds"] = []
    with tempfile.TemporaryDirectory(dir=args.data) as caches:
        for workers in args.workers:
            result["builds"].append(build(folder, workers, tokenizer, config, os.path.join(caches, f"w{workers}")))
            print("build:", json.dumps(result["builds"][-1]), flush=True)
        result["cached"] = cached(folder, tokenizer, config, os.path.join(caches, f"w{args.workers[-1]}"))
    print("cached:", json.dumps(result["cached"]), flush=True)
    base = result["baseline"]
    for b in result["builds"]:
        b["x_per_document_path"] = round(b["docs_per_s"] / base["docs_per_s"], 1)
        b["x_per_document_path_per_cpu_s"] = round(b["docs_per_cpu_s"] / base["docs_per_cpu_s"], 1)
    print("\n| what | documents/s | documents per CPU-second |\n| --- | --- | --- |")
    print(f"| per-document path (before), 1 process | {base['docs_per_s']:,} | {base['docs_per_cpu_s']:,} |")
    t = result["tokenizer_alone"]
    print(f"| the tokenizer alone (the floor) | {t['docs_per_s']:,} | {t['docs_per_cpu_s']:,} |")
    for b in result["builds"]:
        print(f"| compact index build, {b['workers']} process(es) | {b['docs_per_s']:,} ({b['x_per_document_path']}x) "
              f"| {b['docs_per_cpu_s']:,} ({b['x_per_document_path_per_cpu_s']}x) |")
    c = result["cached"]
    print("\n| what | value |\n| --- | --- |")
    print(f"| index arrays | {c['array_bytes_per_doc']} bytes/document ({c['dtypes']}) |")
    print(f"| heap a cached load adds | {c['heap_bytes_per_doc']} bytes/document |")
    print(f"| cached index ready | {c['ready_s_median']} s (median of 3) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
