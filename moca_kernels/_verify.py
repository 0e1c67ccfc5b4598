"""Kernels that prove their numbers where they run.

None of the Triton designs has been checked on every card a user may own: atomics, TMA bulk
reduce-adds, wgmma pipelines and compiler versions differ. So on the first call of a shape class
an op runs each design it may choose and compares its results, on a small sample of that very call,
with a float64 reference by the project's numerics rule: the design's error may be at most twice
the error of the plain PyTorch computation in the same precision, plus a small floor. A design
that fails is never chosen, and a ``KernelNumericsWarning`` names it with its numbers, once per
process. ``MOCA_KERNELS_VERIFY=0`` turns the check off.

Ops without alternative designs (the pointwise kernels, ``mae_loss``) check their kernel on first
use with ``trusted``: the first call of each kernel variant (op, dtypes, the sizes that pick its
blocks) runs the kernel, forward and backward, on a sample of that call's own rows beside the
PyTorch definition in float64 and in the inputs' precision. A variant that breaks the rule is
warned about once and never used again in the process: its op serves those calls with the PyTorch
definition.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

VERIFY_ENV = "MOCA_KERNELS_VERIFY"
# The absolute floor of the rule, in units of float32's epsilon times the reference's largest
# magnitude (at least 1): summation orders alone differ by a few ulps of float32, while a wrong
# kernel (a lost block, a race) errs by orders of magnitude more.
FLOOR_ULPS = 64


class KernelNumericsWarning(UserWarning):
    """A kernel design gave results outside the numerics rule on this machine and is not used."""


def verification_off() -> bool:
    """True with ``MOCA_KERNELS_VERIFY=0``."""
    return os.environ.get(VERIFY_ENV) == "0"


def can_verify() -> bool:
    """Whether a first call may run the check now: not turned off, not while torch.compile traces,
    and not during CUDA-graph capture (which forbids the host reads a comparison makes)."""
    if verification_off() or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, in float64; infinities of the same sign count as equal, and a
    NaN anywhere in ``x`` that the reference lacks makes it infinite."""
    x64, ref64 = x.detach().double(), reference.detach().double()
    same = (x64 == ref64) | (torch.isnan(x64) & torch.isnan(ref64))
    diff = torch.where(same, torch.zeros_like(x64), (x64 - ref64).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.max().item() if diff.numel() else 0.0


def largest(x: torch.Tensor) -> float:
    """The largest magnitude among the finite entries of ``x`` (0 when it has none)."""
    finite = x.detach()[torch.isfinite(x.detach())]
    return finite.abs().max().item() if finite.numel() else 0.0


def bound(reference: torch.Tensor, plain: torch.Tensor) -> float:
    """What the rule allows: 2x the plain computation's error plus the floor."""
    scale = max(1.0, largest(reference))
    return 2 * error(plain, reference) + FLOOR_ULPS * torch.finfo(torch.float32).eps * scale


def disagreement(name: str, ours: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 plain: Mapping[str, torch.Tensor]) -> str | None:
    """None when every output of ``ours`` is within the rule against ``reference`` (``plain``: the
    same outputs computed the plain way in the inputs' precision), else one line naming ``name``
    and each output outside it with its error and bound."""
    bad = []
    for what, ref in reference.items():
        err, allowed = error(ours[what], ref), bound(ref, plain[what])
        if not err <= allowed:
            bad.append(f"{what} error {err:.3g} > allowed {allowed:.3g} (plain {error(plain[what], ref):.3g})")
    return f"{name}: " + "; ".join(bad) if bad else None


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if t is not None]


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], wrt: Sequence[int],
                      dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The outputs of ``fn(*inputs)`` (``out0``, ``out1``, ...; the floating inputs cast to
    ``dtype`` when given) and the gradients (``grad<i>``) of a fixed random cotangent with respect
    to the inputs at positions ``wrt``: what a check compares between a kernel and its references."""
    leaves = [x.detach().to(dtype or x.dtype) if x.is_floating_point() else x for x in inputs]
    leaves = [x.requires_grad_() if i in wrt else x for i, x in enumerate(leaves)]
    with torch.enable_grad():
        outs = _outputs(fn(*leaves))
        g = torch.Generator(device="cpu").manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(o.device, o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [leaves[i] for i in wrt], cotangents, allow_unused=True)
    named = {f"out{j}": o.detach() for j, o in enumerate(outs)}
    named.update({f"grad{i}": (g if g is not None else torch.zeros_like(leaves[i])).detach()
                  for i, g in zip(wrt, grads)})
    return named


_WARNED: set = set()


def warn_once(key, message: str) -> None:
    """A ``KernelNumericsWarning`` with ``message``, the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, KernelNumericsWarning, stacklevel=3)


SAMPLE_ROWS = 32  # from each end of the call's rows
_TRUSTED: dict[tuple, bool] = {}


def rows_sample(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The first and last ``SAMPLE_ROWS`` entries of ``x`` along ``dim`` (all of them when fewer)."""
    n = x.shape[dim]
    if n <= 2 * SAMPLE_ROWS:
        return x
    return torch.cat([x.narrow(dim, 0, SAMPLE_ROWS), x.narrow(dim, n - SAMPLE_ROWS, SAMPLE_ROWS)], dim)


def trusted(op: str, key: tuple, fast: Callable, reference: Callable, inputs: Sequence[torch.Tensor],
            wrt: Sequence[int]) -> bool:
    """Whether the kernel variant ``(op, *key)`` may serve: checked on its first call (``inputs``:
    a sample of that call's own arguments, ``wrt``: the positions that are differentiated), then
    remembered. True without a check where none can run now (torch.compile tracing, CUDA-graph
    capture, MOCA_KERNELS_VERIFY=0), without remembering it."""
    variant = (op, *key)
    if variant in _TRUSTED:
        return _TRUSTED[variant]
    if not can_verify():
        return True
    ours = outputs_and_grads(fast, inputs, wrt)
    ref = outputs_and_grads(reference, inputs, wrt, torch.float64)
    plain = outputs_and_grads(reference, inputs, wrt)
    why = disagreement(op, ours, ref, plain)
    if why is not None:
        warn_once(variant, f"{op}: the fused kernel is not used on this machine for {key}: its results break the "
                           f"numerics rule ({why}); the PyTorch definition serves instead. Please report it with "
                           "`python -m moca_kernels.check --json report.json`.")
    _TRUSTED[variant] = why is None
    return _TRUSTED[variant]
