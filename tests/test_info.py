"""`python -m moca_kernels.info` tells the truth about this machine."""
import functools
import os
import subprocess
import sys

import pytest
import torch


def _info(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOCA_KERNELS_BACKEND")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "moca_kernels.info"], capture_output=True, text=True, env=env,
                          check=True).stdout


@functools.cache
def _plain() -> str:
    """The report without TRITON_INTERPRET (one subprocess for the tests that read it)."""
    return _info({})


@functools.cache
def _interpreted() -> str:
    return _info({"TRITON_INTERPRET": "1"})


def test_info_lists_every_backend_with_reasons():
    out = _plain()
    assert "varlen_attention:" in out
    assert "info_nce:\n" in out and "mae_loss:\n" in out
    assert "torch   available" in out
    assert "cuda    not implemented for this op" in out
    if torch.cuda.is_available():
        assert "triton  available" in out
    else:
        # every op with a Triton backend says why it cannot run here
        assert out.count("triton  not usable: no CUDA device") == out.count("\n  triton  ") >= 3
        assert "GPU: none visible to torch" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter note is for machines without CUDA")
def test_info_under_interpreter():
    out = _interpreted()
    assert "triton  available on CPU tensors through the Triton interpreter (never picked automatically)" in out


def test_info_prints_versions_and_what_each_backend_needs():
    import triton

    import moca_kernels
    out = _plain()
    assert out.startswith(f"moca_kernels {moca_kernels.__version__}  python ")
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})" in out
    assert f"\ntriton {triton.__version__}\n" in out
    needs = out.split("backends need:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(" (")[0].strip() for line in needs] == ["torch", "triton", "cuda", "flash"]
    from moca_kernels import _cuda
    if _cuda.library_path() is None:
        assert "not built; build it with python -m pip install -e . --no-build-isolation" in needs[2]
    else:
        assert f"built: {_cuda.library_path()}" in needs[2]
    import importlib.util
    flash_attn = importlib.util.find_spec("flash_attn") is not None
    assert ("flash-attn not installed (pip install flash-attn)" in needs[3]) is not flash_attn
    if torch.cuda.is_available():
        assert f"GPU: {torch.cuda.get_device_name()}" in out and needs[1].endswith("has it (a CUDA GPU)")
    else:
        assert "GPU: none visible to torch" in out
        assert needs[1].endswith("missing: no CUDA GPU, and TRITON_INTERPRET is not set")
        assert "has TRITON_INTERPRET=1 (CPU tensors, slow: for tests)" in _interpreted()


def _fake_torchvision(folder, version: str, torch_pin: str, files: list[str]) -> str:
    """A torchvision distribution's metadata alone (what pip leaves in site-packages), in ``folder``."""
    info = folder / f"torchvision-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n"
                                   f"Requires-Dist: numpy\nRequires-Dist: torch (=={torch_pin})\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files + [f"{info.name}/METADATA"]))
    return str(folder)


def test_info_warns_when_torchvision_does_not_go_with_torch(tmp_path):
    base = torch.__version__.split("+")[0]
    major, minor = (int(x) for x in base.split(".")[:2])
    path = os.environ.get("PYTHONPATH", "")

    def first_lines(folder):
        return _info({"PYTHONPATH": os.pathsep.join(p for p in (folder, path) if p)}).split("\nGPU")[0]
    other = f"{major}.{minor - 1}.0"
    out = first_lines(_fake_torchvision(tmp_path / "old", f"0.{minor + 14}.0", other, []))
    assert f"WARNING: torchvision 0.{minor + 14}.0 is built for torch {other}, not this torch {torch.__version__}: " \
        in out
    out = first_lines(_fake_torchvision(tmp_path / "cuda", f"0.{minor + 15}.0", base,
                                        ["torchvision/_C.so", "torchvision.libs/libcudart.faf08d9a.so.13"]))
    if torch.version.cuda is None:
        assert (f"WARNING: torchvision 0.{minor + 15}.0 is a CUDA build (it ships torchvision.libs/libcudart"
                in out and f"pip install torchvision==0.{minor + 15}.0 --index-url" in out)
    else:
        assert f"\ntorchvision 0.{minor + 15}.0 (built for this torch)" in out
    out = first_lines(_fake_torchvision(tmp_path / "cpu", f"0.{minor + 15}.0+cpu", base, ["torchvision/_C.so"]))
    assert f"\ntorchvision 0.{minor + 15}.0+cpu (built for this torch)" in out and "WARNING" not in out
