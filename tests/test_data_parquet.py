"""The authors' data as distributed, read in place: Parquet shards and ``datasets.save_to_disk``
folders of ``{"text", "images": [bytes | {"bytes", "path"}]}`` rows with the authors' image
markers, and MMEB-train's Parquet pairs with an image root; several sources sampled in one run;
bad rows counted and named by file and row; a shard that is not Parquet refused in one line.
Stage 1 and stage 2 run through ``moca train`` as users run it, and resume to the same metrics."""
import io
import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moca import cli
from moca.data.pairs import load_pair, read_pairs
from moca.data.records import AUTHORS_MARKER, BadRecords, DataError, load_cpt, read_cpt

TIMED = ("tokens_per_s", "model_tflops")
CPT = ["--stage", "cpt", "token_budget=256", "max_doc_tokens=256", "prefetch=0", "log_every=1", "cache_bytes=0"]


def jpeg(seed: int, width: int = 64, height: int = 48) -> bytes:
    """A small real JPEG of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def cpt_rows(count: int, seed: int, hf_images: bool = False, bad: bool = True) -> tuple[list[dict], dict[int, str]]:
    """``count`` stage-1 rows in the authors' form (a third text only, the rest with one or two
    images marked by the authors' marker, one with moca's ``<image>``), images as bytes or, with
    ``hf_images``, as ``{"bytes", "path"}``; with ``bad``, four bad rows: (rows, {row number from 1:
    what the warning says})."""
    def image(k):
        data = jpeg(seed * 1000 + k)
        return {"bytes": data, "path": f"img{k}.jpg"} if hf_images else data
    rows = []
    for i in range(count):
        words = " ".join(["the red circle is on a green square"] * (1 + i % 4))
        if i % 3 == 0:
            rows.append({"text": f"document {i} of source {seed}: {words}", "images": []})
        elif i % 3 == 1:
            rows.append({"text": f"{AUTHORS_MARKER}document {i}: {words}", "images": [image(i)]})
        else:
            mark = "<image>" if i == 2 else AUTHORS_MARKER
            rows.append({"text": f"a {mark} then {words} {AUTHORS_MARKER} end {i}", "images": [image(i), image(-i)]})
    problems = {}
    if bad:
        broken = b"\xff\xd8\xff" + b"\x00" * 40  # a JPEG whose header cannot be read
        wrong = [({"text": f"{AUTHORS_MARKER} a corrupt picture", "images": [broken]}, "could not be decoded"),
                 ({"text": "two markers" + AUTHORS_MARKER * 2, "images": [image(7)]}, "2 <image> placeholders for 1"),
                 ({"text": "   ", "images": []}, '"text" must be a non-empty string'),
                 ({"text": "a stray <|image_pad|> token", "images": []}, "holds <|image_pad|> outside the image")]
        for k, (row, says) in enumerate(wrong):
            if hf_images:
                row["images"] = [{"bytes": b, "path": "x.jpg"} if isinstance(b, bytes) else b for b in row["images"]]
            place = 3 + 5 * k
            rows.insert(place, row)
            problems[place + 1] = says
    return rows, problems


def _schema(hf_images: bool) -> pa.Schema:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if hf_images else pa.binary()
    return pa.schema([("text", pa.string()), ("images", pa.list_(image))])


def write_parquet(path, rows: list[dict], row_group_size: int = 8, hf_images: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(hf_images)), path, row_group_size=row_group_size)
    return str(path)


def write_saved_dataset(folder, rows: list[dict], batch_rows: int = 8) -> str:
    """A folder as ``datasets.Dataset.save_to_disk`` writes it: an Arrow stream file (record
    batches of ``batch_rows``), ``state.json`` naming it, ``dataset_info.json``."""
    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=_schema(True))
    with pa.OSFile(os.path.join(folder, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0",
                   "_format_type": None, "_split": "train"}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {"text": {"dtype": "string", "_type": "Value"}}}, f)
    return str(folder)


def stage_one_sources(root) -> tuple[str, str, str, dict]:
    """Three sources: two Parquet shards of the authors' rows (bytes), a save_to_disk folder (HF
    images), a JSON Lines file; (shards folder, saved folder, jsonl file, {file: bad rows})."""
    a0, bad0 = cpt_rows(20, 1)
    a1, _ = cpt_rows(12, 2, bad=False)
    shards = root / "pixelprose" / "data"
    first = write_parquet(shards / "train-00000-of-00002.parquet", a0)
    write_parquet(shards / "train-00001-of-00002.parquet", a1)
    b, bad_b = cpt_rows(18, 3, hf_images=True)
    saved = write_saved_dataset(root / "docmatix", b)
    jsonl = root / "dclm.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"plain text document {i} about the blue triangle"}) + "\n"
                             for i in range(10)))
    return str(root / "pixelprose"), saved, str(jsonl), {first: bad0, os.path.join(saved, "data-00000-of-00001.arrow"):
                                                         bad_b}


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


# ---- reading rows -----------------------------------------------------------------------------------

def test_parquet_rows_are_read_with_the_authors_markers_and_bad_rows_named(tmp_path):
    rows, problems = cpt_rows(20, 1)
    path = write_parquet(tmp_path / "s.parquet", rows, row_group_size=6)
    bad = BadRecords()
    with pytest.warns(UserWarning) as caught:
        docs = list(read_cpt(path, bad, decode=False))
    assert len(docs) == 20 and bad.total == 4 and bad.counts["bad image"] == 1
    said = [str(w.message) for w in caught]
    for number, says in problems.items():
        assert any(m.startswith(f"{path}:row {number}: ") and says in m for m in said), (number, said)
    by_row = {doc.offset: doc for doc in docs}
    assert by_row[1].text.startswith("<image>document 1") and by_row[1].images[0].size == (64, 48)
    assert by_row[2].text.count("<image>") == 2 and AUTHORS_MARKER not in by_row[2].text
    assert by_row[1].where == f"{path}:row 2"
    for doc in docs:  # found again by its row, images decoded from the row's bytes
        again = load_cpt(path, doc.offset, doc.where)
        assert again.text == doc.text and [im.size for im in again.images] == [im.size for im in doc.images]
        assert all(im.getbbox() is not None for im in again.images)
    assert not list((tmp_path).glob("*.jpg"))  # nothing written out
    with pytest.raises(DataError, match=rf"^{path}:row 4: image of 43 bytes could not be decoded"):
        list(read_cpt(path, strict=True))


def test_a_save_to_disk_folder_is_read_in_place(tmp_path):
    from moca.data.shards import source_files
    rows, problems = cpt_rows(16, 5, hf_images=True)
    folder = write_saved_dataset(tmp_path / "saved", rows, batch_rows=4)
    (arrow,) = source_files(folder)
    assert arrow == os.path.join(folder, "data-00000-of-00001.arrow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = BadRecords()
        docs = list(read_cpt(arrow, bad))
    assert len(docs) == 16 and bad.total == len(problems) == 4
    assert load_cpt(arrow, docs[-1].offset, docs[-1].where).text == docs[-1].text
    assert docs[-1].where == f"{arrow}:row {len(rows)}"


def test_a_shard_that_is_not_parquet_is_one_line_from_moca_train(tmp_path, capsys):
    folder = tmp_path / "shards"
    write_parquet(folder / "train-00000-of-00002.parquet", cpt_rows(6, 1, bad=False)[0])
    (folder / "train-00001-of-00002.parquet").write_bytes(b"<html>rate limited</html>")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *CPT, "--data", str(folder), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moca train: {folder / 'train-00001-of-00002.parquet'}: not a Parquet "
                                               "file (")


def test_a_parquet_shard_without_text_is_one_line(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"caption": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=rf"^{path}: no 'text' column \(it has caption\)$"):
        list(read_cpt(str(path)))


# ---- stage 1 through moca train --------------------------------------------------------------------

def test_stage_one_on_several_sources_of_the_authors_rows_trains_and_resumes(tmp_path, capsys):
    parquet, saved, jsonl, problems = stage_one_sources(tmp_path / "data")
    data = f"{parquet}=20,{saved}=0.5x,{jsonl}"
    run = str(tmp_path / "run")
    settings = [*CPT, "--data", data, "--max-steps", "5", "save_every=2", "keep_checkpoints=5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--out", run, *settings]) == 0
    out = capsys.readouterr().out
    # 32 usable rows of the shards (36 less 4 bad), 20 drawn; 18 of the saved folder (22 less 4), half drawn; 10 lines
    assert f"3 sources, 39 records an epoch: {parquet} 20 of 32; {saved} 9 of 18; {jsonl} 10 of 10" in out
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert skipped and skipped[0].startswith("skipped 8 bad records (")
    first_file = next(iter(problems))
    assert f"first: {first_file}:row 4: " in skipped[0]
    assert "39 documents" in out
    whole = _rows(run)
    assert [r["step"] for r in whole] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in whole)
    assert json.load(open(os.path.join(run, "config.json")))["data"]["documents"] == data

    cut = str(tmp_path / "cut")
    shutil.copytree(run, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", "step-0000004"))
    shutil.rmtree(os.path.join(cut, "checkpoints", "step-0000005"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--resume", cut, *settings]) == 0
    assert "resumed" in capsys.readouterr().out
    assert _rows(cut) == whole
    # the draw is part of what a resumed run must match
    other = [*CPT, "--data", f"{parquet}=21,{saved}=0.5x,{jsonl}", "--max-steps", "6", "save_every=2"]
    assert cli.main(["train", "--resume", cut, *other]) == 2
    assert "data.documents" in capsys.readouterr().err


def test_print_config_shows_the_sources_and_their_draws(tmp_path, capsys):
    assert cli.main(["train", "--print-config", "--stage", "cpt", "--recipe", "moca", "--data", "a/=1000,b.parquet=2x,c"
                     ]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert data["documents"] == "a/=1000,b.parquet=2x,c" and data["sample_per_source"] == 500_000
    assert data["sample_seed"] == 1
    assert cli.main(["train", "--print-config", "--data", "a=many"]) == 2
    assert "data.documents: 'a=many': after '=' comes a count (=500000) or a weight (=0.5x)" in capsys.readouterr().err


# ---- stage 2: MMEB-train's Parquet -------------------------------------------------------------------

def mmeb_train(root, images) -> tuple[str, int]:
    """Two MMEB-train subsets as Hugging Face publishes them (a folder per subset of Parquet
    shards), image paths relative to ``images``; negatives as the authors' Python-literal lists.
    (the folder, how many rows are bad)."""
    for k in range(6):
        Image.open(io.BytesIO(jpeg(100 + k))).save(images / f"{k}.jpg")
    rows = {"ImageNet_1K": [], "MSCOCO_t2i": []}
    for i in range(12):
        rows["ImageNet_1K"].append({
            "qry": "<|image_1|> Represent the given image for classification", "qry_image_path": f"{i % 6}.jpg",
            "pos_text": f"class {i}", "pos_image_path": "",
            "neg_text": str([f"class {i + 1}", f"class {i + 2}"]), "neg_image_path": str(["", ""])})
        rows["MSCOCO_t2i"].append({
            "qry": f"Find me an everyday image that matches the caption: picture {i}", "qry_image_path": "",
            "pos_text": "<|image_1|> Represent the given image.", "pos_image_path": f"{(i + 1) % 6}.jpg",
            "neg_text": str(["<|image_1|> Represent the given image."]), "neg_image_path": str([f"{(i + 2) % 6}.jpg"])})
    rows["MSCOCO_t2i"][3]["pos_image_path"] = "missing.jpg"
    rows["ImageNet_1K"][5]["neg_text"] = "[unclosed"
    for task, subset in rows.items():
        folder = root / task
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(subset), folder / "train-00000-of-00001.parquet", row_group_size=5)
    return str(root), 2


def test_mmeb_train_parquet_pairs_are_read_with_an_image_root(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    folder, _ = mmeb_train(tmp_path / "MMEB-train", images)
    path = os.path.join(folder, "MSCOCO_t2i", "train-00000-of-00001.parquet")
    bad = BadRecords()
    with pytest.warns(UserWarning, match=r"train-00000-of-00001.parquet:row 4: a side: image '.*missing.jpg' is "):
        pairs = list(read_pairs(path, 1, bad, decode=False, image_root=str(images)))
    assert len(pairs) == 11 and bad.total == 1 and {p.task for p in pairs} == {"MSCOCO_t2i"}
    again = load_pair(path, pairs[0].offset, pairs[0].where, 1, image_root=str(images))
    assert again.query.text.startswith("Find me") and again.positive.text == "<image> Represent the given image."
    assert again.positive.images[0].size == (64, 48) and len(again.negatives) == 1


def test_stage_two_on_mmeb_train_parquet_trains_and_resumes(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    folder, bad = mmeb_train(tmp_path / "MMEB-train", images)
    run = str(tmp_path / "run")
    settings = ["--stage", "cl", "--data", folder, f"image_root={images}", "pairs_per_batch=4", "hard_negatives=2",
                "token_budget=256", "max_doc_tokens=256", "prefetch=0", "log_every=1", "--max-steps", "4",
                "save_every=2", "keep_checkpoints=4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--out", run, *settings]) == 0
    out = capsys.readouterr().out
    assert "22 pairs of 2 task(s) (ImageNet_1K, MSCOCO_t2i)" in out and f"skipped {bad} bad records" in out
    whole = _rows(run)
    assert [r["step"] for r in whole] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in whole)
    cut = str(tmp_path / "cut")
    shutil.copytree(run, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", "step-0000004"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--resume", cut, *settings]) == 0
    assert _rows(cut) == whole
