"""Files: the data files a path names, files that survive a crash or a second process (atomic
writes and the run-directory lock), and the rule for every file moca writes: a regular file or
nothing there (never through a link, never onto a device), and for every small file it reads
whole: a regular file of bounded size."""
from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import secrets
import socket
import stat

# The most read_bounded takes by default: far over any config, manifest or moca.json.
MAX_READ_BYTES = 16 * 2**20
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def data_files(path: str, what: str = "--data", suffixes: tuple[str, ...] = (".jsonl",),
               recursive: bool = False) -> list[str]:
    """``path`` itself, or the files ending in one of ``suffixes`` in the folder ``path`` (and in
    its subfolders where ``recursive``), sorted. ``what`` names the argument in the errors."""
    if os.path.isdir(path):
        pattern = os.path.join(glob.escape(path), "**", "*") if recursive else os.path.join(glob.escape(path), "*")
        files = sorted(f for f in glob.glob(pattern, recursive=recursive) if f.endswith(suffixes) and os.path.isfile(f))
        if not files:
            where = "under" if recursive else "in"
            raise ValueError(f"{what} {path}: no {' or '.join(suffixes)} files {where} the folder".lstrip())
        return files
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path}: no such file or folder".lstrip())
    return [path]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _refused(path: str, kind: str) -> ValueError:
    return ValueError(f"{path} is {kind}, not a regular file; moca writes only regular files (remove it or choose "
                      "another path)")


def regular_or_absent(path: str) -> bool:
    """Whether ``path`` is a regular file (True) or absent (False), a symbolic link not followed;
    ValueError naming it when it is anything else. Every file moca writes is checked so: writing
    through a link would change its target, and replacing a device (``/dev/null``) or a FIFO with
    a file breaks whatever uses it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise _refused(path, _kind(mode))
    return True


def real_folder(path: str) -> None:
    """ValueError naming ``path`` unless it is a folder (not a link to one) or absent: the rule of
    ``regular_or_absent`` for a folder moca writes files into."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise ValueError(f"{path} is {_kind(mode)}, not a folder; moca writes only into real folders (remove it "
                             "or choose another path)")


def open_regular(path: str, what: str, mode: str = "rb", **options):
    """``path`` opened for reading (``mode`` and ``options`` as ``open`` takes them), refused with a
    ValueError naming ``what`` and the file unless it is a regular file: a FIFO would block the
    reader, a device never end. A link is followed: reading through one changes nothing."""
    def regular(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file".lstrip())
    regular(os.stat(path))  # before opening: opening a device can itself act
    return _opened(path, os.O_RDONLY, regular, mode, **options)


def _regular_to_write(path: str, info: os.stat_result) -> None:
    """``_refused`` unless ``info`` (of the file opened at ``path``) is a regular file's."""
    if not stat.S_ISREG(info.st_mode):
        raise _refused(path, _kind(info.st_mode))


def _opened(path: str, flags: int, check, mode: str, **options):
    """``path`` opened with ``flags`` (non-blocking: a FIFO put in its place after a check does not
    hang the open), as a file object of ``mode``, once ``check`` (a function of the opened file's
    ``os.stat_result`` that raises) passes; the descriptor is closed on any failure. With
    ``O_NOFOLLOW``, a link found at ``path`` is refused (``_refused``)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & os.O_NOFOLLOW:  # a link put there after a check
            raise _refused(path, "a symbolic link") from None
        raise
    try:
        check(os.fstat(fd))
        return os.fdopen(fd, mode, **options)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str, what: str, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of ``path``, a small file read whole: a config (JSON or TOML), a checkpoint's
    manifest or metadata, ``moca.json``, an index cache. ValueError naming ``what``, the file and
    the reason when it is not a regular file (``open_regular``) or holds more than ``limit`` bytes
    (a file replaced by a huge one must not fill memory); OSError (FileNotFoundError when it is
    missing) when it cannot be opened."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit:,} bytes, the most read of it")
    return data


def read_bounded(path: str, what: str, limit: int = MAX_READ_BYTES) -> str:
    """The text of ``path`` read by ``read_bytes``; ValueError also when it is not UTF-8."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def append_to(path: str):
    """``path`` opened to append text (created when absent), never through a link
    (``O_NOFOLLOW``) nor onto anything but a regular file (ValueError naming it)."""
    regular_or_absent(path)
    return _opened(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                   functools.partial(_regular_to_write, path), "a")


def writable_folder(folder: str) -> None:
    """ValueError naming the entry unless ``folder`` is a real folder (or absent) whose entries, at
    every depth, are regular files or real folders: a tool that writes into it (transformers'
    ``save_pretrained``) must not write through a link or onto a device."""
    real_folder(folder)
    for top, folders, files in os.walk(folder):  # links to folders are listed, never entered
        for name in folders + files:
            path = os.path.join(top, name)
            if not (os.path.isdir(path) and not os.path.islink(path)):
                regular_or_absent(path)


def read_json(path: str, what: str, limit: int = MAX_READ_BYTES):
    """The JSON value of ``path`` read by ``read_bounded``; ValueError naming the file also when it
    is not JSON (or nested too deep to parse)."""
    text = read_bounded(path, what, limit)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{what} {path} is not JSON ({exc})") from None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, shared: bool = False):
    """A binary file to write whose content replaces ``path`` whole when the block ends without an
    error, else is dropped (``path`` keeps its old content): a synced temporary file beside it,
    renamed. ``path`` must be a regular file or absent (``regular_or_absent``). One process at a
    time writes a given path (the run lock's holder), so the temporary files of a writer that was
    killed are its leftovers and are removed; with ``shared``, several processes may write
    ``path`` at once (the same content, e.g. an index cache every rank makes), so none is removed."""
    regular_or_absent(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not shared:
        for stale in glob.glob(f"{glob.escape(path)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # a new file of its own: never a link or a file that someone put there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path: str, data: bytes, shared: bool = False) -> None:
    """``path`` holds ``data`` whole or keeps its old content (``atomic_file``)."""
    with atomic_file(path, shared) as f:
        f.write(data)


class RunLock:
    """One process per run directory: an exclusive ``flock`` on ``run_dir/.lock``, which the kernel
    releases when its holder dies (so a lock left by a killed run is simply taken over). The file
    names the holder (process id and host) for the message a second process gets. It must be a
    regular file of one link, or absent: the holder rewrites it, which must not reach another
    file through a symbolic or hard link."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.file = None

    def __enter__(self) -> RunLock:
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        regular_or_absent(self.path)

        def own_file(info: os.stat_result) -> None:
            _regular_to_write(self.path, info)
            if info.st_nlink != 1:
                raise ValueError(f"{self.path} has {info.st_nlink} hard links; the run lock, which its holder "
                                 "rewrites, must be a file of its own (remove it)")
        self.file = _opened(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, own_file, "r+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(f"{os.path.dirname(self.path)} is in use by {holder}; two runs must not write one "
                               "directory (wait for it, stop it, or choose another --out)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on host {socket.gethostname()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
