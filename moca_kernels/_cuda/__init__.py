"""The project's CUDA kernels (``csrc/cuda/*.cu``), built by ``setup.py`` into one shared library
with torch-free launchers, and called here through ctypes on torch tensors' raw pointers and the
current CUDA stream. Each op's ``op.py`` registers its calls as ``torch.library`` ops.

``setup.py`` builds the library where nvcc exists and torch has CUDA (``MOCA_BUILD_CUDA=1``
forces the build, ``=0`` skips it; ``MOCA_CUDA_ARCHS``, default ``80;90a``, names the targets).
"""
from __future__ import annotations

import ctypes
import glob
import os

import torch

_FOLDER = os.path.dirname(os.path.abspath(__file__))
_STATE: dict[str, object] = {}

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def library_path() -> str | None:
    found = sorted(glob.glob(os.path.join(_FOLDER, "libmoca_cuda*.so")))
    return found[0] if found else None


def _load():
    if "lib" not in _STATE:
        path = library_path()
        _STATE["lib"], _STATE["error"] = None, None
        if path is None:
            _STATE["error"] = ("the CUDA library was not built (pip install -e . --no-build-isolation with nvcc "
                               "and a CUDA build of torch, or MOCA_BUILD_CUDA=1, builds it)")
        else:
            try:
                lib = ctypes.CDLL(path)
                lib.moca_mae_loss.restype = ctypes.c_int
                lib.moca_mae_loss.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                                              ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_float,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                lib.moca_mae_max_norm_pix_row.restype = ctypes.c_longlong
                lib.moca_cuda_error_string.restype = ctypes.c_char_p
                lib.moca_cuda_error_string.argtypes = [ctypes.c_int]
                _STATE["lib"] = lib
            except OSError as exc:
                _STATE["error"] = f"loading {path} failed: {exc}"
    return _STATE["lib"]


def library():
    """The loaded library, or None (``unavailable_reason`` says why)."""
    return _load()


def unavailable_reason() -> str | None:
    _load()
    return _STATE["error"]  # type: ignore[return-value]


def device_reasons(device: torch.device | None, dtype: torch.dtype | None, dtypes=tuple(DTYPE_CODES)) -> list[str]:
    """Why the CUDA backend cannot serve a call on ``device`` with ``dtype``."""
    reasons = []
    why = unavailable_reason()
    if why:
        reasons.append(why)
    if device is None:
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
    elif device.type != "cuda":
        reasons.append(f"{device.type} tensors (it runs on CUDA tensors)")
    if dtype is not None and dtype not in dtypes:
        reasons.append(f"{dtype} inputs (it takes float32, float16 or bfloat16)")
    return reasons


def check(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"{what} failed: {library().moca_cuda_error_string(code).decode()} (code {code})")


def stream_of(x: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)


def pointer(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(x.data_ptr() if x is not None else None)
