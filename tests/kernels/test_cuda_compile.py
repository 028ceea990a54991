"""kernels/cuda/decode.cu through a real CUDA compiler for real GPUs (no GPU needed): what g++ cannot check.

NVRTC is what CuPy uses at run time, with no headers (the source must compile on NVRTC's built-ins alone); when
no libnvrtc is found, nvcc stands in (it includes cuda_runtime.h, so it proves less about headers). Either way
ptxas must fit every kernel in its __launch_bounds__ without spilling to local memory, with no static shared
memory (cuda_decode.plan gives all of it to the dynamic layout). Skipped when neither compiler is present.
Set DFLOAT_NVRTC to a libnvrtc.so path to pick one.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dfloat.kernels import cuda_decode

SOURCE = Path(cuda_decode.__file__).parent / "cuda" / "decode.cu"
KERNELS = (*cuda_decode.SPECIALISED.values(), cuda_decode.GENERIC)
ARCHS = ("sm_90", "sm_80")  # H100 (the GPU check), A100


def _nvrtc_library() -> str | None:
    if os.environ.get("DFLOAT_NVRTC"):
        return os.environ["DFLOAT_NVRTC"]
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            dirs += [os.path.join(base, "cu13", "lib"), os.path.join(base, "cuda_nvrtc", "lib")]
    dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    for d in dirs:
        found = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        if found:
            return found[0]
    return None


def _compile_nvrtc(lib_path: str, arch: str) -> str:
    folder = os.path.dirname(lib_path)
    for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC loads it by name, not from its own folder
        break
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.read_bytes(), b"decode.cu", 0, None, None) == 0
    opts = [o.encode() for o in (*cuda_decode.NVRTC_OPTIONS, f"-arch={arch}", "-Xptxas=-v")]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    assert rc == 0, f"NVRTC failed ({rc}):\n{text[-4000:]}"
    return text


def _compile_nvcc(nvcc: str, arch: str, tmp: Path) -> str:
    res = subprocess.run([nvcc, f"-arch={arch}", "-cubin", *cuda_decode.NVRTC_OPTIONS, "-Xptxas", "-v",
                          "-o", str(tmp / f"decode_{arch}.cubin"), str(SOURCE)], capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def compile_log():
    lib = _nvrtc_library()
    nvcc = shutil.which("nvcc")
    if lib is None and nvcc is None:
        pytest.skip("neither libnvrtc nor nvcc is installed")

    def build(arch: str, tmp: Path) -> str:
        return _compile_nvrtc(lib, arch) if lib else _compile_nvcc(nvcc, arch, tmp)

    return build


def _entries(log: str) -> dict[str, str]:
    """ptxas -v report per entry function: the text from its 'Compiling entry function' line to the next."""
    parts = re.split(r"Compiling entry function '([A-Za-z0-9_]+)'", log)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(compile_log, arch, tmp_path):
    entries = _entries(compile_log(arch, tmp_path))
    assert set(KERNELS) <= set(entries), f"missing kernels: {set(KERNELS) - set(entries)}"
    for name in KERNELS:
        report = entries[name]
        assert re.search(r"\b0 bytes spill stores", report), f"{name} spills on {arch}:\n{report}"
        assert re.search(r"\b0 bytes stack frame", report), f"{name} uses a stack on {arch}:\n{report}"
        smem = re.search(r"(\d+) bytes smem", report)
        assert smem is None or int(smem.group(1)) == 0, f"{name} has static shared memory on {arch}:\n{report}"
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        assert regs <= 64, f"{name}: {regs} registers on {arch}"  # 256x4, 512x2 and 1024x1 threads per SM
