"""Checkpoints of a run: saving, finding the newest sound one, loading, and the model of a run.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` in ``torch.distributed.checkpoint`` (DCP)
form: each rank writes its own shard of the model and optimizer state, so a run saved on N ranks
resumes on M (DCP reshards), and one process writes the same form. Beside the shards,
``manifest.json`` holds the trainer's state (step, data position, scheduler) and the size and
CRC-32 of every file. A checkpoint is written into a temporary folder, every file and folder
synced to disk, then renamed into place; a folder without a sound manifest is never used:
``find`` falls back to the previous checkpoint with a warning naming both.

Nothing in a checkpoint runs code when read: tensors and plain values are read with
``weights_only`` semantics and DCP's metadata with an unpickler that admits only its own record
types.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import pickle
import shutil
import time
import warnings
import zlib

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .config import Config
from .data.tokenizer import ByteTokenizer, HFTokenizer
from .files import atomic_write, fsync_dir, read_bytes, read_json
from .model.qwen import build

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PREFIX = "step-"


def _crc(path: str) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            value = zlib.crc32(chunk, value)
    return value


def _files(folder: str) -> dict:
    return {name: dict(size=os.path.getsize(os.path.join(folder, name)), crc32=_crc(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name != MANIFEST}


def _single() -> bool:
    """Whether this process saves and loads alone (no process group)."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _alone_is_fine():
    """DCP warns on every save and load without a process group; one process is a supported layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _is_main() -> bool:
    import torch.distributed as dist
    return _single() or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist
    if not _single():
        dist.barrier()


def training_state(module, optimizer) -> dict:
    """The model and optimizer state in DCP form (sharded tensors stay sharded), keyed by name, so
    that any layout of ranks can load it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}


def _non_finite(state: dict) -> str | None:
    """The name of the first tensor of ``state`` (``training_state``'s form) that holds a NaN or an
    infinity, on any rank (collective under torch.distributed), or None when all are finite."""
    import torch.distributed as dist
    named = [(f"model.{name}", value) for name, value in state["model"].items()]
    named += [(f"optimizer.state.{name}.{key}", value) for name, values in state["optimizer"]["state"].items()
              for key, value in values.items()]
    local = [(name, value.to_local() if hasattr(value, "to_local") else value) for name, value in named
             if isinstance(value, torch.Tensor) and value.is_floating_point()]
    device = next((value.device for _, value in local), torch.device("cpu"))
    finite = torch.stack([value.isfinite().all() for _, value in local]) if local else torch.ones(0, dtype=torch.bool)
    first = next((name for (name, _), ok in zip(local, finite.tolist()) if not ok), None)
    if _single():
        return first
    anywhere = torch.tensor([first is not None], dtype=torch.int32, device=device)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return first or ("a tensor of another rank" if anywhere.item() else None)


def save(run_dir: str, step: int, module, optimizer, trainer: dict, keep: int = 2) -> str:
    """Write the checkpoint of ``step`` (collective under torch.distributed: every rank calls it)
    and retire older ones (``_retired``: all but the newest ``keep`` sound ones). ``trainer``: JSON
    values restored by ``load``. Returns the checkpoint's folder. A state holding a NaN or an
    infinity is never saved (FloatingPointError): every checkpoint on disk is finite."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, f"{_PREFIX}{step:07d}")
    tmp = final + ".tmp"
    state = training_state(module, optimizer)
    bad = _non_finite(state)
    if bad is not None:
        kept = find(run_dir)
        raise FloatingPointError(f"{bad} holds NaN or infinite values after step {step}: not saved. The last good "
                                 f"(finite) checkpoint is {kept or 'none (none was saved yet)'}")
    if _is_main():
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, f"{_PREFIX}*.tmp")):  # a save that a killed process left
            shutil.rmtree(stale)
        if os.path.lexists(final):  # a step saved again (the run resumed before it): the older one, which
            set_aside(run_dir, [final])  # find passed over as damaged, is kept for whoever can recover it
    _barrier()
    try:
        with _alone_is_fine():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=_single())
        if _is_main():
            manifest = dict(step=step, trainer=trainer, files=_files(tmp))
            atomic_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
            os.replace(tmp, final)
            fsync_dir(folder)
    except (OSError, CheckpointException) as exc:  # a full disk, a lost mount: the older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoints(run_dir)
        raise OSError(f"could not write the checkpoint of step {step} in {folder} ({_first_error(exc)}); "
                      f"the newest complete checkpoint is {kept[-1] if kept else 'none'}") from None
    if _is_main():
        for old in _retired(run_dir, step, keep):
            shutil.rmtree(old)
    _barrier()
    return final


def _step_of(path: str) -> int:
    return int(os.path.basename(path)[len(_PREFIX):])


def _retired(run_dir: str, step: int, keep: int) -> list[str]:
    """The checkpoints that the save of ``step`` makes surplus: complete ones (every file listed in
    the manifest there with its size) of earlier steps, beyond the newest ``keep - 1``. A damaged
    one might still be recovered and a later one is not this run's to judge: both stay."""
    earlier = [c for c in checkpoints(run_dir) if _step_of(c) < step and damage(c, checksums=False) is None]
    return earlier[:max(0, len(earlier) - (keep - 1))]


