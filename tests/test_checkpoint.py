"""Checkpoints on their own: a round trip of model and optimizer, damage found by the manifest,
reading that never runs code, the run-directory lock, and atomic writes."""
import glob
import os
import pathlib
import pickle

import pytest
import torch
from payloads import crafted_payloads

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
    with pytest.raises(ValueError, match="cannot be loaded into this model: Missing key"):
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
        assert checkpoint.find(str(tmp_path)) == paths[1]
    open(os.path.join(paths[1], shard), "ab").write(b"x")
    assert "bytes, the manifest says" in checkpoint.damage(paths[1])
    os.remove(os.path.join(paths[1], checkpoint.MANIFEST))
    assert checkpoint.damage(paths[1]) == "no readable manifest (FileNotFoundError)"
    with pytest.warns(UserWarning, match="using none"):
        assert checkpoint.find(str(tmp_path)) is None


def test_reading_a_crafted_checkpoint_runs_no_code(tmp_path):
    module, optimizer = _trained(0)
    path = checkpoint.save(str(tmp_path), 1, module, optimizer, dict(step=1))
    marker = tmp_path / "ran"
    payloads = crafted_payloads(marker)
    for what, payload in payloads.items():
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(payload)
        for read in (lambda: checkpoint.load(path, *_trained(1)), lambda: checkpoint.read(path),
                     lambda: checkpoint.read_model(path, _Tiny().model, prefix="model.")):
            refused = r"\.metadata: not a checkpoint's metadata \(it (names .* which a checkpoint never holds|sets " \
                "attributes of the class PosixPath)"
            with pytest.raises(ValueError, match=refused) as caught:
                read()
            assert "\n" not in str(caught.value), what
        assert not marker.exists() and not hasattr(pathlib.PosixPath, "x_poisoned"), what
    assert len(payloads) == 13


def test_metadata_that_names_files_outside_the_checkpoint_is_refused(tmp_path):
    module, optimizer = _trained(0)
    path = checkpoint.save(str(tmp_path), 1, module, optimizer, dict(step=1))
    metadata = checkpoint._read_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret.distcp"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(ValueError, match=r"a shard is named '\.\./\.\./secret\.distcp', not a file of the "
                                         "checkpoint's folder"):
        checkpoint.read(path)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump({"not": "metadata"}, f)
    with pytest.raises(ValueError, match="it holds a dict, not DCP's Metadata"):
        checkpoint.read(path)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"\x80\x04\x95")  # torn
    with pytest.raises(ValueError, match="not a checkpoint's metadata"):
        checkpoint.read(path)


def test_a_parameter_without_optimizer_state_resumes_as_it_was(tmp_path):
    """The head gets no gradient before the save (AdamW gives it no state) and one after: a
    save and load in between changes nothing."""
    def run(module, optimizer, steps, head):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            out = module.model(torch.ones(4, 5))
            (module.head(out) if head else out).square().sum().backward()
            optimizer.step()

    torch.manual_seed(0)
    whole = _Tiny()
    resumed = _Tiny()
    resumed.load_state_dict(whole.state_dict())
    whole_optimizer, cut_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (whole, resumed))
    run(whole, whole_optimizer, 2, head=False)
    run(resumed, cut_optimizer, 2, head=False)
    path = checkpoint.save(str(tmp_path), 2, resumed, cut_optimizer, dict(step=2))
    torch.manual_seed(1)
    fresh = _Tiny()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load(path, fresh, fresh_optimizer) == dict(step=2)
    assert not any(p in fresh_optimizer.state for p in fresh.head.parameters())
    run(whole, whole_optimizer, 3, head=True)
    run(fresh, fresh_optimizer, 3, head=True)
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


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


def test_retention_keeps_the_checkpoint_just_written_and_every_damaged_one(tmp_path):
    # a run that started over at step 0 beside checkpoints of later steps whose manifests are gone
    # (their shards intact): they sort after every new one, and are neither counted nor deleted
    module, optimizer = _trained(0)
    later = [checkpoint.save(str(tmp_path), step, module, optimizer, dict(step=step), keep=5) for step in (6, 8)]
    for path in later:
        os.remove(os.path.join(path, checkpoint.MANIFEST))
    paths = [checkpoint.save(str(tmp_path), step, module, optimizer, dict(step=step), keep=2) for step in (1, 2, 3)]
    assert checkpoint.checkpoints(str(tmp_path)) == [*paths[1:], *later]
    # an earlier damaged one stays too; only complete earlier ones are retired
    shard = next(f for f in os.listdir(paths[1]) if f.endswith(".distcp"))
    with open(os.path.join(paths[1], shard), "ab") as f:
        f.write(b"x")
    newest = checkpoint.save(str(tmp_path), 4, module, optimizer, dict(step=4), keep=2)
    assert checkpoint.checkpoints(str(tmp_path)) == [paths[1], paths[2], newest, *later]
    assert checkpoint.save(str(tmp_path), 5, module, optimizer, dict(step=5), keep=1) == paths[2][:-1] + "5"
    assert checkpoint.checkpoints(str(tmp_path)) == [paths[1], paths[2][:-1] + "5", *later]


def test_a_step_saved_again_sets_the_older_one_aside(tmp_path):
    # a run resumed from step 1 because step 2 was damaged writes step 2 again: the damaged one is
    # kept in set-aside/, not deleted
    module, optimizer = _trained(0)
    checkpoint.save(str(tmp_path), 1, module, optimizer, dict(step=1))
    damaged = checkpoint.save(str(tmp_path), 2, module, optimizer, dict(step=2))
    shard = next(f for f in os.listdir(damaged) if f.endswith(".distcp"))
    with open(os.path.join(damaged, shard), "ab") as f:
        f.write(b"x")
    assert checkpoint.save(str(tmp_path), 2, module, optimizer, dict(step=2)) == damaged
    assert checkpoint.damage(damaged) is None
    (kept,) = glob.glob(os.path.join(tmp_path, "set-aside", "*", "step-0000002"))
    assert "bytes, the manifest says" in checkpoint.damage(kept)
