"""``python -m moca_kernels.info``: each op's backends, and for each one not usable here, why."""
from __future__ import annotations

import os
import platform

import torch

import moca_kernels
from moca_kernels._registry import ENV_VAR, REGISTRY, triton_import_error


def report() -> str:
    lines = [f"moca_kernels {moca_kernels.__version__}  torch {torch.__version__}  python {platform.python_version()}"]
    if triton_import_error():
        lines.append(f"triton: unavailable ({triton_import_error()})")
    else:
        import triton
        lines.append(f"triton {triton.__version__}")
    if torch.cuda.is_available():
        lines.append(f"CUDA device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append(f"CUDA device: none (torch built with CUDA: {torch.version.cuda or 'no'})")
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
