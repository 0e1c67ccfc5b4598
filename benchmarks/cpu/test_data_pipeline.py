"""CPU benchmarks of the stage-1 data pipeline (pytest-benchmark, outside the test suite):

    pip install pytest-benchmark
    python -m pytest benchmarks/cpu --benchmark-only

The packer (C++ and Python) on a million documents' worth of costs, and the whole pipeline
(read, decode, encode, pack, mask, collate) in documents per second on the embedded dataset.
"""
import random

import pytest
import torch

from moca.data import embedded, packing
from moca.data.cpt import collate, encode
from moca.data.records import read_cpt
from moca.data.tokenizer import ByteTokenizer

COSTS = [random.Random(0).randint(1, 1280) for _ in range(1_000_000)]


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_pack_a_million_documents(benchmark, impl):
    if impl == "cpp" and packing._pack_cpp is None:
        pytest.skip("the C++ packer is not built")
    fn = packing.pack if impl == "cpp" else packing.pack_python
    batches = benchmark.pedantic(fn, args=(COSTS, 12800), rounds=1 if impl == "python" else 3)
    benchmark.extra_info["utilization"] = packing.utilization(batches, COSTS, 12800)
    benchmark.extra_info["documents_per_s"] = len(COSTS) / benchmark.stats.stats.mean


def test_pipeline_documents_per_second(benchmark, tmp_path):
    path = embedded.write(str(tmp_path), documents=240, image_size=224)
    tok = ByteTokenizer()

    def pipeline():
        docs = [encode(d, tok, 1280) for d in read_cpt(path)]
        for batch in packing.pack([d.ids.numel() for d in docs], 4096):
            collate([docs[i] for i in batch], tok.specials, 0.4, 0.5, torch.Generator().manual_seed(0))
        return len(docs)

    count = benchmark.pedantic(pipeline, rounds=3)
    benchmark.extra_info["documents_per_s"] = count / benchmark.stats.stats.mean
