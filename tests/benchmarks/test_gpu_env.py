"""benchmarks/gpu_env.py (gpu_check.sh's first step) on the CPU: without a GPU it reports versions and exits 0; its
kernel report runs against a CuPy stand-in, an H100's properties and a fake driver whose occupancy calculator
records what it was asked, so the code that runs first on a GPU has run before."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
import fake_cupy  # noqa: E402
import gpu_env  # noqa: E402

from dfloat.kernels import cuda_decode, cuda_launch  # noqa: E402

H100 = SimpleNamespace(shared_memory_per_multiprocessor=233_472, shared_memory_per_block_optin=232_448)


class FakeDriver:
    def __init__(self):
        self.asked = []

    def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, blocks, function, block, smem):  # noqa: N802
        self.asked.append((function.value, block.value, smem.value))
        ctypes.cast(blocks, ctypes.POINTER(ctypes.c_int)).contents.value = 7
        return 0


@pytest.fixture
def fakes(monkeypatch):
    cupy, drv = fake_cupy.install(monkeypatch), FakeDriver()
    monkeypatch.setattr(cuda_launch, "driver", lambda: drv)
    return cupy, drv


def test_without_a_gpu_it_reports_versions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_env.py", "--out", str(tmp_path)])
    monkeypatch.setattr(gpu_env.torch.cuda, "is_available", lambda: False)
    assert gpu_env.main() == 0
    doc = json.loads((tmp_path / "gpu_env.json").read_text())
    assert doc["gpu"] is None and "torch" in doc["packages"] and "no CUDA device" in capsys.readouterr().out


def test_decode_kernels_report_the_plan_and_the_driver(fakes):
    cupy, drv = fakes
    rows = gpu_env.decode_kernels(0, H100)
    by_kernel = {r["kernel"]: r for r in rows}
    w32 = by_kernel["dfloat_decode_w32_t256"]
    assert w32["blocks_per_sm_target"] == 5 and w32["blocks_per_sm_by_smem"] == 5 and w32["packed_launch"]
    assert w32["blocks_per_sm_driver"] == 7 and w32["registers"] == 40
    assert set(by_kernel) == {*cuda_decode.SPECIALISED.values(), cuda_decode.GENERIC}
    handles = {k.kernel.ptr: (name, k) for m in cupy.modules for name, k in m.kernels.items()}
    for (
        ptr,
        block,
        smem,
    ) in drv.asked:  # the driver was asked about each kernel's real handle and launch shape
        name, _ = handles[ptr]
        assert (block, smem) == (by_kernel[name]["block"], by_kernel[name]["smem_bytes"])


def test_gemv_kernels_report_the_batch_8_and_16_instances(fakes):
    cupy, drv = fakes
    rows = gpu_env.gemv_kernels(0)
    assert [r["kernel"] for r in rows] == [
        "dfloat_gemv<8, 1, 0>",
        "dfloat_gemv<8, 8, 3>",
        "dfloat_gemv<8, 8, 3>",
        "dfloat_gemv<4, 16, 3>",
    ]
    assert all(r["blocks_per_sm_driver"] == 7 and r["block"] == 128 for r in rows)
    assert cupy.compiles == 2  # the rows_per_tile 8 and 4 modules
