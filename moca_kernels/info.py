"""``python -m moca_kernels.info``: the versions this machine runs, what each backend needs and
whether it has it, then each op's backends and, for each one not usable here, why."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re

import torch

import moca_kernels
from moca_kernels import _cuda
from moca_kernels._registry import ENV_VAR, REGISTRY, triton_import_error, triton_interpret
from moca_kernels.varlen_attention.flash import flash_attn_available, torch_varlen_available

CUDA_BUILD = ("python -m pip install -e . --no-build-isolation (nvcc on PATH or CUDA_HOME, a CUDA build of torch; "
              "MOCA_BUILD_CUDA=1 makes a missing nvcc an error)")


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


TORCHVISION_CPU = "pip install torchvision=={} --index-url https://download.pytorch.org/whl/cpu (docs/export.md)"


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.13.0+cpu" -> (2, 13, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _torchvision_for(torch_version: str) -> str:
    """The torchvision release built for a torch 2.x release (torch 2.N goes with torchvision 0.(N+15))."""
    release = _release(torch_version)
    return f"0.{release[1] + 15}.0" if len(release) > 1 and release[0] == 2 else "<the release for this torch>"


def torchvision_mismatch(torch_version: str, torch_cuda: str | None,
                         vision: importlib.metadata.Distribution | None) -> str | None:
    """Why the installed torchvision (``vision``; None when absent) does not go with this torch,
    or None: it pins another torch release, or it is a CUDA build (it ships ``libcudart``) beside
    a CPU torch, whose native operators then fail to load (``import torchvision`` breaks, and
    transformers' image processing with it). Read from the distribution's metadata, without
    importing torchvision."""
    if vision is None:
        return None
    fix = TORCHVISION_CPU.format(_torchvision_for(torch_version)) if torch_cuda is None else \
        f"install the torchvision release built for torch {torch_version}"
    for requirement in vision.requires or []:
        pin = re.match(r"torch\s*\(?\s*==\s*([^\s;)]+)", requirement)
        if pin and _release(pin.group(1)) != _release(torch_version):
            return (f"torchvision {vision.version} is built for torch {pin.group(1)}, not this torch {torch_version}: "
                    f"{fix}")
    cuda = [str(f) for f in vision.files or [] if "libcudart" in str(f)]
    if torch_cuda is None and cuda:
        return (f"torchvision {vision.version} is a CUDA build (it ships {cuda[0]}) beside a CPU build of torch: "
                f"`import torchvision` fails, and with it loading an export in sentence-transformers: {fix}")
    return None


def _torchvision_line() -> str:
    try:
        vision = importlib.metadata.distribution("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return ("torchvision: not installed (sentence-transformers needs it to load an export; for a CPU torch: "
                f"{TORCHVISION_CPU.format(_torchvision_for(torch.__version__))})")
    why = torchvision_mismatch(torch.__version__, torch.version.cuda, vision)
    return f"WARNING: {why}" if why else f"torchvision {vision.version} (built for this torch)"


def versions() -> list[str]:
    """One line each: this package, Python, torch (and the CUDA it was built with), triton,
    torchvision (a warning when it does not go with torch), the GPU."""
    lines = [f"moca_kernels {moca_kernels.__version__}  python {platform.python_version()}  torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none: a CPU build'})"]
    if triton_import_error():
        lines.append(f"triton: unavailable ({triton_import_error()})")
    else:
        import triton
        lines.append(f"triton {triton.__version__}")
    lines.append(_torchvision_line())
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))}, {torch.cuda.device_count()} visible)")
    else:
        lines.append("GPU: none visible to torch")
    return lines


def needs() -> list[str]:
    """What each backend needs, and whether this machine has it."""
    cuda = torch.cuda.is_available()
    if triton_import_error():
        triton_state = f"missing: {triton_import_error()}"
    elif cuda:
        triton_state = "has it (a CUDA GPU)"
    elif triton_interpret():
        triton_state = "has TRITON_INTERPRET=1 (CPU tensors, slow: for tests)"
    else:
        triton_state = "missing: no CUDA GPU, and TRITON_INTERPRET is not set"
    library = _cuda.library_path()
    if library is None:
        cuda_state = f"not built; build it with {CUDA_BUILD}"
    elif _cuda.unavailable_reason():
        cuda_state = f"built but not loadable: {_cuda.unavailable_reason()}"
    else:
        cuda_state = f"built: {library}" + ("" if cuda else " (no CUDA GPU to run it on)")
    flash_attn = _distribution_version("flash-attn") or ("installed" if flash_attn_available() else None)
    flash_state = ", ".join([f"torch.nn.attention.varlen {'present' if torch_varlen_available() else 'absent'}",
                             f"flash-attn {flash_attn or 'not installed (pip install flash-attn)'}"])
    return ["backends need:",
            "  torch (the references): torch alone, on any device: has it",
            f"  triton (the Triton kernels): the triton package and a CUDA GPU, or TRITON_INTERPRET=1 on CPU: "
            f"{triton_state}",
            f"  cuda (the CUDA library): built from csrc/cuda by setup.py, and a CUDA GPU: {cuda_state}",
            "  flash (FlashAttention-2, varlen_attention only): a CUDA GPU of compute capability 8.0+, and "
            f"torch.nn.attention.varlen or the flash-attn package: {flash_state}" + ("" if cuda else "; no CUDA GPU")]


def report() -> str:
    lines = versions() + [""] + needs() + [""]
    for name in (ENV_VAR, "MOCA_KERNELS_TMA", "MOCA_KERNELS_AUTOTUNE", "MOCA_KERNELS_ATTENTION_FWD",
                 "MOCA_KERNELS_ATTENTION_BWD", "MOCA_KERNELS_DENSE_MAX_BYTES", "TRITON_INTERPRET"):
        lines.append(f"{name}={os.environ.get(name, '')!r}")
    for name, entry in REGISTRY.items():
        lines.append("")
        lines.append(f"{name}:")
        for backend in entry.backends:
            reasons = backend.reasons(None, None)
            if reasons:
                state = "not usable: " + "; ".join(reasons)
            elif backend.name == "triton" and not torch.cuda.is_available():
                state = "available on CPU tensors through the Triton interpreter (never picked automatically)"
            else:
                state = "available"
            lines.append(f"  {backend.name:<7} {state}")
        missing = [b for b in ("cuda", "triton", "torch") if entry.get(b) is None]
        for b in missing:
            lines.append(f"  {b:<7} not implemented for this op")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
