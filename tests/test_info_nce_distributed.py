"""Two ranks on the gloo backend (CPU) give the loss and every gradient of one process holding the
whole global batch."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from moca_kernels.info_nce import info_nce
    from moca_kernels.info_nce.distributed import all_gather_with_grad

    SIZES = [5, 8]  # queries (and positives) per rank: unequal on purpose

    def data():
        gen = torch.Generator().manual_seed(0)
        total = sum(SIZES)
        return (torch.randn(total, 16, generator=gen, dtype=torch.float64),
                torch.randn(total, 16, generator=gen, dtype=torch.float64),
                torch.randn(total, 2, 16, generator=gen, dtype=torch.float64))

    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        query, docs, hard = data()
        lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
        q = query[lo:hi].clone().requires_grad_()
        d = docs[lo:hi].clone().requires_grad_()
        h = hard[lo:hi].clone().requires_grad_()
        t = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        all_docs = all_gather_with_grad(d)
        labels = torch.arange(lo, hi)
        loss = info_nce(q, all_docs, labels=labels, hard_negatives=h, temperature=t, reduction="sum") / sum(SIZES)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        dt = t.grad.clone()
        dist.all_reduce(dt)  # a replicated parameter: gradients summed over ranks
        torch.save(dict(loss=total, dq=q.grad, dd=d.grad, dh=h.grad, dt=dt), f"{out}/rank{rank}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.spawn(worker, args=(port, out), nprocs=2)
        query, docs, hard = (x.clone().requires_grad_() for x in data())
        t = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        loss = info_nce(query, docs, hard_negatives=hard, temperature=t)
        loss.backward()
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
        torch.testing.assert_close(ranks[0]["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ranks[1]["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for key, full in (("dq", query.grad), ("dd", docs.grad), ("dh", hard.grad)):
            torch.testing.assert_close(torch.cat([ranks[0][key], ranks[1][key]]), full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ranks[0]["dt"], t.grad, rtol=1e-10, atol=1e-12)
        print("two ranks equal one process")
""")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "two ranks equal one process" in result.stdout


def test_without_a_process_group_it_is_the_identity():
    import torch

    from moca_kernels.info_nce.distributed import all_gather_with_grad
    x = torch.randn(3, 4)
    assert all_gather_with_grad(x) is x
