"""A stand-in for the parts of CuPy 14 that kernels/cuda_decode.py and kernels/cuda_gemv.py use, shaped like the real
API (cupy/_core/raw.pyx, cupy/cuda/compiler.py), so CPU tests walk the same attribute paths a GPU run does:

- ``RawModule(code=, options=, name_expressions=)`` compiles lazily: its first ``get_function`` "runs NVRTC" for
  the whole module (counted in ``compiles``) and a name outside ``name_expressions`` is an error, as in CuPy.
- ``get_function`` returns a ``RawKernel``, which has no ``ptr`` of its own: its CUfunction handle is
  ``.kernel.ptr`` (``.kernel`` is the ``cupy.cuda.function.Function`` of the current device).
- ``CompileException(msg, source, name, options, backend)`` prints as its NVRTC log.
"""

from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace

# What NVRTC logs: an error located in the source, and failures of the environment (messages seen from NVRTC for
# an unknown -arch and for a missing header)
SOURCE_ERROR_LOG = (
    '/tmp/tmpab12/8f3c_2.cubin.cu(214): error: identifier "dfg_oops" is undefined\n\n'
    '1 error detected in the compilation of "/tmp/tmpab12/8f3c_2.cubin.cu".\n'
)
ARCH_ERROR_LOG = "nvrtc: error: invalid value for --gpu-architecture (-arch)\n"
HEADER_ERROR_LOG = (
    '/tmp/tmpab12/8f3c_2.cubin.cu(1): catastrophic error: cannot open source file "cuda_bf16.h"\n'
)


class CompileException(Exception):
    def __init__(self, msg, source, name, options, backend="nvrtc"):
        self._msg, self.source, self.name, self.options, self.backend = msg, source, name, options, backend
        super().__init__()

    def __str__(self) -> str:
        return self._msg


class Function:
    """cupy.cuda.function.Function: a loaded kernel, ``ptr`` its CUfunction handle."""

    def __init__(self, ptr: int):
        self.ptr = ptr


class RawKernel:
    def __init__(self, name: str, ptr: int):
        self.name = name
        self._function = Function(ptr)
        self.dynamic_smem = 0
        self.calls: list[tuple] = []

    @property
    def kernel(self) -> Function:
        return self._function

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.dynamic_smem

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        self.dynamic_smem = value

    @property
    def attributes(self) -> dict:
        keys = (
            "max_threads_per_block",
            "shared_size_bytes",
            "const_size_bytes",
            "local_size_bytes",
            "num_regs",
            "ptx_version",
            "binary_version",
            "cache_mode_ca",
            "max_dynamic_shared_size_bytes",
            "preferred_shared_memory_carveout",
        )
        return {
            k: {"num_regs": 40, "max_dynamic_shared_size_bytes": self.dynamic_smem}.get(k, 0) for k in keys
        }

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


class FakeCupy:
    """``FakeCupy(fail=...)``: a cupy module; ``fail`` (an exception) is raised by the first compile."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.modules: list[RawModule] = []
        self.compiles = 0
        self.pointers = itertools.count(0x7F00_0000_1000, 0x100)
        fake = self

        class RawModule:
            def __init__(self, *, code=None, path=None, options=(), name_expressions=None, **kw):
                self.code, self.options = code, tuple(options)
                self.name_expressions = tuple(name_expressions) if name_expressions is not None else None
                self.compiled = False
                self.kernels: dict[str, RawKernel] = {}
                fake.modules.append(self)

            def get_function(self, name: str) -> RawKernel:
                if not self.compiled:
                    if fake.fail is not None:
                        raise fake.fail
                    fake.compiles += 1
                    self.compiled = True
                if self.name_expressions is not None and name not in self.name_expressions:
                    raise KeyError(f"{name} is not among the module's name expressions")
                if name not in self.kernels:
                    self.kernels[name] = RawKernel(name, next(fake.pointers))
                return self.kernels[name]

        self.RawModule = RawModule
        self.cuda = SimpleNamespace(
            Device=lambda index=None: contextlib.nullcontext(),
            ExternalStream=lambda ptr, device_index=None: contextlib.nullcontext(),
        )


def install(monkeypatch, cupy: FakeCupy | None = None) -> FakeCupy:
    """Make ``cupy`` (a new FakeCupy by default) the CuPy the CUDA decoder and the fused GEMV import, with their
    module, function and pointer caches emptied for the test."""
    from dfloat.kernels import cuda_decode, cuda_gemv

    cupy = cupy or FakeCupy()
    for module, caches in (
        (cuda_decode, ("_MODULES", "_FUNCTIONS", "_POINTERS")),
        (cuda_gemv, ("_MODULES", "_FUNCTIONS")),
    ):
        monkeypatch.setattr(module, "_cupy", lambda: cupy)
        for cache in caches:
            monkeypatch.setattr(module, cache, {})
    return cupy
