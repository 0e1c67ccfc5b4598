"""Checkpoints on their own: a round trip of model and optimizer, damage found by the manifest,
reading that never runs code, the run-directory lock, and atomic writes."""
import os
import pickle

import pytest
import torch

from moca import checkpoint
from moca.files import RunLock, atomic_write


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        self.head = torch.nn.Linear(3, 2)


def _trained(seed: int):
    torch.manual_seed(seed)
    module = _Tiny()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.head(module.model(torch.randn(4, 5))).square().sum().backward()
    optimizer.step()
    return module, optimizer


def test_a_round_trip_restores_model_optimizer_and_trainer_state(tmp_path):
    module, optimizer = _trained(0)
    path = checkpoint.save(str(tmp_path), 3, module, optimizer, dict(step=3, position=11))
    assert os.path.basename(path) == "step-0000003" and checkpoint.find(str(tmp_path)) == path
    other, other_optimizer = _trained(1)  # different weights and moments, overwritten by the load
    assert checkpoint.load(path, other, other_optimizer) == dict(step=3, position=11)
    for (name, a), b in zip(module.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    mine, theirs = optimizer.state_dict(), other_optimizer.state_dict()
    for key in mine["state"]:
        assert torch.equal(mine["state"][key]["exp_avg_sq"], theirs["state"][key]["exp_avg_sq"])
    assert theirs["param_groups"][0]["lr"] == 1e-2
    whole = checkpoint.read(path)  # plain dicts, keyed by name
    assert torch.equal(whole["model"]["model.1.weight"], module.model[1].weight)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    assert checkpoint.read_model(path, backbone, prefix="model.") == 4
    assert torch.equal(backbone[0].bias, module.model[0].bias)
    with pytest.raises(ValueError, match="does not fit this model: Missing key"):
        checkpoint.read_model(path, torch.nn.Linear(5, 5), prefix="model.")


def test_only_the_newest_are_kept_and_damage_is_found(tmp_path):
    module, optimizer = _trained(0)
    paths = [checkpoint.save(str(tmp_path), step, module, optimizer, dict(step=step), keep=2) for step in (1, 2, 3)]
    assert checkpoint.checkpoints(str(tmp_path)) == paths[1:]
    assert checkpoint.damage(paths[2]) is None
    shard = next(f for f in os.listdir(paths[2]) if f.endswith(".distcp"))
    data = bytearray(open(os.path.join(paths[2], shard), "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(os.path.join(paths[2], shard), "wb").write(bytes(data))
    assert checkpoint.damage(paths[2]) == f"{shard} does not match its checksum"
    with pytest.warns(UserWarning, match=f"checkpoint {paths[2]} is damaged .*; using {paths[1]} instead"):
        assert checkpoint.find(str(tmp_path), log=lambda *_: None) == paths[1]
    open(os.path.join(paths[1], shard), "ab").write(b"x")
    assert "bytes, the manifest says" in checkpoint.damage(paths[1])
    os.remove(os.path.join(paths[1], checkpoint.MANIFEST))
    assert checkpoint.damage(paths[1]) == "no readable manifest (FileNotFoundError)"
    with pytest.warns(UserWarning, match="using none"):
        assert checkpoint.find(str(tmp_path), log=lambda *_: None) is None


def test_reading_a_crafted_checkpoint_runs_no_code(tmp_path):
    module, optimizer = _trained(0)
    path = checkpoint.save(str(tmp_path), 1, module, optimizer, dict(step=1))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(BaseException, match="names posix.system|names os.system"):
        checkpoint.load(path, *_trained(1))
    assert not marker.exists()


def test_a_failed_save_keeps_the_older_checkpoint(tmp_path, monkeypatch):
    import errno
    module, optimizer = _trained(0)
    kept = checkpoint.save(str(tmp_path), 1, module, optimizer, dict(step=1))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "atomic_write", full)
    with pytest.raises(OSError, match=f"could not write the checkpoint of step 2 .*No space left.*newest complete "
                                      f"checkpoint is {kept}"):
        checkpoint.save(str(tmp_path), 2, module, optimizer, dict(step=2))
    assert checkpoint.checkpoints(str(tmp_path)) == [kept] and checkpoint.find(str(tmp_path)) == kept
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if f.endswith(".tmp")]


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    import socket
    with RunLock(str(tmp_path)):
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
            with RunLock(str(tmp_path)):
                pass
    with RunLock(str(tmp_path)):  # released at exit: taken again
        pass


def test_atomic_write_leaves_the_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic_write(str(path), b"old\n")

    def broken(*args):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(str(path), b"new\n")
    assert path.read_bytes() == b"old\n" and os.listdir(tmp_path) == ["metrics.jsonl"]
