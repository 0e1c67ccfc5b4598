"""Runs over several processes under faults, on CPU with gloo: a rank that stops answering ends
the run within ``parallel.timeout``, naming the rank and the collective; two torchrun "nodes" on
loopback, one of which loses its worker mid-run, come back through torchrun's restarts and end with
the metrics of the run that had no fault; and the Slurm example requeues a run that SIGTERM
stopped, by the marker the trainer leaves (torchrun itself exits 1), then finishes it.

Waits poll for files with generous timeouts, so that a slow, shared machine makes the tests
slower, not flaky. Every process a test starts is killed when it ends."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from processes import ROOT, WAIT, children

from moca import checkpoint

STEPS = 24
SETTINGS = ["--stage", "cpt", "--max-steps", str(STEPS), "save_every=4", "log_every=1", "token_budget=512",
            "prefetch=0"]
TIMED = ("tokens_per_s", "model_tflops")  # measured, so they differ between equal runs
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# what the Slurm example exports: a restarted worker group must not read the previous attempt's
# addresses from torch's shared rendezvous store (pytorch/pytorch#135712)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in f]


def _logged(run: str) -> int:
    """The last step metrics.jsonl logs whole (0 before any)."""
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return max([json.loads(line)["step"] for line in f if line.endswith("\n")], default=0)
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The metrics of the uninterrupted run on two ranks (one torchrun node of two processes)."""
    run = str(tmp_path_factory.mktemp("reference") / "run")
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "moca.cli", "train", "--out",
                           run, *SETTINGS], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def test_a_rank_that_stops_answering_ends_the_run_within_the_timeout(tmp_path, processes):
    # two ranks in torchrun's environment, started directly, so that the test holds each one's
    # process: rank 1 is stopped (SIGSTOP) mid-run; rank 0 waits in its next collective for
    # parallel.timeout, then stops naming itself, the collective and the setting
    run, port, timeout = str(tmp_path / "run"), _free_port(), 10
    ranks = [processes.start([sys.executable, "-m", "moca.cli", "train", "--out", run, "--stage", "cpt",
                             "--max-steps", "1000", "save_every=1000", "log_every=1", "token_budget=512",
                             "prefetch=0", f"timeout={timeout}"],
                            env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                 "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in (0, 1)]
    processes.wait_for(lambda: _logged(run) >= 3, "step 3", ranks[0])
    os.kill(ranks[1].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    assert processes.finish(ranks[0], timeout=timeout + 60) == 2
    waited = time.monotonic() - stopped
    assert timeout - 1 <= waited <= timeout + 60, waited  # not gloo's 30 minutes
    assert _logged(run) < 1000
    collectives = ("the forward and backward of a micro-batch", "the all-reduce of the gradients",
                   "the all-reduce of the logged losses", "the all-reduce that asks every rank whether SIGTERM "
                   "arrived")
    pattern = (rf"moca train: rank 0 of 2: ({'|'.join(collectives)}) failed: another rank stopped answering for "
               rf"parallel.timeout \({timeout} s\), or is gone \([^\n]*([Tt]imed out|timeout)[^\n]*\)\n")
    assert re.search(pattern, processes.output(ranks[0])), processes.output(ranks[0])[-3000:]


def test_two_nodes_lose_a_worker_and_torchrun_restarts_them_to_the_uninterrupted_end(tmp_path, processes,
                                                                                       reference):
    # two torchrun agents ("nodes") of one process each, meeting at a c10d rendezvous on loopback;
    # both launch `moca train --resume RUN` from the start (an empty RUN starts at step 0), so
    # that a restarted worker continues from the newest checkpoint
    run, port = str(tmp_path / "run"), _free_port()
    os.makedirs(run)
    nodes = [processes.start([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "moca-elastic", "--max-restarts", "1",
                             "-m", "moca.cli", "train", "--resume", run, *SETTINGS, "timeout=60"], ENV)
             for _ in range(2)]
    processes.wait_for(lambda: os.path.isdir(os.path.join(run, "checkpoints", "step-0000008")), "checkpoint 8",
                      nodes[0])
    processes.wait_for(lambda: _logged(run) >= 9, "step 9", nodes[0])  # between checkpoints: steps to redo
    workers = children(nodes[1].pid)
    assert len(workers) == 1 and _logged(run) < STEPS, (workers, _logged(run))
    os.kill(workers[0], signal.SIGKILL)  # the node's worker dies; its agent lives on
    for node in nodes:
        assert processes.finish(node) == 0, processes.output(node)[-3000:]
    output = "".join(processes.output(node) for node in nodes)
    # the surviving rank named the loss; both agents restarted their workers, which resumed
    assert re.search(r"moca train: rank \d of 2: .* failed: another rank stopped answering for parallel.timeout "
                     r"\(60 s\), or is gone", output), output[-3000:]
    resumed = [int(step) for step in re.findall(rf"resumed {re.escape(run)} at step (\d+) from", output)]
    assert len(resumed) == 1 and 8 <= resumed[0] < STEPS and resumed[0] % 4 == 0, resumed
    assert _rows(run) == reference
    assert os.path.basename(checkpoint.find(run)) == f"step-{STEPS:07d}"


def test_the_slurm_script_requeues_a_run_that_sigterm_stopped(tmp_path, processes, reference):
    # examples/slurm/moca.sbatch on one "node" of two processes, with stand-ins for srun (runs its
    # command) and scontrol (names the node; records a requeue). Preemption sends SIGTERM to the
    # job's tasks (torchrun) and to the batch shell; the trainers save and exit 75, torchrun exits
    # 1, and the script requeues on the marker. The requeued job's launch finishes the run.
    bin_dir, run = tmp_path / "bin", str(tmp_path / "run")
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase $1 in\n  show) echo 127.0.0.1 ;;\n'
                                      '  requeue) echo "$2" >> "$REQUEUED" ;;\nesac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    requeued = tmp_path / "requeued"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "REQUEUED": str(requeued), "OUT": run,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "2",
           "RDZV_PORT": str(_free_port()), "MAX_RESTARTS": "0"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")  # the script sets it
    command = ["bash", os.path.join(ROOT, "examples", "slurm", "moca.sbatch"), *SETTINGS]

    job = processes.start(command, env)
    processes.wait_for(lambda: _logged(run) >= 5, "step 5", job)
    (launcher,) = children(job.pid)
    os.kill(launcher, signal.SIGTERM)
    os.kill(job.pid, signal.SIGTERM)
    assert processes.finish(job) == 0, processes.output(job)[-3000:]
    with open(os.path.join(run, "PREEMPTED")) as f:
        marker = json.load(f)
    stopped = _logged(run)
    assert 5 <= stopped < STEPS, "the run ended before SIGTERM reached it"
    assert marker == {"step": stopped, "checkpoint": os.path.join(run, "checkpoints", f"step-{stopped:07d}"),
                      "resume": f"moca train --resume {run}"}
    assert checkpoint.find(run) == marker["checkpoint"]
    assert requeued.read_text() == "4242\n"
    assert re.search(r"moca\.sbatch: stopped by SIGTERM \(launcher exit status [1-9]\d*\): .*; requeueing job 4242",
                     processes.output(job)), processes.output(job)[-3000:]

    again = processes.start(command, env)  # the requeued job: the same command
    assert processes.finish(again) == 0, processes.output(again)[-3000:]
    assert f"resumed {run} at step {stopped} from" in processes.output(again)
    assert _rows(run) == reference
    assert not os.path.exists(os.path.join(run, "PREEMPTED")) and requeued.read_text() == "4242\n"
