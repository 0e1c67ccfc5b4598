"""Data parallelism on the gloo backend (CPU): a 2-rank step equals the single-process step on the
same global batch, loss and parameter update, for stage 2 (in-batch negatives across ranks) and
stage 1 (micro-batches sharded across ranks)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.multiprocessing as mp
    from moca.train import TrainConfig, train

    def config(out, stage, per_rank, fsdp="false", steps=1):
        common = dict(out=out, max_steps=steps, save_every=1, log_every=1, seed=3, prefetch=0, fsdp=fsdp == "true",
                      max_doc_tokens=256)
        if stage == "cl":
            return TrainConfig(stage="cl", pairs_per_batch=per_rank, token_budget=256, lr=1e-3, **common)
        return TrainConfig(stage="cpt", token_budget=256, lr=1e-3, grad_accum=per_rank // 3, **common)

    def worker(rank, port, out, stage, fsdp, ranks, steps):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        train(config(out, stage, 6 // ranks, fsdp, steps), resume=steps > 1, log=lambda *a: None)

    if __name__ == "__main__":
        port, root, stage, fsdp, ranks = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        for steps in range(1, int(sys.argv[6]) + 1):  # step 1, then each further step resumed from the last checkpoint
            mp.spawn(worker, args=(port + steps, f"{root}/two", stage, fsdp, ranks, steps), nprocs=ranks)
            train(config(f"{root}/one", stage, 6, steps=steps), resume=steps > 1, log=lambda *a: None)
    """)


def _run(tmp_path, stage, port, fsdp=False, ranks=2, steps=1):
    """Trains ``steps`` steps, each resumed from the last one's checkpoint, on ``ranks`` ranks (into
    tmp_path/two) and in one plain process (tmp_path/one)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, str(script), str(port), str(tmp_path), stage, str(fsdp).lower(),
                             str(ranks), str(steps)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _compare(tmp_path, step=1, rtol=1e-5):
    """The last logged loss, the AdamW moments and the parameters of both runs at ``step`` agree
    (``rtol``: a second step starts from parameters that already differ by rounding)."""
    import json

    import torch
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("one", "two")]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= rtol * abs(rows[0]["loss"]), rows
    states = [torch.load(tmp_path / run / "checkpoints" / f"step-{step:07d}.pt", weights_only=False)
              for run in ("one", "two")]
    # the gradients: AdamW's first moment after one step is 0.1 * gradient (FSDP's optimizer
    # state is keyed by parameter name, one process's by number: matched by order)
    moments = [list(s["optimizer"]["state"].values()) for s in states]
    assert len(moments[0]) == len(moments[1]) > 10
    for i, (first, second) in enumerate(zip(*moments)):
        one, two = first["exp_avg"], second["exp_avg"]
        assert (one - two).abs().max() <= rtol * one.abs().max() + 1e-12, i
    # the parameter update: Adam's first step is lr * g / (|g| + eps), so a gradient within 1e-6 of
    # zero may move by up to lr either way; everything else agrees closely
    for name, one in states[0]["model"].items():
        if one.is_floating_point():
            torch.testing.assert_close(states[1]["model"][name], one, rtol=rtol, atol=5e-5, msg=name)


def test_two_ranks_equal_one_process_in_stage_two(tmp_path):
    # one process with 6 pairs against 2 ranks with 3 each: the same global batch, positives of
    # both ranks as in-batch negatives
    _run(tmp_path, "cl", 29517)
    _compare(tmp_path)


def test_two_ranks_equal_one_process_accumulating_in_stage_one(tmp_path):
    # one process accumulating 2 micro-batches against 2 ranks with 1 each: the same two packed
    # micro-batches with the same masks, so the same averaged gradient
    _run(tmp_path, "cpt", 29523)
    _compare(tmp_path)


def test_fsdp_two_ranks_equal_one_process_in_stage_two(tmp_path):
    _run(tmp_path, "cl", 29531, fsdp=True)
    _compare(tmp_path)


def test_fsdp_two_ranks_equal_one_process_in_stage_one(tmp_path):
    _run(tmp_path, "cpt", 29537, fsdp=True)
    _compare(tmp_path)


def test_fsdp_on_one_rank_under_torchrun_equals_the_plain_process(tmp_path):
    # torchrun with one process shards too (the GPU check runs FSDP2 this way on its one card), and
    # a sharded run resumes: its second step, resumed from the first's checkpoint, equals the plain
    # process's (every trainable parameter has optimizer state to restore: the unused LM head is frozen)
    import torch
    _run(tmp_path, "cl", 29541, fsdp=True, ranks=1, steps=2)
    _compare(tmp_path, step=2, rtol=1e-4)
    sharded = torch.load(tmp_path / "two" / "checkpoints" / "step-0000002.pt", weights_only=False)
    assert all(isinstance(key, str) for key in sharded["optimizer"]["state"])  # FSDP's state dict: keyed by name
