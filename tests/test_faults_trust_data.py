"""Faults that must neither stop every later run nor write where moca must not: a micro-batch
(or a contrastive batch) of which no record can be read, a damaged index cache, outputs and run
locks that are links, devices or FIFOs, and small files read whole that are not files or are huge.
Each is driven through the command a user runs where it concerns one (``moca train``, ``moca data
convert``), and each test checks values: counts, the file named, contents left as they were."""
import errno
import io
import json
import os
import shutil
import stat
import warnings

import numpy as np
import pytest
from lines import logged
from PIL import Image

from moca import cli
from moca.config import Config
from moca.data import index, loader
from moca.data.index import PairEntry
from moca.data.tokenizer import ByteTokenizer
from moca.files import MAX_READ_BYTES, RunLock, atomic_write, read_bounded

CPT = ["--stage", "cpt", "token_budget=256", "max_doc_tokens=256", "prefetch=0", "log_every=1", "cache_bytes=0"]
TIMED = ("tokens_per_s", "model_tflops")


# a reader that blocks on a FIFO fails the test instead of stalling the suite (tests/conftest.py)
DEADLINE = 120


def _documents(folder) -> tuple[str, int]:
    """A CPT file of 16 short documents and, on line 10, one that fills a micro-batch alone and
    whose image's header reads but whose pixels are cut short: (path, that line)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    (folder / "ok.png").write_bytes(png)
    (folder / "cut.png").write_bytes(png[: len(png) * 3 // 5])
    records = [{"text": f"document {i} about shapes and colours" + (" <image>" if i % 3 == 0 else ""),
                **({"images": ["ok.png"]} if i % 3 == 0 else {})} for i in range(16)]
    records.insert(9, {"text": "a long document whose picture is cut short, " * 7 + "<image>", "images": ["cut.png"]})
    path = folder / "cpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), 10


def _rows(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _mknod_or_fifo(path) -> str:
    """A character device like /dev/null at ``path`` where this process may make one (as root),
    else a FIFO: (what the refusal calls it)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return "a character device"
    except PermissionError:
        os.mkfifo(path)
        return "a FIFO"


# ---- a micro-batch of unreadable documents ----------------------------------------------------

