"""How the CUDA decoder and the fused GEMV get their kernels from CuPy, checked on the CPU with a CuPy stand-in
(fake_cupy.py, shaped like CuPy 14's RawModule / RawKernel / CompileException):

- the fused GEMV compiles one module per rows_per_tile holding every instance a launch can ask for, so a sweep
  over batches and block widths runs NVRTC once per module, not once per instance (~47 builds of 1 s each before);
- no launch asks for a register-capped build (128 threads at most) with a wider block;
- a compiler error in the source is raised as CuPy's CompileException, while NVRTC or CUDA being unusable here
  (also reported as a CompileException, with no source line in its log) is a BackendUnavailableError, on which
  backend='auto' decodes with the next backend.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import dfloat
from dfloat.errors import BackendUnavailableError
from dfloat.kernels import cuda_decode, cuda_gemv, gpu_common, registry
from dfloat.testing import bits, weights_like

sys.path.insert(0, str(Path(__file__).parent))
import fake_cupy  # noqa: E402
from fake_cupy import (  # noqa: E402
    ARCH_ERROR_LOG,
    HEADER_ERROR_LOG,
    SOURCE_ERROR_LOG,
    CompileException,
)


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


def every_gemv_plan():
    """Each (kind, rows_per_tile, kernel name) the runtime and the tests can launch."""
    for r in (1, 2, 4, 8):
        for threads in (32, 64, 128, 256):
            for batch in range(1, cuda_gemv.MAX_FUSED_ROWS + 1):
                for kind in ("fused", "twin"):
                    yield kind, r, cuda_gemv.plan(kind, r, threads, 100, 9, batch).kernel
            yield "decode", r, cuda_gemv.plan("decode", r, threads, 100, 9, 1).kernel


def test_gemv_compiles_one_module_per_rows_per_tile(fake):
    plans = list(every_gemv_plan())
    for kind, r, name in plans:
        fn = cuda_gemv._function(0, kind, r, name)
        assert fn.name == name
    assert fake.compiles == len(fake.modules) == 8  # (product, twin) x rows_per_tile 1, 2, 4, 8
    for m in fake.modules:
        assert m.options == cuda_gemv.NVRTC_OPTIONS and m.code == cuda_gemv.source()
    wanted = {name for _, _, name in plans}
    held = {n for m in fake.modules for n in m.name_expressions}
    assert wanted == held  # every instance a plan asks for is built, and nothing else
    for kind, r, name in plans[:50]:  # asked again: from the cache, no new module
        cuda_gemv._function(0, kind, r, name)
    assert fake.compiles == 8


def test_a_llama_layer_sweep_runs_nvrtc_twice(fake):
    # q/o/gate/up/down have >= 1600 rows (rows_per_tile 8), k/v 1024 (rows_per_tile 4): batches 1..16 and the
    # prefill decode build two modules, where one module per instance built 26
    from dfloat.kernels import gemv_layout

    names = set()
    for n in (4096, 1024, 14336):
        r = gemv_layout.default_rows_per_tile(n)
        for kind, batch in [("fused", b) for b in range(1, 17)] + [("decode", 1)]:
            name = cuda_gemv.plan(kind, r, 128, 100, 9, batch).kernel
            cuda_gemv._function(0, kind, r, name)
            names.add(name)
    assert fake.compiles == 2 and len(names) == 26


def test_register_capped_builds_only_for_blocks_that_fit_them():
    for r, nb, threads in ((8, 8, 128), (4, 16, 128), (8, 7, 64), (4, 13, 32)):
        assert cuda_gemv.min_blocks(r, nb, threads) == cuda_gemv.CAPPED_MIN_BLOCKS
        assert cuda_gemv.kernel_name("fused", r, nb, threads) == f"dfloat_gemv<{r}, {nb}, 3>"
    for r, nb, threads in ((8, 8, 256), (8, 6, 128), (4, 12, 128), (8, 1, 128), (2, 8, 32)):
        assert cuda_gemv.min_blocks(r, nb, threads) == 0
    for r in (1, 2, 4, 8):
        for threads in (32, 64, 128, 160, 256):
            for batch in range(1, 17):
                pl = cuda_gemv.plan("fused", r, threads, 10, 9, batch)
                capped = pl.kernel.endswith(f", {cuda_gemv.CAPPED_MIN_BLOCKS}>")
                assert not capped or pl.block <= cuda_gemv.CAPPED_THREADS, pl


@pytest.mark.parametrize("log", [ARCH_ERROR_LOG, HEADER_ERROR_LOG, ""], ids=["arch", "header", "empty-log"])
def test_an_nvrtc_that_cannot_run_here_is_unavailable_not_a_bug(fake, log):
    fake.fail = CompileException(log, cuda_decode.source(), "/tmp/x.cu", ("-std=c++17",))
    with pytest.raises(BackendUnavailableError, match="could not build the CUDA decoder.*CompileException"):
        cuda_decode._function(0, cuda_decode.GENERIC)
    fake.fail = CompileException(log, cuda_gemv.source(), "/tmp/x.cu", ("-std=c++17",))
    with pytest.raises(BackendUnavailableError, match="could not build the fused GEMV.*matmul='decode'"):
        cuda_gemv._function(0, "fused", 8, "dfloat_gemv<8, 1, 0>")


def test_a_compile_error_in_the_source_is_shown_as_it_is(fake):
    fake.fail = CompileException(SOURCE_ERROR_LOG, cuda_decode.source(), "/tmp/x.cu", ("-std=c++17",))
    with pytest.raises(CompileException, match="dfg_oops"):
        cuda_decode._function(0, cuda_decode.GENERIC)
    with pytest.raises(CompileException, match="dfg_oops"):
        cuda_gemv._function(0, "fused", 8, "dfloat_gemv<8, 1, 0>")
    assert gpu_common.is_source_error(fake.fail)
    assert not gpu_common.is_source_error(
        RuntimeError(SOURCE_ERROR_LOG)
    )  # only CuPy's compiler reports these


def test_other_build_failures_are_unavailable(fake):
    fake.fail = RuntimeError("CUDA path could not be detected. Set CUDA_PATH environment variable")
    with pytest.raises(BackendUnavailableError, match="CUDA_PATH"):
        cuda_decode._function(0, cuda_decode.GENERIC)


def test_auto_falls_back_when_nvrtc_cannot_build_the_decoder(fake, monkeypatch):
    """backend='auto' on a machine whose NVRTC rejects the GPU: the CUDA backend's build fails as unavailable, and
    the next backend decodes (here the CPU one, standing in for Triton on a GPU)."""
    fake.fail = CompileException(ARCH_ERROR_LOG, cuda_decode.source(), "/tmp/x.cu", ("-std=c++17",))
    stand_in = types.ModuleType("dfloat_test_cuda_stand_in")

    def decode(ct, out, check=False):  # what cuda_decode.decode does first on a new unit: build its kernel
        cuda_decode._function(0, cuda_decode.SPECIALISED[(ct.bytes_per_window, ct.windows_per_block)])

    stand_in.decode = decode
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.setitem(registry._MODULES, registry.Backend.CUDA, stand_in.__name__)
    monkeypatch.setattr(
        registry, "available_backends", lambda d: [registry.Backend.CUDA, registry.Backend.CPU]
    )
    monkeypatch.setattr(registry, "_FAILED", set())
    monkeypatch.setattr(registry, "_CHOSEN", {})
    t = weights_like(20_000, seed=5)
    out = dfloat.decompress_tensor(dfloat.compress_tensor(t, allow_raw=False))
    assert torch.equal(bits(out), bits(t)) and (registry.Backend.CUDA, "cpu") in registry._FAILED
    with pytest.raises(BackendUnavailableError, match="invalid value for --gpu-architecture"):
        registry.decode_into(dfloat.compress_tensor(t, allow_raw=False), torch.empty_like(t), backend="cuda")
