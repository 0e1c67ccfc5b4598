"""Processes that a test starts, each logging to a file: polled waits that fail naming what did
not happen, and a kill of every process they started (torchrun's workers run in sessions of
their own) when the test ends."""
import glob
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 600  # seconds: a generous bound for any one event on a loaded machine


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (from every thread of it)."""
    found = []
    for children in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(children) as f:
                found += [int(child) for child in f.read().split()]
        except OSError:  # the thread ended
            pass
    return found


class Processes:
    def __init__(self, folder):
        self.folder, self.started = str(folder), []

    def start(self, command: list[str], env: dict | None = None) -> subprocess.Popen:
        """``command`` run from the repository's root with ``env`` (default: this process's)."""
        log = open(os.path.join(self.folder, f"process-{len(self.started)}.log"), "w")
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ)
        process.log_path = log.name
        log.close()
        self.started.append(process)
        return process

    @staticmethod
    def output(process) -> str:
        with open(process.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, condition, what: str, process, timeout: float = WAIT) -> None:
        """Poll ``condition`` until it holds; fail naming ``what`` if the process ends first or
        the time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if process.poll() is not None:
                pytest.fail(f"{process.args[:4]} ended (code {process.returncode}) before {what}:\n"
                            f"{self.output(process)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s:\n{self.output(process)[-3000:]}")
            time.sleep(0.05)

    def finish(self, process, timeout: float = WAIT) -> int:
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{process.args[:4]} did not end within {timeout} s:\n{self.output(process)[-3000:]}")

    def kill_all(self) -> None:
        def kill(pid):
            for child in children(pid):
                kill(child)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.started:
            if process.poll() is None:
                kill(process.pid)
            process.wait()