def test_a_micro_batch_of_unreadable_documents_is_passed_over_and_resume_does_not_stick(tmp_path, capsys):
    """The cut image's document is a micro-batch of its own: the run passes it over (counted, its
    file and line named) in each epoch, and a run resumed just before it ends like the run that
    never stopped. Under strict mode the bad record still stops the run."""
    data, line = _documents(tmp_path)
    run = str(tmp_path / "run")
    settings = [*CPT, "--data", data, "--max-steps", "7", "save_every=2", "keep_checkpoints=4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--out", run, *settings]) == 0
    out = capsys.readouterr().out
    assert "17 documents, 4 micro-batches" in out  # the cut image's header passed the index
    passed = [s for s in out.splitlines() if "passed over" in s]
    bad = f"{data}:{line}: image 'cut.png' could not be decoded"
    # the packing puts it third in each epoch: steps 3 and 7
    assert passed == [f"micro-batch 2 of epoch 0 passed over (1 so far): none of its 1 documents could be read "
                      f"(first: {bad}: image file is truncated)",
                      "micro-batch 2 of epoch 1 passed over (2 so far): none of its 1 documents could be read "
                      f"(first: {bad}: image file is truncated)"], out
    whole = _rows(run)
    assert [r["step"] for r in whole] == list(range(1, 8)) and all(np.isfinite(r["loss"]) for r in whole)

    # resumed from step 2's checkpoint, just before the bad micro-batch: passed over again, the same run
    cut = str(tmp_path / "cut")
    shutil.copytree(run, cut)
    for step in (4, 6, 7):
        shutil.rmtree(os.path.join(cut, "checkpoints", f"step-{step:07d}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["train", "--resume", cut, *settings]) == 0
    out = capsys.readouterr().out
    assert f"resumed {cut} at step 2" in out and "micro-batch 2 of epoch 0 passed over (1 so far)" in out
    assert _rows(cut) == whole

    assert cli.main(["train", "--out", str(tmp_path / "strict"), "--strict", *settings]) == 2
    assert f"moca train: {bad}" in capsys.readouterr().err


def _pairs_config(pairs_per_batch: int) -> Config:
    return Config().update({"run.stage": "cl", "pairs_per_batch": pairs_per_batch, "hard_negatives": 0})


def test_a_contrastive_batch_of_unreadable_pairs_is_passed_over_on_every_rank(tmp_path):
    """Rank 1's slice of batch 1 cannot be read: that rank takes its slice of batch 2 in its
    place, rank 0 its own slice of batch 1; both stay at one data position, and a stream
    restarted at that position chooses as the one that never stopped."""
    entries = [PairEntry("pairs.jsonl", i, f"pairs.jsonl:{i + 1}", "t") for i in range(12)]
    config = _pairs_config(2)
    batches = loader.contrastive_batches(["t"] * 12, 4, config.run.seed, 0, config.cl.task_batching == "mixed")
    unreadable = set(batches[1][2:])

    def stream(rank, position=0):
        def load(i):
            if i in unreadable:
                raise ValueError(f"pairs.jsonl:{i + 1}: image 'cut.png' could not be decoded")
            return i
        cache = loader.Cache(load, lambda _: 0, "pair", 0, False)
        return loader.pair_batch_stream(entries, cache, config, 0, position, rank, 2), cache

    with logged() as logs:
        ranks = [stream(0), stream(1)]
        got = [[next(s) for _ in range(3)] for s, _ in ranks]
    assert [(e, p) for _, e, p in got[0]] == [(e, p) for _, e, p in got[1]] == [(0, 1), (0, 2), (0, 3)]
    assert [c for c, _, _ in got[0]] == [batches[b][:2] for b in range(3)]
    assert [c for c, _, _ in got[1]] == [batches[0][2:], batches[2][2:], batches[2][2:]]
    first = min(unreadable)
    assert [line for line in logs if "passed over" in line] == [  # rank 1's: rank 0 passed over none
        f"batch 1 of epoch 0 passed over (1 so far): none of its 2 pairs could be read "
        f"(first: pairs.jsonl:{first + 1}: image 'cut.png' could not be decoded)"]
    assert ranks[1][1].passed_over == 1 and ranks[0][1].passed_over == 0
    restarted, _ = stream(1, position=1)
    assert next(restarted) == (batches[2][2:], 0, 2)


def test_a_stream_of_which_nothing_can_be_read_stops_naming_the_epoch(tmp_path):
    entries = [PairEntry("pairs.jsonl", i, f"pairs.jsonl:{i + 1}", "t") for i in range(4)]

    def load(i):
        raise ValueError(f"pairs.jsonl:{i + 1}: bad")
    cache = loader.Cache(load, lambda _: 0, "pair", 0, False)
    nothing = r"^no pair of epoch 0 could be read \(see the warnings above\)$"
    with logged() as logs, pytest.raises(ValueError, match=nothing):
        next(loader.pair_batch_stream(entries, cache, _pairs_config(2), 0, 0, 0, 1))
    assert cache.passed_over == 2 and len(logs) == 4 + 2  # each pair once, then each batch passed over


# ---- the index cache ----------------------------------------------------------------------------

def _index_config(tmp_path, data) -> Config:
    return Config().update({"run.stage": "cpt", "out": str(tmp_path / "run"), "documents": data,
                            "index_cache": str(tmp_path / "index"), "token_budget": 256, "max_doc_tokens": 256})


def _cache_file(tmp_path, name: str = "json") -> str:
    """The index cache's manifest (``json``) or one of its arrays (``row.npy``, ...)."""
    (found,) = [f for f in os.listdir(tmp_path / "index") if f.endswith(f".{name}")]
    return str(tmp_path / "index" / found)


def _fifo(path) -> None:
    os.remove(path)
    os.mkfifo(path)


def _folder(path) -> None:
    os.remove(path)
    os.mkdir(path)


def _huge(path) -> None:
    os.truncate(path, 2**28)  # over the bound of a manifest (MAX_READ_BYTES); sparse: no disk used


def _rewritten(change):
    """A harm that rewrites the manifest's JSON with ``change(saved)``."""
    def harm(path):
        with open(path) as f:
            saved = json.load(f)
        with open(path, "w") as f:
            json.dump(change(saved), f)
    return harm


def _array(name: str, change):
    """A harm to the array ``name`` beside the manifest: saved again as ``change(array)``."""
    def harm(path):
        target = path.removesuffix(".json") + f".{name}.npy"
        array = np.load(target)
        os.remove(target)
        np.save(target, change(array))
    return harm


def _torn_rows(path) -> None:
    """The row array cut short, as a crash mid-write would leave it (a new file: the index
    already made maps the old one)."""
    target = path.removesuffix(".json") + ".row.npy"
    content = open(target, "rb").read()
    os.remove(target)
    open(target, "wb").write(content[: len(content) - 3])


DAMAGE = {
    # name: (what is done to the cache's manifest or arrays, what the warning says ({manifest}: the
    # manifest; {array}: the row array), whether the cache is written again)
    "torn": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "index cache {manifest} is not JSON (", True),
    "empty": (lambda p: os.truncate(p, 0), "index cache {manifest} is not JSON (", True),
    "a list": (lambda p: open(p, "w").write("[1, 2, 3]"),
               "index cache {manifest} is not an index cache of this version of moca", True),
    "other keys": (lambda p: open(p, "w").write('{"entries": [], "bad": {}}'),
                   "index cache {manifest} is not an index cache of this version of moca", True),
    "counts as text": (_rewritten(lambda s: {**s, "bad": {"bad image": "1"}}),
                       "index cache {manifest} holds values of the wrong types or out of range", True),
    "another file's": (_rewritten(lambda s: {**s, "source": ["x", 1, 2]}),
                       "index cache {manifest} was made from other files or with other settings", True),
    "rows torn": (_torn_rows,
                  "index cache {array} cannot be read (", True),
    "rows of another type": (_array("row", lambda a: a.astype(np.float32)),
                             "index cache {array} is not the array its manifest describes", True),
    "offset past the end": (_array("row", lambda a: a + 10**4),
                            "index cache {stem}.*.npy holds values out of range", True),
    "not UTF-8": (lambda p: open(p, "wb").write(b'{"source": "\xff"}'),
                  "index cache {manifest} is not UTF-8 text (byte 12)", True),
    "huge": (_huge, f"index cache {{manifest}} is larger than {MAX_READ_BYTES:,} bytes, the most read of it", True),
    "a FIFO": (_fifo, "index cache {manifest} is a FIFO, not a regular file", False),
    "a folder": (_folder, "index cache {manifest} is a folder, not a regular file", False),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_index_cache_is_named_and_made_again(tmp_path, damage):
    data, _ = _documents(tmp_path)
    config, tok = _index_config(tmp_path, data), ByteTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = index.index_documents(config, tok, data)
        cached = _cache_file(tmp_path)
        files = sorted(os.listdir(tmp_path / "index"))
        content = open(cached, "rb").read()
        harm, says, rewritten = DAMAGE[damage]
        harm(cached)
        with logged() as logs:
            again = index.index_documents(config, tok, data)
    assert again == first
    stem = cached.removesuffix(".json")
    assert logs[0].startswith(says.format(manifest=cached, array=f"{stem}.row.npy", stem=stem))
    assert logs[0].endswith(f"; {data} is indexed again")
    if rewritten:
        assert open(cached, "rb").read() == content and len(logs) == 1
    else:  # left as it is, and the index goes uncached
        assert not stat.S_ISREG(os.lstat(cached).st_mode)
        assert logs[1].startswith(f"index cache {cached} not written ({cached} is ") and len(logs) == 2
    assert sorted(os.listdir(tmp_path / "index")) == files


def test_a_torn_index_cache_does_not_stop_moca_train(tmp_path, capsys):
    data, _ = _documents(tmp_path)
    run = str(tmp_path / "run")
    argv = ["train", "--out", run, *CPT, "--data", data, "--max-steps", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 0
        (cached,) = [os.path.join(run, "index", f) for f in os.listdir(os.path.join(run, "index"))
                     if f.endswith(".json")]
        os.truncate(cached, 0)
        capsys.readouterr()
        assert cli.main(["train", "--resume", run, *CPT, "--data", data, "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"index cache {cached} is not JSON (" in out and f"; {data} is indexed again" in out
    assert json.load(open(cached))["files"] == [data]


def test_an_index_cache_that_cannot_be_written_costs_nothing_but_the_cache(tmp_path, monkeypatch):
    """A disk that fills while the cache is written: the index is used, no torn or temporary
    file is left, and the warning names the cache file."""
    data, _ = _documents(tmp_path)
    config = _index_config(tmp_path, data)

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with warnings.catch_warnings(), logged() as logs:
        warnings.simplefilter("ignore")
        entries = index.index_documents(config, ByteTokenizer(), data)
    assert len(entries) == 17 and os.listdir(tmp_path / "index") == []
    assert logs[0].startswith(f"index cache {tmp_path / 'index'}/") and logs[0].endswith(
        f".json not written ([Errno 28] No space left on device); the next run indexes {data} again")


# ---- no writes through links or onto devices ---------------------------------------------------

def test_a_run_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / ".lock")
    data, _ = _documents(tmp_path)
    assert cli.main(["train", "--out", str(run), *CPT, "--data", data, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moca train: {run / '.lock'} is a symbolic link, not a regular file; moca writes only regular "
                   "files (remove it or choose another path)\n")
    assert victim.read_text() == "precious\n" and os.path.islink(run / ".lock")
    os.remove(run / ".lock")
    os.link(victim, run / ".lock")  # a hard link: rewriting the lock would rewrite the victim
    with pytest.raises(ValueError, match=r"\.lock has 2 hard links; the run lock, which its holder rewrites, must "):
        RunLock(str(run)).__enter__()
    assert victim.read_text() == "precious\n"
    os.remove(run / ".lock")
    os.mkfifo(run / ".lock")
    with pytest.raises(ValueError, match=r"\.lock is a FIFO, not a regular file"):
        RunLock(str(run)).__enter__()


@pytest.mark.parametrize("kind", ["link", "device", "fifo", "folder"])
def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path, kind):
    victim, path = tmp_path / "victim.txt", tmp_path / "out.json"
    victim.write_text("precious\n")
    says = {"link": "a symbolic link", "folder": "a folder", "fifo": "a FIFO"}.get(kind)
    if kind == "link":
        os.symlink(victim, path)
    elif kind == "device":
        says = _mknod_or_fifo(path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    before = os.lstat(path)
    with pytest.raises(ValueError, match=f"^{path} is {says}, not a regular file; moca writes only regular files"):
        atomic_write(str(path), b"new\n")
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode) and victim.read_text() == "precious\n"
    assert sorted(os.listdir(tmp_path)) == ["out.json", "victim.txt"]  # no temporary file left


def _mmeb_rows(folder) -> str:
    (folder / "q.png").write_bytes(open(folder / "ok.png", "rb").read())
    rows = [{"qry_text": f"query {i}", "qry_img_path": "q.png", "tgt_text": ["yes", "no"], "tgt_img_path": ["", ""]}
            for i in range(3)]
    path = folder / "mmeb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["device", "link"])
def test_convert_refuses_an_output_that_is_not_a_regular_file(tmp_path, capsys, kind):
    _documents(tmp_path)
    rows = _mmeb_rows(tmp_path)
    output, victim = tmp_path / "out.jsonl", tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    if kind == "link":
        os.symlink(victim, output)
        says = "a symbolic link"
    else:
        says = _mknod_or_fifo(output)
    before = os.lstat(output)
    assert cli.main(["data", "convert", rows, "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"moca data convert: {output} is {says}, not a regular file; moca writes only "
                                       "regular files (remove it or choose another path)\n")
    after = os.lstat(output)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode) and victim.read_text() == "precious\n"
    assert not any(name.startswith("out.jsonl.") for name in os.listdir(tmp_path))


def test_convert_refuses_an_images_folder_that_is_a_link(tmp_path, capsys):
    _documents(tmp_path)
    rows = _mmeb_rows(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "out_images")
    assert cli.main(["data", "convert", rows, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == (f"moca data convert: {tmp_path / 'out_images'} is a symbolic link, not a "
                                       "folder; moca writes only into real folders (remove it or choose another "
                                       "path)\n")
    assert os.listdir(elsewhere) == [] and not (tmp_path / "out.jsonl").exists()


# ---- small files read whole ---------------------------------------------------------------------

def test_read_bounded_reads_regular_files_within_the_bound_and_names_the_file_otherwise(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": "é"}')
    assert read_bounded(str(path), "config") == '{"a": "é"}' and MAX_READ_BYTES == 16 * 2**20
    assert read_bounded(str(path), "config", limit=11) == '{"a": "é"}'  # 11 bytes: the bound is inclusive
    with pytest.raises(ValueError, match=f"^config {path} is larger than 10 bytes, the most read of it$"):
        read_bounded(str(path), "config", limit=10)
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)  # no writer: an open or read that blocked would hang here
    with pytest.raises(ValueError, match=f"^manifest {fifo} is a FIFO, not a regular file$"):
        read_bounded(str(fifo), "manifest")
    with pytest.raises(ValueError, match=f"^moca.json {tmp_path} is a folder, not a regular file$"):
        read_bounded(str(tmp_path), "moca.json")
    (tmp_path / "latin1.toml").write_bytes(b"name = '\xe9'")
    with pytest.raises(ValueError, match=r"latin1\.toml is not UTF-8 text \(byte 8\)$"):
        read_bounded(str(tmp_path / "latin1.toml"), "config")
    with pytest.raises(FileNotFoundError):
        read_bounded(str(tmp_path / "gone.json"), "config")
