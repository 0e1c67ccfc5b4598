"""Files: the data files a path names, and files that survive a crash or a second process (atomic
writes and the run-directory lock)."""
from __future__ import annotations

import contextlib
import glob
import os
import socket


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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """``path`` holds ``data`` whole or keeps its old content: a synced temporary file, renamed.
    One process at a time writes a given path (the run lock's holder), so the temporary files of
    a writer that was killed are its leftovers and are removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(f"{glob.escape(path)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


class RunLock:
    """One process per run directory: an exclusive ``flock`` on ``run_dir/.lock``, which the kernel
    releases when its holder dies (so a lock left by a killed run is simply taken over). The file
    names the holder (process id and host) for the message a second process gets."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.file = None

    def __enter__(self) -> RunLock:
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
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
