"""Build script. The package is Python plus one optional shared library of CUDA kernels
(``csrc/cuda/*.cu``, torch-free, called through ctypes by ``moca_kernels._cuda``) and the C++
data-pipeline helpers (``csrc/cpu``, pybind11), built so that ``pip install -e .`` keeps working
on machines without a GPU toolchain.

Switches (environment variables):
    MOCA_BUILD_CUDA   auto (default): build where nvcc exists and the torch that is importable
                      at build time has CUDA (so on a GPU machine use --no-build-isolation);
                      1: build, and fail if nvcc is missing; 0: never build.
    MOCA_CUDA_ARCHS   targets, ";"-separated (default "80;90a"): sm_XX machine code for each.
    CUDA_HOME         where to look for bin/nvcc when it is not on PATH (then /usr/local/cuda).
"""
import glob
import os
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
LIBRARY = "moca_kernels._cuda.libmoca_cuda"


def _nvcc():
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for folder in (home, "/usr/local/cuda"):  # CUDA's default prefix is often off PATH (as on our GPU machines)
        if not found and folder and os.path.exists(os.path.join(folder, "bin", "nvcc")):
            found = os.path.join(folder, "bin", "nvcc")
    return found


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _cuda_build():
    """(nvcc path or None, reason when None)."""
    switch = os.environ.get("MOCA_BUILD_CUDA", "auto").strip().lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"MOCA_BUILD_CUDA must be auto, 0 or 1, got {switch!r}")
    nvcc = _nvcc()
    if switch == "0":
        return None, "MOCA_BUILD_CUDA=0"
    if switch == "1":
        if not nvcc:
            raise SystemExit("MOCA_BUILD_CUDA=1 but nvcc was not found (put it on PATH or set CUDA_HOME)")
        return nvcc, None
    if not nvcc:
        return None, "nvcc was not found"
    if not _torch_cuda():
        return None, "the torch importable at build time has no CUDA (build isolation hides the installed one)"
    return nvcc, None


def gencode_flags(archs: str):
    flags = []
    for arch in (a.strip() for a in archs.split(";") if a.strip()):
        if not arch.replace("a", "").isdigit():
            raise SystemExit(f"MOCA_CUDA_ARCHS: {arch!r} is not like 80 or 90a")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


class NvccLibrary(Extension):
    """A plain shared library compiled by nvcc (no Python module inside)."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, NvccLibrary):
            return super().build_extension(ext)
        nvcc, _ = _cuda_build()
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
                   *gencode_flags(os.environ.get("MOCA_CUDA_ARCHS", "80;90a")), *ext.sources, "-o", out]
        print("building the CUDA kernels:", " ".join(command))
        subprocess.run(command, check=True)


def _cpu_extensions():
    """The C++ data-pipeline helpers (csrc/cpu), where pybind11 is importable at build time (it is
    a build requirement; moca falls back to Python where the extension is missing)."""
    try:
        import pybind11
    except ImportError:
        print("moca: pybind11 is not installed; not building the C++ packer (the Python one serves)")
        return []
    return [Extension("moca.data._packer", [os.path.join("csrc", "cpu", "packer.cpp")],
                      include_dirs=[pybind11.get_include()], language="c++",
                      extra_compile_args=["-O3", "-std=c++17"])]


nvcc, why_not = _cuda_build()
if nvcc is None:
    print(f"moca: not building the CUDA kernels ({why_not}); the cuda backend will be unavailable")
setup(ext_modules=([NvccLibrary(LIBRARY, CUDA_SOURCES)] if nvcc and CUDA_SOURCES else []) + _cpu_extensions(),
      cmdclass={"build_ext": BuildExt})
