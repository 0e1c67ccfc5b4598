"""Bad data of every kind, in every reader: CPT documents, stage-2 pairs, evaluation files and
``moca encode`` inputs. Each bad record is counted and skipped with a warning naming file and
line while the good ones go through, or stops the run under strict mode naming file and line;
never a traceback from inside Pillow or json, never a hang, never unbounded memory."""
import io
import json
import logging
import random
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from moca import cli
from moca.data import records
from moca.data.images import MAX_IMAGE_PIXELS
from moca.data.pairs import load_pair, read_pairs
from moca.data.records import BadRecords, DataError, load_cpt, read_cpt
from moca.eval import embed_file, evaluate, read_eval
from moca.files import data_files

# a hang fails the test instead of stalling the suite (Python-level loops; the decompression
# bombs are shown never to reach a decoder at all) (tests/conftest.py)
DEADLINE = 60


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(size=(64, 48), seed=0) -> Image.Image:
    """Random pixels: the compressed data is most of the file, so a truncation cuts into it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG of under 100 bytes whose header declares width x height RGB pixels."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to declare width x height pixels."""
    data = bytearray(_encoded(_noise((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


PNG = _encoded(_noise(), "PNG")
JPEG = _encoded(_noise(), "JPEG")
# name -> the file's bytes (None: no file), whether its header reads (a header-only scan passes it),
# and what the refusal says
BAD_IMAGES = {
    "missing.png": (None, False, "is neither a file nor base64 image data"),
    "empty.png": (b"", False, "could not be decoded"),
    "truncated.png": (PNG[: len(PNG) * 3 // 5], True, "could not be decoded"),
    "truncated.jpg": (JPEG[: len(JPEG) * 3 // 5], True, "could not be decoded"),
    "corrupt.png": (random.Random(0).randbytes(3000), False, "could not be decoded"),
    "corrupt.jpg": (b"\xff\xd8\xff" + random.Random(1).randbytes(3000), False, "could not be decoded"),
    # decompression bombs: billions of pixels (over Pillow's own limit), a few bytes each
    "bomb.png": (_png_declaring(100_000, 100_000), False, "has 10,000,000,000 pixels, over the limit of"),
    "bomb.jpg": (_jpeg_declaring(65_000, 65_000), False, "has 4,225,000,000 pixels, over the limit of"),
    # over moca's limit but under Pillow's: only moca's header check stands in the way
    "large.png": (_png_declaring(9_000, 9_000), False, "has 9000 x 9000 pixels, over the limit of"),
    # a valid image of a shape the processor refuses
    "thin.png": (_encoded(Image.new("RGB", (600, 2)), "PNG"), False,
                 "cannot be used: image of 600 x 2 pixels: aspect ratio over 200"),
}


def _write_images(folder) -> None:
    (folder / "good.png").write_bytes(PNG)
    (folder / "good.jpg").write_bytes(JPEG)
    for name, (data, _, _) in BAD_IMAGES.items():
        if data is not None:
            (folder / name).write_bytes(data)


TEN_MB = 10 * 2**20
# line text (str, or bytes for what is not UTF-8) -> the kind it is counted as, and what the warning says
BAD_LINES = {
    "truncated JSON": ('{"text": "a document cut off in the mid', "malformed JSON", "malformed JSON"),
    "not UTF-8": (b'{"text": "caf\xe9 au lait"}', "not UTF-8", "not UTF-8 (byte 0xe9 at column 14)"),
    "10 MB line": ('{"text": "' + "x" * TEN_MB + '"}', "line too long", "line longer than 8,388,608 bytes"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "malformed JSON", "malformed JSON (nested too deeply)"),
    "huge integer": ('{"text": "t", "n": ' + "9" * 5000 + "}", "malformed JSON", "malformed JSON (Exceeds"),
    "not an object": ('["text", "images"]', "invalid record", "a record must be a JSON object, got list"),
}
CPT_WRONG_TYPES = {
    "text a number": ({"text": 5}, '"text" must be a non-empty string'),
    "text empty": ({"text": "  "}, '"text" must be a non-empty string'),
    # JSON's escapes can spell what no UTF-8 text holds
    "lone surrogate": ({"text": "half of a pair: \ud83d"},
                       "\"text\" holds '\\ud83d', a lone surrogate, at character 16"),
    "images a string": ({"text": "<image>", "images": "good.png"}, '"images" must be a list, got str'),
    "images zero": ({"text": "words", "images": 0}, '"images" must be a list, got int'),
    "image a number": ({"text": "<image>", "images": [5]}, "an image must be a path or base64 string, got int"),
    "image a list": ({"text": "<image>", "images": [["good.png"]]}, "an image must be a path or base64 string"),
    "placeholders": ({"text": "<image> <image>", "images": ["good.png"]}, "2 <image> placeholders for 1 images"),
}


def _line_bytes(line) -> bytes:
    return line if isinstance(line, bytes) else line.encode()


def _cpt_corpus(folder):
    """A CPT file mixing good documents with every kind of bad one: (path, {line: fault},
    the good documents' texts, the lines whose image header reads but whose pixels do not)."""
    _write_images(folder)
    lines, faults, good, late = [], {}, [], []

    def add(line, fault=None):
        lines.append(_line_bytes(line if isinstance(line, (str, bytes)) else json.dumps(line)))
        if fault:
            faults[len(lines)] = fault

    for i, (name, (line, _, _)) in enumerate(BAD_LINES.items()):
        add({"text": f"good document {i}: <image>", "images": ["good.png"] if i % 2 else ["good.jpg"]})
        good.append(f"good document {i}: <image>")
        add(line, name)
    for name, (record, _) in CPT_WRONG_TYPES.items():
        add(record, name)
    for name, (_, header_reads, _) in BAD_IMAGES.items():
        text = f"a <image> from {name}"
        add({"text": text, "images": [name]}, name)
        if header_reads:
            late.append(len(lines))
    add({"text": "text only, last"})
    good.append("text only, last")
    path = folder / "cpt.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, faults, good, late


def _fault_kind(fault: str) -> str:
    if fault in BAD_LINES:
        return BAD_LINES[fault][1]
    return "bad image" if fault in BAD_IMAGES or fault.startswith("image a") else "invalid record"


def _fault_says(fault: str) -> str:
    if fault in BAD_LINES:
        return BAD_LINES[fault][2]
    if fault in BAD_IMAGES:
        return f"image '{fault}' {BAD_IMAGES[fault][2]}"
    return CPT_WRONG_TYPES[fault][1]


def _read(reader, *args, **kwargs):
    """(reader's results, the warnings it gave), with Pillow's own warnings made errors, so that
    one escaping would be seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        out = list(reader(*args, **kwargs))
    return out, [str(w.message) for w in caught]


def _counts(faults: dict) -> dict:
    counts: dict = {}
    for fault in faults.values():
        counts[_fault_kind(fault)] = counts.get(_fault_kind(fault), 0) + 1
    return counts


def test_cpt_bad_records_are_counted_and_skipped_and_the_good_go_through(tmp_path):
    path, faults, good, late = _cpt_corpus(tmp_path)
    bad = BadRecords()
    docs, messages = _read(read_cpt, str(path), bad)
    assert [d.text for d in docs] == good  # the truncated images fail to decode: skipped with the rest
    assert bad.counts == _counts(faults) and bad.total == len(faults)
    assert [m.split(": ", 1)[0] for m in messages] == [f"{path}:{line}" for line in sorted(faults)]
    for line, fault in faults.items():
        assert any(m.startswith(f"{path}:{line}: ") and _fault_says(fault) in m for m in messages), fault
    assert docs[1].images[0].size == (64, 48) and docs[1].where == f"{path}:3"


def test_a_header_only_scan_refuses_what_it_can_and_loading_refuses_the_rest(tmp_path):
    # The training index reads image headers only: a truncated image passes it, and fails when its
    # document is loaded, with file and line (the trainer then skips it).
    path, faults, good, late = _cpt_corpus(tmp_path)
    bad = BadRecords()
    docs, _ = _read(read_cpt, str(path), bad, decode=False)
    late_texts = [f"a <image> from {faults[line]}" for line in late]
    assert [d.text for d in docs] == good[:-1] + late_texts + good[-1:] and bad.total == len(faults) - len(late)
    for doc in docs:
        if doc.text in late_texts:
            with pytest.raises(ValueError, match=rf"^{path}:{doc.where.rsplit(':', 1)[1]}: image '.*' could not be"):
                load_cpt(str(path), doc.offset, doc.where)
        else:  # the offsets stay right past the skipped 10 MB line
            assert load_cpt(str(path), doc.offset, doc.where).text == doc.text


@pytest.mark.parametrize("fault", list(BAD_LINES) + list(CPT_WRONG_TYPES) + list(BAD_IMAGES))
def test_strict_stops_at_the_bad_record_naming_file_and_line(tmp_path, fault):
    _write_images(tmp_path)
    if fault in BAD_LINES:
        line = _line_bytes(BAD_LINES[fault][0])
    else:
        record = CPT_WRONG_TYPES[fault][0] if fault in CPT_WRONG_TYPES else {"text": "<image>", "images": [fault]}
        line = json.dumps(record).encode()
    path = tmp_path / "cpt.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n\n" + line + b"\n" + b'{"text": "after"}\n')
    with pytest.raises(DataError) as caught:
        _read(read_cpt, str(path), strict=True)
    assert str(caught.value).startswith(f"{path}:3: ") and _fault_says(fault) in str(caught.value)
    assert caught.value.__suppress_context__  # shown alone, no traceback from inside Pillow or json


def test_a_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    _write_images(tmp_path)
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    path = tmp_path / "cpt.jsonl"
    names = ["bomb.png", "bomb.jpg", "large.png"]
    path.write_text("".join(json.dumps({"text": f"<image> {n}", "images": [n]}) + "\n" for n in names) +
                    json.dumps({"text": "<image> good", "images": ["good.png"]}) + "\n")
    start, bad = time.perf_counter(), BadRecords()
    docs, messages = _read(read_cpt, str(path), bad)
    assert time.perf_counter() - start < 5
    assert [d.text for d in docs] == ["<image> good"] and decoded == [(64, 48)]  # only the good image decoded
    assert bad.counts == {"bad image": 3}
    assert all(f"over the limit of {MAX_IMAGE_PIXELS:,} (moca.data.images.MAX_IMAGE_PIXELS)" in m for m in messages)
    # Pillow's warning band (89 to 179 megapixels): with its warning an error, still a counted bad record
    (tmp_path / "band.png").write_bytes(_png_declaring(10_000, 10_000))
    path.write_text(json.dumps({"text": "<image>", "images": ["band.png"]}) + "\n")
    with pytest.raises(DataError, match=r"cpt.jsonl:1: image 'band.png' has .* pixels, over the limit"):
        _read(read_cpt, str(path), strict=True)
    # the images of one document count together: one large image named five times is too much
    (tmp_path / "big.png").write_bytes(_png_declaring(8000, 8000))
    path.write_text(json.dumps({"text": "<image>" * 5, "images": ["big.png"] * 5}) + "\n")
    with pytest.raises(DataError, match=r"cpt.jsonl:1: 5 images of 320,000,000 pixels in all, over the limit "
                                        r"of 268,435,456 \(moca.data.images.MAX_DOCUMENT_PIXELS\); refused before"):
        _read(read_cpt, str(path), strict=True)
    assert decoded == [(64, 48)]
    # the limit is a setting of the module: raised, the same image is decoded
    monkeypatch.setattr("moca.data.images.MAX_IMAGE_PIXELS", 10**10)
    assert records.open_image("large.png", str(tmp_path), decode=False).size == (9000, 9000)


def test_an_overlong_line_is_skipped_without_being_held(tmp_path):
    path = tmp_path / "cpt.jsonl"
    with open(path, "wb") as f:  # 40 MB with no newline in it, then a good record
        f.write(b'{"text": "')
        for _ in range(40):
            f.write(b"y" * 2**20)
        f.write(b'"}\n{"text": "after the long line"}\n')
    tracemalloc.start()
    try:
        bad = BadRecords()
        docs, messages = _read(read_cpt, str(path), bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["after the long line"] and docs[0].where == f"{path}:2"
    assert bad.counts == {"line too long": 1} and messages[0].startswith(f"{path}:1: line longer than")
    # at most the limit was read (held twice while Python copies it), never the 40 MB line
    assert peak < 2 * records.MAX_LINE_BYTES + 2**20, peak
    assert load_cpt(str(path), docs[0].offset, docs[0].where).text == "after the long line"


def test_the_line_limit_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 40)
    fits = json.dumps({"text": "x" * 28})  # 40 bytes, then the newline
    over = json.dumps({"text": "x" * 29})
    assert len(fits) == 40
    path = tmp_path / "cpt.jsonl"
    path.write_text(f"{fits}\n{over}\n{fits}")  # the last line without a newline
    bad = BadRecords()
    docs, _ = _read(read_cpt, str(path), bad)
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:3"] and bad.counts == {"line too long": 1}
    with pytest.raises(ValueError, match="cpt.jsonl:2: line longer than 40 bytes"):
        load_cpt(str(path), len(fits) + 1, f"{path}:2")


def _pairs_file(folder):
    """Pairs: good ones and every kind of bad one. (path, {line: (kind, what the warning says)},
    good queries, queries whose image header reads but pixels do not)."""
    _write_images(folder)
    ok = {"text": "a picture"}
    lines, faults, good, late = [], {}, [], []

    def add(record, fault=None):
        lines.append(_line_bytes(record if isinstance(record, (str, bytes)) else json.dumps(record)))
        if fault:
            faults[len(lines)] = fault

    def pair(i, **change):
        return {"query": {"text": f"query {i}"}, "positive": {"image": "good.png"}, "negatives": [ok],
                "task": "t", **change}

    for i, (line, kind, says) in enumerate(BAD_LINES.values()):
        add(pair(i))
        good.append(f"query {i}")
        add(line, (kind, says))
    wrong = [
        (pair(10, query=["not", "a", "side"]), 'a side: a side must be an object with "text" and/or "image"'),
        (pair(11, positive="good.png"), "a side: a side must be an object"),
        (pair(12, negatives={"text": "n"}), '"negatives" must be a list'),
        (pair(13, negatives=["a string"]), "a side: a side must be an object"),
        (pair(14, task=5), '"task" must be a non-empty string'),
        (pair(15, positive={"text": 5}), 'a side: "text" must be a string, got int'),
        (pair(16, positive={"image": 5}), "a side: an image must be a path or base64 string, got int"),
        (pair(17, negatives=[]), "no negatives"),
        ({"query": {"text": "q"}}, 'missing "positive"'),
    ]
    for record, says in wrong:
        kind = "bad image" if "an image must be" in says else "invalid record"
        add(record, (kind, says))
    for i, (name, (_, header_reads, says)) in enumerate(BAD_IMAGES.items()):
        query = f"image query {i}"
        add(pair(i, query={"text": query}, negatives=[{"image": name, "text": "<image> neg"}, ok]),
            ("bad image", f"a side: image '{name}' {says}"))
        if header_reads:
            late.append(query)
    add(pair(99))
    good.append("query 99")
    path = folder / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, faults, good, late


def test_pairs_bad_records_are_counted_and_skipped_or_fatal_under_strict(tmp_path):
    path, faults, good, late = _pairs_file(tmp_path)
    bad = BadRecords()
    pairs, messages = _read(read_pairs, str(path), 1, bad)
    assert [p.query.text for p in pairs] == good
    expected: dict = {}
    for kind, _ in faults.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert bad.counts == expected
    for line, (_, says) in faults.items():
        assert any(m.startswith(f"{path}:{line}: ") and says in m for m in messages), (line, says)
    # the stage-2 index (headers only) keeps the truncated images; loading the pair refuses them
    bad = BadRecords()
    indexed, _ = _read(read_pairs, str(path), 1, bad, decode=False)
    assert [p.query.text for p in indexed] == good[:-1] + late + good[-1:] and bad.total == len(faults) - len(late)
    for p in indexed:
        if p.query.text in late:
            with pytest.raises(ValueError, match=rf"^{p.where}: a side: image '.*' could not be decoded"):
                load_pair(str(path), p.offset, p.where, 1)
        else:
            assert load_pair(str(path), p.offset, p.where, 1).query.text == p.query.text
    first = min(faults)
    with pytest.raises(DataError, match=rf"^{path}:{first}: "):
        _read(read_pairs, str(path), 1, strict=True)


def test_a_pair_decodes_only_the_negatives_a_batch_draws(tmp_path, monkeypatch):
    _write_images(tmp_path)
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    negatives = [{"image": "good.png"}] * 40 + [{"image": "truncated.png"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": {"text": "q"}, "positive": {"text": "p"}, "negatives": negatives}) + "\n" +
                    json.dumps({"query": {"text": "q"}, "positive": {"text": "p"},
                                "negatives": negatives[:2] + [{"image": "bomb.png"}]}) + "\n")
    bad = BadRecords()
    pairs, _ = _read(read_pairs, str(path), 2, bad)
    assert len(pairs) == 1 and len(pairs[0].negatives) == 41
    assert decoded == [(64, 48)] * 4  # the first 2 negatives of each pair: never the 39 others
    assert pairs[0].negatives[1].images[0].size == (64, 48) and pairs[0].negatives[40].images[0].size == (64, 48)
    # every negative's header is checked, drawn or not: a bomb among them costs its pair
    assert bad.counts == {"bad image": 1} and "pairs.jsonl:2: a side: image 'bomb.png' has" in bad.examples[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_dali_refuses_what_it_cannot_decode_naming_file_and_line(tmp_path, device):
    # the header-only index passes a truncated or cut image; DALI's decoder then refuses it, and the
    # next document decodes (the failed pipeline is rebuilt)
    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    from moca.data.cpt import encode
    from moca.data.dali import DaliImages
    from moca.data.tokenizer import ByteTokenizer
    _write_images(tmp_path)
    (tmp_path / "cut.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    names = ["truncated.jpg", "cut.jpg", "truncated.png", "good.jpg"]
    path = tmp_path / "cpt.jsonl"
    path.write_text("".join(json.dumps({"text": f"<image> {n}", "images": [n]}) + "\n" for n in names))
    decoder, tokenizer = DaliImages(device, batch=2), ByteTokenizer()
    docs, _ = _read(read_cpt, str(path), decode=False)
    assert [d.text for d in docs] == [f"<image> {n}" for n in names]
    for doc in docs[:-1]:
        with pytest.raises(ValueError, match=rf"^{doc.where}: DALI could not decode an image: ") as caught:
            encode(doc, tokenizer, 1024, decoder=decoder)
        assert "\n" not in str(caught.value) and "Critical error" not in str(caught.value)  # the reason alone
    good = encode(docs[-1], tokenizer, 1024, decoder=decoder)
    assert good.rows.shape == (good.grids[0].prod().item(), 1176) and torch.isfinite(good.rows).all()


class _Hashed:
    """An encoder whose embeddings are fixed by the side's JSON (a unit vector per distinct side),
    recording every side it is asked for."""

    def __init__(self):
        self.seen = []

    def encode(self, sides):
        self.seen += sides
        rows = []
        for side in sides:
            seed = zlib.crc32(json.dumps(side, sort_keys=True).encode())
            row = torch.randn(16, generator=torch.Generator().manual_seed(seed))
            rows.append(torch.nn.functional.normalize(row, dim=0))
        return torch.stack(rows)


def _eval_file(folder):
    """Evaluation records, good and bad: (path, {line: what the warning says}, good query texts)."""
    _write_images(folder)
    lines, faults, good = [], {}, []

    def add(record, says=None):
        lines.append(_line_bytes(record if isinstance(record, (str, bytes)) else json.dumps(record)))
        if says:
            faults[len(lines)] = says

    def mmeb(i, **change):
        return {"query": {"text": f"eval query {i}"},
                "candidates": [{"image": "good.png"}, {"image": "good.jpg"}, {"text": "words"}], "task": "t", **change}

    for i, (name, (line, _, says)) in enumerate(BAD_LINES.items()):
        add(mmeb(i))
        good.append(f"eval query {i}")
        add(line, 'a record needs "query" and "candidates"' if name == "not an object" else says)
    add(mmeb(20, query={"text": 5}), 'the query: "text" must be a string, got int')
    add(mmeb(21, query=["a list"]), "the query must be an object")
    add(mmeb(22, candidates=[{"text": "a"}, 7]), "a candidate must be an object")
    add(mmeb(23, candidates="good.png"), '"candidates" must be a list')
    add(mmeb(24, task=["a", "list"]), '"task" must be a non-empty string')
    add(mmeb(25, positives=[]), '"positives" must be a non-empty list')
    for name, (_, _, says) in BAD_IMAGES.items():  # every bad image, even one whose header reads
        add(mmeb(30, candidates=[{"image": "good.png"}, {"image": name}]), f"a candidate: image '{name}' {says}")
    add({"query": {"image": "good.png"}, "positives": [{"text": "a"}], "candidates": [{"text": "b"}],
         "task": "retrieval"})
    path = folder / "eval.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, faults, good


def test_evaluation_skips_bad_records_and_scores_the_good_ones(tmp_path, caplog):
    path, faults, good = _eval_file(tmp_path)
    encoder = _Hashed()
    caplog.set_level(logging.INFO, logger="moca")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(encoder, [str(path)])
    messages = [str(w.message) for w in caught]
    assert result["tasks"]["t"]["n"] == len(good) and result["tasks"]["retrieval"]["n"] == 1
    queries = {s["text"] for s in encoder.seen if "text" in s and s["text"].startswith("eval query")}
    assert queries == set(good)  # no side of a bad record was embedded
    assert not any(s.get("image", "").endswith(tuple(BAD_IMAGES)) for s in encoder.seen)
    assert any(f"skipped {len(faults)} bad records" in line for line in caplog.messages)
    for line, says in faults.items():
        assert any(m.startswith(f"{path}:{line}: ") and says in m for m in messages), (line, says)
    with pytest.raises(DataError, match=rf"^{path}:{min(faults)}: "):
        read_eval(str(path), strict=True)


def _inputs_file(folder):
    """``moca encode`` lines: good sides, every kind of bad line, a blank one. (path, {line:
    what the warning says}, {line: good side})."""
    _write_images(folder)
    lines, faults, good = [], {}, {}

    def add(side, says=None):
        lines.append(_line_bytes(side if isinstance(side, (str, bytes)) else json.dumps(side)))
        if says:
            faults[len(lines)] = says
        else:
            good[len(lines)] = side

    add({"text": "a red circle"})
    for name, (line, _, says) in BAD_LINES.items():
        add(line, "the input: a side must be an object" if name == "not an object" else says)
    add({"image": "good.png"})
    add("", "blank line")
    add({"text": 5}, 'the input: "text" must be a string, got int')
    add({"text": "\udc80"}, 'the input: "text" holds')
    add(["a", "list"], 'the input: a side must be an object')
    add({"image": 5}, "the input: an image must be a path or base64 string, got int")
    add({"nothing": 1}, "the input: a side must be an object")
    for name, (_, _, says) in BAD_IMAGES.items():
        add({"image": name}, f"the input: image '{name}' {says}")
    add({"text": "<image> a picture", "image": "good.jpg"})
    path = folder / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, faults, good


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model with random weights, exported the way ``moca encode --export`` writes it."""
    from moca import Encoder
    from moca.data.tokenizer import ByteTokenizer
    from moca.model.qwen import build
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    Encoder(build("tiny"), ByteTokenizer(), max_doc_tokens=512, device="cpu").save_pretrained(str(folder))
    return folder


def test_encode_keeps_rows_aligned_with_lines(tmp_path, export, capsys):
    from moca import Encoder
    path, faults, good = _inputs_file(tmp_path)
    out = tmp_path / "v.npy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings are checked through embed_file below
        assert cli.main(["encode", "--model", str(export), "--input", str(path), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    lines = len(faults) + len(good)
    assert f"{len(faults)} of {lines} input lines could not be embedded" in err and "their rows are NaN" in err
    vectors = np.load(out)
    assert vectors.shape == (lines, 64)
    assert [i + 1 for i in range(lines) if np.isnan(vectors[i]).all()] == sorted(faults)
    encoder = Encoder.from_pretrained(str(export), device="cpu")
    expected = encoder.encode([dict(side, image=str(tmp_path / side["image"])) if "image" in side else side
                               for side in good.values()])
    np.testing.assert_allclose(vectors[[n - 1 for n in good]], expected, rtol=1e-5, atol=1e-5)
    # every bad line is named, file and line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed_file(encoder, str(path))
    messages = [str(w.message) for w in caught]
    for line, says in faults.items():
        assert any(m.startswith(f"{path}:{line}: ") and says in m for m in messages), (line, says)
    # --strict: the first bad line stops it, nothing written
    out.unlink()
    assert cli.main(["encode", "--model", str(export), "--input", str(path), "--output", str(out), "--strict"]) == 2
    assert f"{path}:{min(faults)}: " in capsys.readouterr().err and not out.exists()
    # a file with no usable line is an error, not an array of NaN
    path.write_text("{broken\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["encode", "--model", str(export), "--input", str(path), "--output", str(out)]) == 2
    assert "no line could be embedded" in capsys.readouterr().err and not out.exists()


def test_encoder_api_refuses_a_bad_input_by_its_index(export):
    from moca import Encoder
    encoder = Encoder.from_pretrained(str(export), device="cpu")
    for bad, says in [({"image": 5}, "an image must be a path or base64 string, got int"),
                      ({"image": ["x.png"]}, "an image must be a path or base64 string, got list"),
                      (["a", "list"], "an image must be a path or base64 string, got list")]:
        with pytest.raises(ValueError, match=f"^input 1: {says}"):
            encoder.encode(["fine", bad])


def test_cli_eval_skips_bad_records_or_stops_under_strict(tmp_path, export, capsys):
    path, faults, good = _eval_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["eval", "--model", str(export), "--data", str(path), "--out", str(tmp_path / "s")]) == 0
    assert f"skipped {len(faults)} bad records" in capsys.readouterr().out
    scores = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert scores["tasks"]["t"]["n"] == len(good) and scores["overall"]["n"] == len(good) + 1
    strict = ["eval", "--model", str(export), "--data", str(path), "--out", str(tmp_path / "t"), "--strict"]
    assert cli.main(strict) == 2
    assert f"{path}:{min(faults)}: " in capsys.readouterr().err and not (tmp_path / "t" / "eval.json").exists()


def test_training_skips_every_kind_of_bad_document_or_stops_under_strict(tmp_path, capsys):
    path, faults, good, late = _cpt_corpus(tmp_path)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", "--stage", "cpt", "--data", str(path), "--out", str(run), "--max-steps", "2",
                         "token_budget=1024", "log_every=1", "cache_bytes=0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"skipped {len(faults) - len(late)} bad records" in out  # at indexing
    # the truncated images pass the header-only index, and are skipped when their micro-batch is read
    assert f"{len(good) + len(late)} documents, 1 micro-batches" in out
    for line in late:
        assert f"{path}:{line}: image '{faults[line]}' could not be decoded: image file is truncated" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    code = cli.main(["train", "--stage", "cpt", "--data", str(path), "--out", str(tmp_path / "strict"), "--strict",
                     "--max-steps", "2"])
    assert code == 2 and f"{path}:{min(faults)}: " in capsys.readouterr().err


def test_data_files_names_the_argument_and_reads_folders_literally(tmp_path):
    """A folder whose name holds glob characters is listed, not taken as a pattern; an empty
    folder or a missing path is an error naming the argument; ``recursive`` reaches subfolders
    and the suffixes choose the files."""
    folder = tmp_path / "shard[0]"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "notes.txt", "sub/c.parquet", "sub/d.jsonl"):
        (folder / name).write_text("{}\n")
    assert data_files(str(folder)) == [str(folder / "a.jsonl"), str(folder / "b.jsonl")]
    assert data_files(str(folder), "", (".jsonl", ".parquet"), recursive=True) == [
        str(folder / n) for n in ("a.jsonl", "b.jsonl", "sub/c.parquet", "sub/d.jsonl")]
    assert data_files(str(folder / "notes.txt")) == [str(folder / "notes.txt")]  # a file is taken as given
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^evaluation .*empty: no \.jsonl files in the folder$"):
        data_files(str(tmp_path / "empty"), "evaluation")
    with pytest.raises(ValueError, match=r"^--data .*gone: no such file or folder$"):
        data_files(str(tmp_path / "gone"))
    with pytest.raises(ValueError, match=r"^\S*sub: no \.tsv files under the folder$"):
        data_files(str(folder / "sub"), "", (".tsv",), recursive=True)
