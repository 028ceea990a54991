"""Kernel launches straight through the CUDA driver (``cuLaunchKernel`` via ctypes), arguments packed once.

A CuPy launch costs ~78 us of host time (it converts and packs every argument on every call). Decoding a unit
repeats one launch with the same kernel, shape and arguments, except at most the output pointer, so the
arguments are packed once into C storage and a launch is one ctypes call. The launch goes to whatever stream the
caller names (torch's current stream), so it is captured by CUDA graphs like any other kernel.

The driver library is the one every NVIDIA installation has (libcuda.so.1 / nvcuda.dll); where it cannot be
loaded, `driver()` returns None and callers fall back to CuPy's launch.
"""

from __future__ import annotations

import ctypes
import sys
import threading

import numpy as np

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_CONTEXT = 201

_DRIVER: ctypes.CDLL | None | bool = None
_CONTEXTS: dict[int, ctypes.c_void_p] = {}
_LOCK = threading.Lock()
_CTYPE = {
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.int32): ctypes.c_int32,
}


def driver() -> ctypes.CDLL | None:
    """The CUDA driver API, loaded once (None where it cannot be)."""
    global _DRIVER
    if _DRIVER is None:
        with _LOCK:
            try:
                lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
                u, p = ctypes.c_uint, ctypes.c_void_p
                lib.cuLaunchKernel.restype = ctypes.c_int
                lib.cuLaunchKernel.argtypes = [p, u, u, u, u, u, u, u, p, p, p]
                _DRIVER = lib
            except (OSError, AttributeError):
                _DRIVER = False
    return _DRIVER or None


def _error_name(lib, rc: int) -> str:
    name = ctypes.c_char_p()
    if lib.cuGetErrorName(rc, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
        return name.value.decode()
    return f"CUresult {rc}"


def _make_primary_context_current(lib, device_index: int) -> None:
    """For a thread on which the CUDA runtime never ran: bind the device's primary context (torch's and CuPy's)."""
    ctx = _CONTEXTS.get(device_index)
    if ctx is None:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        for rc in (
            lib.cuDeviceGet(ctypes.byref(dev), device_index),
            lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
        ):  # kept for the process's lifetime
            if rc != CUDA_SUCCESS:
                raise RuntimeError(f"CUDA driver: cannot use device {device_index}: {_error_name(lib, rc)}")
        _CONTEXTS[device_index] = ctx
    rc = lib.cuCtxSetCurrent(ctx)
    if rc != CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver: cannot use device {device_index}: {_error_name(lib, rc)}")


class PackedLaunch:
    """One kernel launch (function, grid, block, dynamic shared memory, arguments) packed into C storage once.

    ``args`` are sized numpy scalars (uint64 for pointers), in the kernel's parameter order; ``set(i, v)`` changes
    one in place, ``launch(stream)`` is a single ``cuLaunchKernel``.
    """

    __slots__ = ("_lib", "_launch", "_function", "_grid", "_block", "_smem", "_values", "_params", "_device")

    def __init__(
        self,
        lib: ctypes.CDLL,
        function_ptr: int,
        device_index: int,
        grid: int,
        block: int,
        smem: int,
        args: tuple,
    ) -> None:
        self._lib = lib
        self._launch = lib.cuLaunchKernel
        self._function = ctypes.c_void_p(function_ptr)
        self._device = device_index
        self._grid, self._block, self._smem = grid, block, smem
        self._values = [_CTYPE[np.asarray(a).dtype](int(a)) for a in args]
        self._params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(v) for v in self._values))

    def set(self, i: int, value: int) -> None:
        self._values[i].value = value

    def launch(self, stream: int) -> None:
        rc = self._launch(
            self._function, self._grid, 1, 1, self._block, 1, 1, self._smem, stream, self._params, None
        )
        if rc == CUDA_ERROR_INVALID_CONTEXT:
            _make_primary_context_current(self._lib, self._device)
            rc = self._launch(
                self._function, self._grid, 1, 1, self._block, 1, 1, self._smem, stream, self._params, None
            )
        if rc != CUDA_SUCCESS:
            raise RuntimeError(
                f"cuLaunchKernel failed on device {self._device}: {_error_name(self._lib, rc)}"
            )


def max_active_blocks(lib, function_ptr: int, block: int, smem: int) -> int:
    """Blocks of ``block`` threads with ``smem`` bytes of dynamic shared memory that one SM holds at once, as the
    driver computes it (``cuOccupancyMaxActiveBlocksPerMultiprocessor``: registers, shared memory, the kernel's
    launch bounds and its shared-memory attributes)."""
    blocks = ctypes.c_int()
    fn = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor
    rc = fn(ctypes.byref(blocks), ctypes.c_void_p(function_ptr), ctypes.c_int(block), ctypes.c_size_t(smem))
    if rc != CUDA_SUCCESS:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: {_error_name(lib, rc)}")
    return blocks.value
