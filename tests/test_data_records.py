"""moca.data.records: CPT JSON Lines, images by path or base64, bad records counted and skipped
with file and line, or fatal under strict."""
import base64
import io
import json

import pytest
from PIL import Image

from moca.data.records import BadRecords, DataError, read_cpt


def _png(color=(200, 10, 10), size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "red.png").write_bytes(_png())
    b64 = base64.b64encode(_png((0, 0, 255), (8, 9))).decode()
    lines = [
        json.dumps({"text": "just words"}),
        json.dumps({"text": "a <image> picture", "images": ["pics/red.png"]}),
        json.dumps({"text": "<image> then <image>", "images": [f"data:image/png;base64,{b64}", b64]}),
        "{not json",
        json.dumps({"text": "   "}),
        json.dumps({"text": "one <image>", "images": []}),
        json.dumps({"text": "<image>", "images": ["pics/missing.png"]}),
        "",
        json.dumps({"text": "<image>", "images": [str(tmp_path / "pics" / "red.png")]}),
    ]
    path = tmp_path / "cpt.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_valid_documents_and_counts_bad_ones(corpus):
    bad = BadRecords()
    with pytest.warns(UserWarning) as caught:
        docs = list(read_cpt(str(corpus), bad))
    assert [d.text for d in docs] == ["just words", "a <image> picture", "<image> then <image>", "<image>"]
    assert [len(d.images) for d in docs] == [0, 1, 2, 1]
    assert docs[1].images[0].size == (30, 20) and docs[2].images[1].size == (8, 9)
    assert docs[2].where == f"{corpus}:3"
    assert bad.counts == {"malformed JSON": 1, "invalid record": 2, "bad image": 1}
    messages = [str(w.message) for w in caught]
    assert any(f"{corpus}:4: malformed JSON" in m for m in messages)
    assert any(f"{corpus}:5: \"text\" must be a non-empty string" in m for m in messages)
    assert any(f"{corpus}:6: 1 <image> placeholders for 0 images" in m for m in messages)
    assert any(f"{corpus}:7: image 'pics/missing.png' is neither a file nor base64 image data" in m for m in messages)


def test_strict_stops_at_the_first_bad_record_naming_file_and_line(corpus):
    with pytest.raises(DataError, match=rf"{corpus}:4: malformed JSON"):
        list(read_cpt(str(corpus), strict=True))


def test_corrupt_image_file_is_a_bad_record(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    path = tmp_path / "cpt.jsonl"
    path.write_text(json.dumps({"text": "<image>", "images": ["broken.png"]}) + "\n")
    with pytest.raises(DataError, match=r"cpt.jsonl:1: image 'broken.png' could not be decoded"):
        list(read_cpt(str(path), strict=True))