def checkpoints(run_dir: str) -> list[str]:
    """Every checkpoint folder of the run (``step-`` and digits), oldest first (not verified)."""
    found = glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", f"{_PREFIX}[0-9]*"))
    return sorted((f for f in found if os.path.isdir(f) and not os.path.islink(f)
                   and os.path.basename(f)[len(_PREFIX):].isdigit()),
                  key=_step_of)


def damage(path: str, checksums: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None when every file it lists is there
    with its size and (``checksums``) CRC-32."""
    try:
        manifest = read_json(os.path.join(path, MANIFEST), "manifest")
        listed = manifest["files"]
        sizes = {name: expected["size"] for name, expected in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"no readable manifest ({type(exc).__name__})"
    for name, expected in listed.items():
        file = os.path.join(path, name)
        if name != os.path.basename(name) or not os.path.isfile(file) or os.path.islink(file):
            return f"{name} is missing"
        if os.path.getsize(file) != sizes[name]:
            return f"{name} has {os.path.getsize(file)} bytes, the manifest says {sizes[name]}"
        if checksums and _crc(file) != expected.get("crc32"):
            return f"{name} does not match its checksum"
    return None


def set_aside(run_dir: str, paths: list[str]) -> str:
    """Move ``paths`` (files and folders of the run) into ``run_dir/set-aside/<UTC time>/``, kept
    for whoever wants to recover them; returns that folder."""
    folder = os.path.join(run_dir, "set-aside", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        target, n = os.path.join(folder, os.path.basename(path)), 1
        while os.path.lexists(target):  # set aside twice within a second
            target, n = os.path.join(folder, f"{os.path.basename(path)}.{n}"), n + 1
        os.replace(path, target)
    fsync_dir(folder)
    return folder


def find(run_dir: str) -> str | None:
    """The newest sound checkpoint of the run, or None. A damaged newer one is passed over with a
    warning naming it and the one used instead."""
    candidates = checkpoints(run_dir)
    for i in range(len(candidates) - 1, -1, -1):
        why = damage(candidates[i])
        if why is None:
            return candidates[i]
        fallback = next((c for c in reversed(candidates[:i]) if damage(c) is None), None)
        message = (f"checkpoint {candidates[i]} is damaged ({why}); using {fallback or 'none (no older one is sound)'} "
                   "instead")
        warnings.warn(message, stacklevel=2)
        return fallback
    return None


def trainer_state(path: str) -> dict:
    """The trainer's state (step, data position, scheduler) that the checkpoint's manifest holds;
    ValueError naming the manifest when it lacks one."""
    file = os.path.join(path, MANIFEST)
    try:
        state = read_json(file, "manifest")["trainer"]
        if not isinstance(state, dict) or type(state.get("step")) is not int:
            raise TypeError("it has no integer step")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: no trainer state in it ({type(exc).__name__}: {exc})") from None
    return state


# Every global a DCP ``.metadata`` file names, exactly (module, name): its record classes, the
# types inside them, and torch's dtypes (below). Nothing else, and no dotted name, which pickle
# protocol 4 would resolve attribute by attribute to anything the module reaches.
_RECORDS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")})
_METADATA_BYTES = 1 << 30  # far above the metadata of a 7B model's sharded state; a bound on what is unpickled


class _MetadataUnpickler(pickle._Unpickler):
    """DCP's metadata records and nothing else: a crafted file cannot name a callable to run, nor
    set attributes of an admitted class (BUILD on a class would change it for the whole process).
    Python's own unpickler, whose opcodes can be overridden (metadata is small)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if "." not in name and ((module, name) in _RECORDS or (
                module == "torch" and isinstance(vars(torch).get(name), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint never holds")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which a checkpoint never holds")

    def _build(self):
        if isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError(f"it sets attributes of the class {self.stack[-2].__name__}")
        pickle._Unpickler.load_build(self)
    dispatch[pickle.BUILD[0]] = _build


def _read_metadata(path: str):
    """The checkpoint's DCP metadata, unpickled with ``_MetadataUnpickler`` and checked to be a
    ``Metadata`` whose shards are regular files of the checkpoint's own folder (a FIFO would hang
    the reader). ValueError otherwise."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata
    file = os.path.join(path, ".metadata")
    try:
        data = read_bytes(file, "checkpoint metadata", _METADATA_BYTES)
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP's Metadata")
        names = {getattr(info, "relative_path", None) if isinstance(info, _StorageInfo) else None
                 for info in (metadata.storage_data or {}).values()}  # one per shard file, not per chunk
        for name in names:
            if not isinstance(name, str) or name != os.path.basename(name) or name.startswith("."):
                raise pickle.UnpicklingError(f"a shard is named {name!r}, not a file of the checkpoint's folder")
            if os.path.islink(os.path.join(path, name)) or not os.path.isfile(os.path.join(path, name)):
                raise pickle.UnpicklingError(f"its shard {name} is not a regular file of the folder")
    except Exception as exc:  # any failure of a crafted or torn pickle: the file is refused, never half-read
        raise ValueError(f"{file}: not a checkpoint's metadata ({exc})") from None
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata that ``_read_metadata`` read and checked."""

    def __init__(self, path: str, metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if getattr(self.metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _PlainValues:
    """Non-tensor values (the optimizer's hyperparameters) read with ``weights_only``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _Planner(_PlainValues, DefaultLoadPlanner):
    pass


class _EverythingPlanner(_PlainValues, _EmptyStateDictLoadPlanner):
    pass


def _load_into(state: dict, path: str, planner, no_dist: bool, metadata=None) -> None:
    """Fill ``state`` from the checkpoint at ``path`` (``metadata``: its ``_read_metadata``, read
    here when not given): the one way every entry point (resume, ``--init``, eval, encode,
    ``Encoder``) reads a checkpoint. A file that cannot be read, or a state that does not fit, is a
    ValueError naming the checkpoint."""
    reader = _SafeReader(path, metadata or _read_metadata(path))
    try:
        with _alone_is_fine():
            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as exc:  # a BaseException: a missing key, or a file that cannot be read
        raise ValueError(f"{path} cannot be loaded into this model: {_first_error(exc)}") from None


def _held_optimizer_state(state: dict, metadata) -> dict:
    """The entries of ``state`` (an optimizer's state keyed by parameter name) that the checkpoint
    (its ``metadata``) holds. AdamW creates no state for a parameter that never had a gradient
    (the vision tower of a text-only run, the MAE decoder at ``mae_ratio=0``), so the checkpoint
    has none; such a parameter resumes without state, as it was."""
    held = metadata.state_dict_metadata
    return {name: values for name, values in state.items()
            if any(f"optimizer.state.{name}.{key}" in held for key in values)}


def load(path: str, module, optimizer) -> dict:
    """Restore ``module`` and ``optimizer`` (any layout of ranks; collective under
    torch.distributed) from the checkpoint at ``path``; returns its trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    trainer = trainer_state(path)
    metadata = _read_metadata(path)
    state = training_state(module, optimizer)
    state["optimizer"]["state"] = _held_optimizer_state(state["optimizer"]["state"], metadata)
    _load_into(state, path, _Planner(), _single(), metadata)
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    return trainer


def read(path: str) -> dict:
    """Everything a checkpoint holds as plain nested dicts of tensors and values, in this process
    (for inspection and tests): {"model": {name: tensor}, "optimizer": {"state": ..., ...}}."""
    state: dict = {}
    _load_into(state, path, _EverythingPlanner(), no_dist=True)
    return state


def _first_error(exc: BaseException) -> str:
    """The first rank's error of a CheckpointException, or the exception itself."""
    failures = getattr(exc, "failures", None)
    first = next(iter(failures.values()), exc) if failures else exc  # per rank: (exception, traceback)
    return str(first[0] if isinstance(first, tuple) else first)[:300]


def read_model(path: str, model: torch.nn.Module, prefix: str) -> int:
    """Load into ``model`` the checkpoint's tensors named ``prefix + name`` for each of the model's
    own names (a stage's module holds the backbone under ``model.``); returns how many."""
    own = model.state_dict()
    _load_into({f"model.{prefix}{name}": tensor for name, tensor in own.items()}, path, _Planner(), no_dist=True)
    return len(own)  # loaded in place: the state dict's tensors are the model's


def model_and_tokenizer(config, level: int = logging.INFO):
    """The run's model (``model.path``, else the preset with random weights) and tokenizer, the
    embedding table grown when the tokenizer's ids reach past it (``config``: a Config), which is
    logged at ``level``."""
    path = config.model.path
    tokenizer = HFTokenizer(path) if path else ByteTokenizer()
    model = build(None if path else config.model.preset, path, pointwise=config.model.fused_pointwise)
    rows, top = model.get_input_embeddings().num_embeddings, max(tokenizer.specials.all)
    if top >= rows:  # e.g. <|mask|> appended past the embedding table
        model.resize_token_embeddings(top + 1)
        log.log(level, f"the tokenizer's ids reach {top}: embedding table resized from {rows} rows to {top + 1} "
                "(new rows start untrained)")
    return model, tokenizer


def load_backbone(model, run_dir: str, level: int = logging.INFO) -> str:
    """Load the backbone (language model and vision tower; no heads) of the newest sound checkpoint
    of the run in ``run_dir`` (either stage) into ``model``, logged at ``level``; returns the
    checkpoint's path."""
    path = find(run_dir)
    if path is None:
        raise ValueError(f"{run_dir}: no checkpoint in {run_dir}/checkpoints")
    count = read_model(path, model, prefix="model.")
    log.log(level, f"loaded the backbone from {path} ({count} tensors)")
    return path


def load_run(run_dir: str):
    """(config, model with the run's newest backbone weights, tokenizer) of a run directory. What
    loading says is debug here (the run's training said it already)."""
    config = Config.read(run_dir)
    model, tokenizer = model_and_tokenizer(config, logging.DEBUG)
    load_backbone(model, run_dir, logging.DEBUG)
    return config, model, tokenizer
