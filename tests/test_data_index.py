"""The compact index: costs equal to what encoding makes, computed in batches from image headers;
the same index from one process, from a pool, and from two ranks sharing the work; arrays of a
few bytes per document, memory-mapped from the cache and pickled by their path; sources drawn
as the authors draw them."""
import io
import multiprocessing
import os
import pickle
import warnings

import numpy as np
import pytest
from lines import logged
from test_data_parquet import cpt_rows, write_parquet

from moca.config import Config
from moca.data import index
from moca.data.cpt import encode, layout
from moca.data.records import load_cpt, read_cpt
from moca.data.sources import Source, drawn, parse_sources
from moca.data.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory) -> HFTokenizer:
    """A real fast (Rust) tokenizer with Qwen2-VL's special tokens, loaded as a checkpoint's is."""
    folder = tmp_path_factory.mktemp("tokenizer")
    ByteTokenizer().to_transformers().save_pretrained(str(folder))
    return HFTokenizer(str(folder))


def _shards(folder, files: int = 3, rows: int = 40, group: int = 7) -> str:
    for k in range(files):
        write_parquet(folder / f"train-{k:05d}-of-{files:05d}.parquet", cpt_rows(rows, k + 1)[0], row_group_size=group)
    return str(folder)


def _config(tmp_path, **change) -> Config:
    return Config().update({"run.stage": "cpt", "out": str(tmp_path / "run"), "token_budget": 256,
                            "max_doc_tokens": 40, "min_pixels": 28 * 28, "max_pixels": 84 * 84, **change})


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.mark.parametrize("which", ["bytes", "fast"])
def test_costs_are_what_encoding_makes(tmp_path, fast_tokenizer, which):
    tok = ByteTokenizer() if which == "bytes" else fast_tokenizer
    path = write_parquet(tmp_path / "s.parquet", cpt_rows(60, 4)[0], row_group_size=16)
    config = _config(tmp_path, documents=path)
    entries = _quiet(index.index_documents, config, tok, path)
    d = config.data
    docs = _quiet(list, read_cpt(path, decode=False))
    assert len(entries) == len(docs) == 60
    expected = [len(layout(doc, tok, d.max_doc_tokens, d.min_pixels, d.max_pixels)[0]) for doc in docs]
    assert entries.costs.tolist() == expected and max(expected) == d.max_doc_tokens  # some are truncated
    for e in list(entries)[:12]:  # and what the loader encodes from the row
        doc = load_cpt(e.file, e.offset, e.where)
        assert encode(doc, tok, d.max_doc_tokens, d.min_pixels, d.max_pixels).ids.numel() == e.cost


def test_the_fast_tokenizers_batch_counts_equal_its_encode(fast_tokenizer):
    texts = ["", "a", "the red circle <|mask|> is on", "ünïcode and   spaces", "<|image_pad|> x " * 5]
    assert fast_tokenizer.counter().lengths(texts) == [len(fast_tokenizer.encode(t)) for t in texts]
    counter = pickle.loads(pickle.dumps(fast_tokenizer.counter()))  # what a pool worker gets
    assert counter.lengths(texts) == [len(fast_tokenizer.encode(t)) for t in texts]


def test_a_pool_and_two_ranks_build_the_index_one_process_builds(tmp_path):
    shards = _shards(tmp_path / "data")
    tok = ByteTokenizer()
    serial = _quiet(index.index_documents, _config(tmp_path, index_cache=str(tmp_path / "one"), index_workers=1), tok,
                    shards)
    with logged() as logs:
        pooled = _quiet(index.index_documents, _config(tmp_path, index_cache=str(tmp_path / "pool"), index_workers=2),
                        tok, shards)
    assert len(serial) == 3 * 40 and pooled == serial
    assert logs == [f"skipped 12 bad records ({{'bad image': 3, 'invalid record': 9}}); first: {shards}/"
                    "train-00000-of-00003.parquet:row 4: image of 43 bytes could not be decoded: cannot identify "
                    f"image file {logs[0].rsplit('cannot identify image file ', 1)[1]}"]
    for name in ("file", "row", "value"):
        np.testing.assert_array_equal(pooled.parts[0].arrays[name], serial.parts[0].arrays[name])

    # two ranks, each scanning half the row groups; rank 0 merges, both map the one cache
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    config = _config(tmp_path, index_cache=str(tmp_path / "ranks"), index_workers=1)

    def rank(r):
        scanned = []
        original = index._scan_documents
        index._scan_documents = lambda file, group, **k: scanned.append(group) or original(file, group, **k)
        built = _quiet(index.index_documents, config, tok, shards, r, 2, barrier.wait)
        results.put((r, pickle.dumps(built), scanned))
    ranks = [context.Process(target=rank, args=(r,)) for r in range(2)]
    for p in ranks:
        p.start()
    got = dict((r, (pickle.loads(b), scanned)) for r, b, scanned in (results.get(timeout=120) for _ in ranks))
    for p in ranks:
        p.join(30)
    groups = 3 * 7  # 44 rows a file (40 and 4 bad) in groups of 7
    assert got[0][0] == serial and got[1][0] == serial
    assert len(got[0][1]) + len(got[1][1]) == groups and abs(len(got[0][1]) - len(got[1][1])) <= 1
    assert not [f for f in os.listdir(tmp_path / "ranks") if "share" in f]  # the shares merged and removed


