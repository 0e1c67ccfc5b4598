"""Data parallelism on the gloo backend (CPU): a 2-rank step equals the single-process step on the
same global batch, loss and parameter update, for stage 2 (in-batch negatives across ranks) and
stage 1 (micro-batches sharded across ranks)."""
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.multiprocessing as mp
    from moca.config import Config
    from moca.train import train

    def config(out, stage, per_rank, fsdp="false", steps=1):
        per = {"cl.pairs_per_batch": per_rank} if stage == "cl" else {"cpt.grad_accum": per_rank // 3}
        return Config().update({"run.stage": stage, "out": out, "max_steps": steps, "save_every": 1, "log_every": 1,
                                "seed": 3, "prefetch": 0, "fsdp": fsdp, "max_doc_tokens": 256, "token_budget": 256,
                                "lr": 1e-3, **per, **json.loads(os.environ.get("MOCA_TEST_SETTINGS", "{}"))})

    def worker(rank, port, out, stage, fsdp, ranks, steps):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        train(config(out, stage, 6 // ranks, fsdp, steps), resume=steps > 1)

    if __name__ == "__main__":
        port, root, stage, fsdp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        layouts = sys.argv[5].split(",")  # each step's run: a number of ranks, or "plain" (one process, no torchrun)
        for steps, ranks in enumerate(layouts, start=1):  # each step after the first resumed from the last checkpoint
            if ranks == "plain":
                train(config(f"{root}/two", stage, 6, steps=steps), resume=steps > 1)
            else:
                mp.spawn(worker, args=(port + steps, f"{root}/two", stage, fsdp, int(ranks), steps), nprocs=int(ranks))
            train(config(f"{root}/one", stage, 6, steps=steps), resume=steps > 1)
    """)


def _run(tmp_path, stage, port, fsdp=False, ranks=(2,), settings=None):
    """Trains one step per entry of ``ranks``, each resumed from the last one's checkpoint, on that
    many ranks under torchrun's environment, or "plain" (one process without a process group), into
    tmp_path/two; and in one plain process (tmp_path/one). ``settings``: more settings of both."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "MOCA_TEST_SETTINGS": json.dumps(settings or {})}
    result = subprocess.run([sys.executable, str(script), str(port), str(tmp_path), stage, str(fsdp).lower(),
                             ",".join(map(str, ranks))], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _compare(tmp_path, step=1, rtol=1e-5, unused_have_state=False):
    """The last logged loss, the AdamW moments and the parameters of both runs at ``step`` agree
    (``rtol``: a second step starts from parameters that already differ by rounding).
    ``unused_have_state``: the sharded run may hold zero moments for parameters that never had a
    gradient, which the plain process holds no state for."""
    import json

    import torch

    from moca import checkpoint
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("one", "two")]
    assert rows[0]["step"] == rows[1]["step"] == step
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= rtol * abs(rows[0]["loss"]), rows
    states = [checkpoint.read(str(tmp_path / run / "checkpoints" / f"step-{step:07d}")) for run in ("one", "two")]
    # the gradients: AdamW's first moment after one step is 0.1 * gradient (optimizer state is
    # keyed by parameter name in every layout)
    moments = [s["optimizer"]["state"] for s in states]
    extra = moments[1].keys() - moments[0].keys() if unused_have_state else set()
    assert moments[0].keys() | extra == moments[1].keys() and len(moments[0]) > 10
    for name in extra:
        assert not moments[1][name]["exp_avg"].any() and not moments[1][name]["exp_avg_sq"].any(), name
    for name, first in moments[0].items():
        one, two = first["exp_avg"], moments[1][name]["exp_avg"]
        assert (one - two).abs().max() <= rtol * one.abs().max() + 1e-12, name
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
    _run(tmp_path, "cl", 29541, fsdp=True, ranks=(1, 1))
    _compare(tmp_path, step=2, rtol=1e-4)


def test_a_run_saved_on_two_ranks_resumes_on_one(tmp_path):
    # step 1 sharded over 2 ranks, step 2 resumed in one plain process: the checkpoint is resharded
    _run(tmp_path, "cpt", 29551, fsdp=True, ranks=(2, "plain"))
    _compare(tmp_path, step=2, rtol=1e-4)


def test_a_run_saved_on_one_rank_resumes_on_two(tmp_path):
    # step 1 in one plain process, step 2 resumed sharded over 2 ranks
    _run(tmp_path, "cl", 29561, fsdp=True, ranks=("plain", 2))
    _compare(tmp_path, step=2, rtol=1e-4)


def test_a_text_only_run_resumes_on_two_ranks(tmp_path):
    # no image anywhere: the vision tower never has a gradient, so the plain process's AdamW keeps no
    # state for it (the sharded ranks' keeps zero moments), and the step resumed on 2 sharded ranks
    # restores what there is
    documents = tmp_path / "text.jsonl"
    documents.write_text("".join(json.dumps({"text": f"document {i}: " + "a red circle on blue " * (3 + i % 5)}) + "\n"
                                 for i in range(60)))
    _run(tmp_path, "cpt", 29571, fsdp=True, ranks=(2, 2), settings={"data.documents": str(documents)})
    _compare(tmp_path, step=2, rtol=1e-4, unused_have_state=True)
