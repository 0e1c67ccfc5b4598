"""Backend registry: which implementation of an op runs, and why the others do not.

Every op has an ordered list of backends (fastest first). A backend is usable for a call when its
``reasons(...)`` returns nothing; the explanation strings are what ``python -m moca_kernels.info``
prints and what a forced but unusable backend raises.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("torch", "triton", "cuda", "flash")
ENV_VAR = "MOCA_KERNELS_BACKEND"


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_TRITON_IMPORT: dict[str, str | None] = {}


def triton_import_error() -> str | None:
    """Why triton cannot be imported here, or None (probed once; a plain dict rather than
    functools.cache, which torch.compile warns about when it traces through)."""
    if "error" not in _TRITON_IMPORT:
        if importlib.util.find_spec("triton") is None:
            _TRITON_IMPORT["error"] = "the triton package is not installed"
        else:
            try:
                import triton  # noqa: F401
                _TRITON_IMPORT["error"] = None
            except Exception as exc:  # a broken install must not break the import of moca_kernels
                _TRITON_IMPORT["error"] = f"importing triton failed: {exc}"
    return _TRITON_IMPORT["error"]


def triton_device_reason(device: torch.device | None) -> str | None:
    """Why Triton cannot run on ``device`` (None: any device this machine offers)."""
    if triton_import_error():
        return triton_import_error()
    if device is None:
        if torch.cuda.is_available() or triton_interpret():
            return None
        return "no CUDA device (CPU tensors run the Triton kernels only under TRITON_INTERPRET=1)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if triton_interpret() else "CPU tensors need TRITON_INTERPRET=1 to run Triton kernels"
    return f"Triton does not run on {device.type} tensors"


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_reasons(device: torch.device | None, dtype: torch.dtype | None) -> list[str]:
    """Why the Triton kernels (which take float16, bfloat16 or float32) cannot serve a call."""
    reasons = []
    why = triton_device_reason(device)
    if why:
        reasons.append(why)
    if dtype is not None and dtype not in TRITON_DTYPES:
        reasons.append(f"{dtype} inputs (it takes float16, bfloat16 or float32)")
    if dtype == torch.bfloat16 and device is not None and device.type == "cpu":
        reasons.append("bfloat16 tl.dot gives wrong results in the Triton interpreter")
    return reasons


# MOCA_KERNELS_AUTOTUNE=0 skips the Triton kernels' autotuning: the first candidate only (the GPU
# tests use it: every new shape class would otherwise compile and time every candidate).
AUTOTUNE_ENV = "MOCA_KERNELS_AUTOTUNE"


def autotune_off() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "0"


def bench_unless_disabled(fn, quantiles):
    """The autotuners' timer. It times nothing with MOCA_KERNELS_AUTOTUNE=0 (one candidate left)
    or in the interpreter (no GPU driver to time with, and a CPU's time says nothing of a GPU's):
    every candidate then ties and the autotuner keeps the first."""
    if autotune_off() or triton_interpret():
        return [0.0, 0.0, 0.0]
    import triton.testing
    return triton.testing.do_bench(fn, quantiles=quantiles)


def described(x) -> str:
    """What an argument is, for an error message: a tensor's dtype, shape and device, else its type."""
    return f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_float_matrix(name: str, x, layout: str = "") -> None:
    """ValueError naming ``name`` unless ``x`` is a 2-D floating-point tensor (``layout``, e.g.
    " (N, P)", completes the message)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor{layout}, got {described(x)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (read once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (the kernels take any row stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``reasons(device, dtype)`` lists why it cannot serve that call (empty: it can);
    with ``device=None`` it answers for this machine in general. ``auto`` says whether it may be
    picked when the caller names no backend (the Triton interpreter is a test vehicle, so it is
    never picked automatically on CPU tensors).
    """

    name: str
    reasons: Callable[..., list[str]]
    auto: Callable[[torch.device], bool] = lambda device: True


# The two backends most ops have: Triton kernels (picked automatically on CUDA tensors) and the
# PyTorch reference (always able to serve).
TRITON = Backend("triton", triton_reasons, auto=lambda device: device.type == "cuda")
TORCH = Backend("torch", lambda device, dtype: [])


@dataclass
class OpEntry:
    name: str
    backends: Sequence[Backend]

    def get(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)


REGISTRY: dict[str, OpEntry] = {}


def register_op(name: str, backends: Sequence[Backend]) -> OpEntry:
    REGISTRY[name] = OpEntry(name, tuple(backends))
    return REGISTRY[name]


def select_backend(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the backend that runs this call of ``op``.

    ``backend`` (or, when it is None, the ``MOCA_KERNELS_BACKEND`` environment variable) forces one;
    a forced backend that cannot serve the call raises ``ValueError`` with its reasons.
    """
    entry = REGISTRY[op]
    source = "backend"
    if backend is None and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR], ENV_VAR
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"{source}={backend!r} is not one of {BACKEND_NAMES}")
        chosen = entry.get(backend)
        if chosen is None:
            have = ", ".join(b.name for b in entry.backends)
            raise ValueError(f"{source}={backend!r}: {op} has no {backend} backend (it has: {have})")
        why = chosen.reasons(device, dtype)
        if why:
            raise ValueError(f"{source}={backend!r} cannot run {op} here: " + "; ".join(why))
        return backend
    for b in entry.backends:
        if b.auto(device) and not b.reasons(device, dtype):
            return b.name
    raise ValueError(f"no backend of {op} can serve {dtype} tensors on {device}")