def test_the_index_is_a_few_bytes_a_document_mapped_and_pickled_by_path(tmp_path):
    shards = _shards(tmp_path / "data", files=2, rows=60)
    config = _config(tmp_path)
    entries = _quiet(index.index_documents, config, ByteTokenizer(), shards)
    arrays = entries.parts[0].arrays
    assert sorted(arrays) == ["file", "row", "value"]  # no line numbers for Parquet rows
    assert sum(a.itemsize for a in arrays.values()) == 6  # uint16 each at this size; 16 at most
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    blob = pickle.dumps(entries)
    assert entries.parts[0].__getstate__()["arrays"] == ["file", "row", "value"]  # by the cache's path
    assert arrays["row"].tobytes() not in blob and arrays["value"].tobytes() not in blob  # not the arrays
    again = pickle.loads(blob)
    assert again == entries and all(isinstance(a, np.memmap) for a in again.parts[0].arrays.values())
    assert entries[0].where == f"{shards}/train-00000-of-00002.parquet:row 1" and entries[-1].offset == 63
    with pytest.raises(IndexError):
        entries[len(entries)]


def test_the_narrowest_type_holds_each_array():
    assert index._narrow([1, 65535], 65535).dtype == np.uint16
    assert index._narrow([1, 65536], 65536).dtype == np.uint32
    assert index._narrow([2**33], 2**33).dtype == np.uint64


# ---- sources and draws ---------------------------------------------------------------------------------

def test_sources_are_parsed_with_counts_and_weights():
    assert parse_sources("a, b=500000 ,c/=0.5x,d=2x") == [Source("a"), Source("b", count=500000),
                                                          Source("c/", weight=0.5), Source("d", weight=2.0)]
    for text, says in [("a=", "after '=' comes a count"), ("a=-3", "after '=' comes a count"),
                       ("a=0x", "a weight must be positive"), ("a=0", "a count must be at least 1"),
                       ("a,,b", "has an empty source")]:
        with pytest.raises(ValueError, match=says):
            parse_sources(text)


def test_draws_are_seeded_and_of_the_size_asked():
    five = drawn(Source("a", count=5), 100, None, seed=1, place=0)
    assert len(five) == 5 == len(set(five.tolist())) and np.array_equal(five, np.sort(five)) and five.dtype == np.uint32
    assert np.array_equal(five, drawn(Source("a", count=5), 100, None, 1, 0))  # the same draw again
    assert not np.array_equal(five, drawn(Source("a", count=5), 100, None, 2, 0))  # another seed
    assert not np.array_equal(five, drawn(Source("a", count=5), 100, None, 1, 1))  # another place in the list
    assert drawn(Source("a", count=500), 100, None, 1, 0) is None  # fewer than asked: all of them
    assert len(drawn(Source("a"), 100, 30, 1, 0)) == 30  # sample_per_source for a source without its own
    assert drawn(Source("a"), 100, None, 1, 0) is None
    twice = drawn(Source("a", weight=2.5), 10, None, 1, 0)
    counts = np.bincount(twice, minlength=10)
    assert len(twice) == 25 and set(counts.tolist()) == {2, 3} and (counts == 3).sum() == 5


def test_moca_recipe_draws_the_authors_sample(tmp_path):
    config = Config.recipe("moca")
    assert config.data.sample_per_source == 500_000 and config.data.sample_seed == 1
    shards = _shards(tmp_path / "data", files=1, rows=30)
    cut = _config(tmp_path, sample_per_source=10)
    with logged() as logs:
        entries = _quiet(index.index_documents, cut, ByteTokenizer(), shards)
    assert len(entries) == 10 and f"1 sources, 10 records an epoch: {shards} 10 of 30" in logs
    whole = _quiet(index.index_documents, _config(tmp_path), ByteTokenizer(), shards)
    picked = drawn(Source(shards), 30, 10, 1, 0)
    assert list(entries) == [whole[int(k)] for k in picked] and len(entries.costs) == 10


@pytest.mark.parametrize("fmt,mode,options", [("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}),
                                              ("JPEG", "RGB", {"progressive": True}),
                                              ("JPEG", "RGB", {"exif": b"Exif\0\0" + b"\0" * 3000}),
                                              ("PNG", "RGBA", {}), ("PNG", "P", {}), ("GIF", "P", {}),
                                              ("WEBP", "RGB", {})])
def test_image_sizes_from_headers_are_pillows(fmt, mode, options):
    from PIL import Image

    from moca.data.images import header_size
    from moca.data.records import image_header
    rng = np.random.default_rng(0)
    for width, height in [(1, 1), (64, 48), (1600, 1200), (3, 599)]:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(
            buffer, format=fmt, **options)
        data = buffer.getvalue()
        fast = header_size(data)
        assert fast == ((width, height) if fmt in ("JPEG", "PNG") else None)  # the others: Pillow reads them
        assert image_header(data, "").size == Image.open(io.BytesIO(data)).size == (width, height)
    with pytest.raises(ValueError, match="could not be decoded"):
        image_header(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "")  # no frame header: Pillow's refusal
    assert header_size(data[:10]) is None


def test_an_index_of_pairs_has_tasks_and_one_of_documents_costs(tmp_path):
    from moca.data import embedded
    pairs = embedded.write_pairs(str(tmp_path / "data"))
    config = _config(tmp_path, **{"run.stage": "cl"})
    index_of_pairs = index.index_pairs(config, pairs)
    assert index_of_pairs.tasks == [e.task for e in index_of_pairs] and getattr(index_of_pairs, "costs", None) is None
    documents = _quiet(index.index_documents, config, ByteTokenizer(), _shards(tmp_path / "docs", files=1))
    assert getattr(documents, "tasks", None) is None and len(documents.costs) == len(documents)
