"""CUDA decoder: ``kernels/cuda/decode.cu`` compiled at run time with NVRTC through CuPy, launched on torch's stream.

No PTX or binaries ship with dfloat: the source is compiled for the device's architecture on first use, once per
process and device (``_MODULES``), and CuPy keeps the result on disk (``CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``), so later processes skip NVRTC. Tensors are passed to the kernel by ``data_ptr()``.

One launch decodes a whole unit (all its members) into the caller's buffer on
``torch.cuda.current_stream()``; nothing here synchronizes unless ``check=True`` (or ``DFLOAT_CHECK=1``), which
waits for the kernel and raises `CorruptStreamError` if it flagged the stream. The design is in docs/kernels.md.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from dfloat.code_tables import decode_tables
from dfloat.errors import BackendUnavailableError
from dfloat.kernels import cuda_launch
from dfloat.kernels.gpu_common import build_failure, launch_arrays, new_status, raise_if_flagged, wants_check

SOURCE = "cuda/decode.cu"
NVRTC_OPTIONS = ("-std=c++17",)  # CuPy adds -arch for the current device
SMEM_DEFAULT = 48 * 1024  # dynamic shared memory a kernel may use without opting in
MAX_TABLES_IN_SMEM = 8  # deeper tables (codes > 8 bits, rare) beyond these are read from global memory
SCAN_WORDS = 40  # DF_SCAN_WORDS in decode.cu
MIN_STAGE = 256
# (bytes_per_window, windows_per_block) -> the kernel specialised for it; anything else runs dfloat_decode_any
SPECIALISED = {(32, 256): "dfloat_decode_w32_t256", (8, 512): "dfloat_decode_w8_t512"}
GENERIC = "dfloat_decode_any"
# blocks per SM the specialised kernels' __launch_bounds__ allow (45 and 39 registers on sm_90: 62.5% and 75%
# occupancy) if their shared memory lets them
BLOCKS_PER_SM = {"dfloat_decode_w32_t256": 5, "dfloat_decode_w8_t512": 3}
SMEM_RESERVED_PER_BLOCK = 1024  # what the driver keeps per resident block (sm_80 and later)
SMEM_GRANULE = (
    128  # a block's shared memory (its own + the reserve) is allocated in units of this (sm_80, sm_90)
)
STATUS_BAD_POSITIONS, STATUS_BAD_CODE, STATUS_BAD_COUNT, STATUS_BAD_GAP = 1, 2, 4, 8
LUT_BITS = 12  # DF_LUT_BITS in decode.cu
LUT_BYTES = (4 + 2) << LUT_BITS  # lut_sym (uint32) + lut_info (uint16) in shared memory

_MODULES: dict[tuple, object] = {}
_FUNCTIONS: dict[tuple, object] = {}
_POINTERS: dict[tuple, int] = {}  # the same keys: each kernel's CUfunction handle, for cuLaunchKernel
_SCRATCH: dict[int, torch.Tensor] = {}
_LOCK = threading.Lock()


# ---- host-side tables and launch plan (pure Python; the CPU emulation test uses these too) -------------------


def multi_symbol_tables(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each 8-bit pattern, the whole codes it holds (see the header of decode.cu).

    Returns ``(msym, minfo)``, uint32[256] each: msym packs up to 4 symbols (first in the lowest byte); minfo is
    ``n1 | len1 << 4 | n2 << 8 | len2 << 12`` with n1 <= 8 whole codes of total length len1, and n2 = min(n1, 4)
    of total length len2.
    """
    root = np.asarray(tables, dtype=np.int64)[0]
    msym = np.zeros(256, np.uint32)
    minfo = np.zeros(256, np.uint32)
    for p in range(256):
        used = n = syms = n2 = len2 = 0
        while used < 8:
            e = int(root[(p << used) & 0xFF])
            if e <= 0 or (e >> 8) > 8 - used:
                break
            if n < 4:
                syms |= (e & 0xFF) << (8 * n)
            used += e >> 8
            n += 1
            if n <= 4:
                n2, len2 = n, used
        msym[p] = syms
        minfo[p] = n | (used << 4) | (n2 << 8) | (len2 << 12)
    return msym, minfo


def lut_tables(tables: np.ndarray, bits: int = LUT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """For each ``bits``-bit pattern, the whole codes it holds: the CUDA kernel's one-lookup multi-code tables.

    Returns ``(lut_sym uint32[2**bits], lut_info uint16[2**bits])`` (see the header of decode.cu): lut_sym packs
    the first up to 4 symbols (first in the lowest byte); lut_info is ``nc | lc << 4 | nd << 8 | ld << 12`` with
    nc whole codes of total length lc, and nd = min(nc, 4) of total length ld. Vectorised over all patterns, one
    step per code.
    """
    t = np.asarray(tables, dtype=np.int64).reshape(-1, 256)
    n_tab = t.shape[0]
    flat = t.reshape(-1)
    size = 1 << bits
    mask = size - 1
    pattern = np.arange(size, dtype=np.int64)
    used = np.zeros(size, np.int64)
    n = np.zeros(size, np.int64)
    syms = np.zeros(size, np.int64)
    nd = np.zeros(size, np.int64)
    ld = np.zeros(size, np.int64)
    live = np.ones(size, bool)
    for _ in range(bits):
        x = (
            ((pattern << used) & mask) << (32 - bits)
        ) & 0xFFFFFFFF  # the unknown bits after the pattern are 0
        e = t[0][x >> 24]
        for d in range(1, 4):  # a code of up to 12 bits needs at most two levels; the walk is df_lookup's
            nxt = -e
            deeper = (e < 0) & (nxt > 0) & (nxt < n_tab)
            e = np.where(deeper, flat[np.where(deeper, nxt, 0) * 256 + ((x >> (24 - 8 * d)) & 0xFF)], e)
        length = e >> 8
        live &= (e > 0) & (length <= bits - used)
        syms = np.where(live & (n < 4), syms | ((e & 0xFF) << (8 * np.minimum(n, 3))), syms)
        used = np.where(live, used + length, used)
        n = np.where(live, n + 1, n)
        nd = np.where(live & (n <= 4), n, nd)
        ld = np.where(live & (n <= 4), used, ld)
    info = n | (used << 4) | (nd << 8) | (ld << 12)  # ld on top: the kernel takes it with one shift
    return syms.astype(np.uint32), info.astype(np.uint16)


def cuda_tables(ct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tables int32 (k, 256), lut_sym, lut_info) for a unit: what the CUDA kernel reads; built once, cached."""
    got = ct._cache.get("cuda_host_tables")
    if got is None:
        tables = host_tables(ct)[0]
        got = (tables, *lut_tables(tables))
        ct._cache["cuda_host_tables"] = got
    return got


def host_tables(ct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tables int32 (k, 256), msym, minfo) for a unit, built once and cached on it."""
    got = ct._cache.get("gpu_host_tables")
    if got is None:
        tables = np.ascontiguousarray(decode_tables(ct), dtype=np.int32)
        got = (tables, *multi_symbol_tables(tables))
        ct._cache["gpu_host_tables"] = got
    return got


@dataclass(frozen=True)
class LaunchPlan:
    kernel: str
    grid: int
    block: int
    smem: int  # dynamic shared memory bytes
    windows_per_thread: int
    n_tables_smem: int
    stage_cap: int


def slot_words(bytes_per_thread: int) -> int:
    return ((bytes_per_thread + 7) >> 2) | 1


def resident_blocks(smem: int, smem_per_sm: int) -> int:
    """Blocks with ``smem`` bytes of dynamic shared memory that fit on one SM, as the hardware counts: each takes
    its bytes plus the per-block reserve, rounded up to the allocation granule."""
    per_block = -(-(smem + SMEM_RESERVED_PER_BLOCK) // SMEM_GRANULE) * SMEM_GRANULE
    return smem_per_sm // per_block


def plan(
    bytes_per_window: int,
    windows_per_block: int,
    n_blocks: int,
    n_tables: int,
    smem_limit: int = SMEM_DEFAULT,
    smem_optin: int = SMEM_DEFAULT,
    smem_per_sm: int | None = None,
) -> LaunchPlan:
    """Kernel, launch shape and shared-memory layout for a unit's parameters.

    The staging area takes whatever is left of ``smem_limit`` (48 KiB by default), and no more than lets as many
    blocks share an SM as the kernel's registers allow (``BLOCKS_PER_SM``, given the device's ``smem_per_sm``):
    shared memory must not be what caps occupancy. If the fixed parts do not leave ``MIN_STAGE`` bytes that way,
    fewer blocks per SM it is; if not even ``smem_limit`` does, up to ``smem_optin`` (the device's opt-in
    maximum) is used.
    """
    wpt = -(-windows_per_block // 1024)
    n_slots = -(-windows_per_block // wpt)
    kernel = SPECIALISED.get((bytes_per_window, windows_per_block)) if wpt == 1 else None
    block = windows_per_block if kernel else -(-n_slots // 32) * 32
    kernel = kernel or GENERIC
    nts = min(n_tables, MAX_TABLES_IN_SMEM)
    words = n_slots * slot_words(bytes_per_window * wpt)
    fixed = nts * 1024 + LUT_BYTES + SCAN_WORDS * 4 + ((words + 3) & ~3) * 4
    limit = smem_limit
    if smem_per_sm and kernel in BLOCKS_PER_SM:
        # the hardware rounds a block's bytes + reserve up to the granule, so the limit is the block's share
        # rounded down to the granule, less the reserve (whole granules); unrounded, w32_t256's 45,664 B + 1 KiB
        # became 46,720 B and only 4 blocks fitted an H100's 228 KiB, not 5
        share = smem_per_sm // BLOCKS_PER_SM[kernel] // SMEM_GRANULE * SMEM_GRANULE
        limit = min(limit, share - SMEM_RESERVED_PER_BLOCK)
        if limit - fixed - 16 < MIN_STAGE:
            limit = smem_limit
    if limit - fixed - 16 < MIN_STAGE:
        limit = max(smem_optin, limit)
    stage = (limit - fixed - 16) // 16 * 16
    if stage < MIN_STAGE:
        raise BackendUnavailableError(
            f"the CUDA decoder cannot hold {windows_per_block} windows of {bytes_per_window} bytes in shared memory "
            f"({fixed} bytes needed before staging, {limit} available); use backend='triton'"
        )
    return LaunchPlan(kernel, n_blocks, block, fixed + stage + 16, wpt, nts, stage)


# ---- compiling and launching -----------------------------------------------------------------------------------


def source() -> str:
    return resources.files("dfloat.kernels").joinpath(SOURCE).read_text()


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailableError(
            f"the cuda backend needs CuPy: pip install 'dfloat[cuda13]' (CUDA 13) or 'dfloat[cuda12]' ({e})"
        ) from None
    return cupy


def kernel_pointer(kernel) -> int | None:
    """The CUfunction handle behind a CuPy kernel, for ``cuLaunchKernel``; None if it has none.

    ``RawModule.get_function`` returns a ``RawKernel``, whose handle is ``.kernel.ptr`` (``.kernel`` is the
    ``cupy.cuda.function.Function`` for the current device); a bare ``Function`` has ``.ptr`` itself.
    """
    function = getattr(kernel, "kernel", kernel)
    ptr = getattr(function, "ptr", None)
    return int(ptr) if ptr else None


def _function(device_index: int, name: str, options: tuple[str, ...] = NVRTC_OPTIONS):
    """The compiled kernel ``name`` for a device: NVRTC once per process and device (CuPy caches it on disk).

    A compiler error in decode.cu is raised as CuPy's ``CompileException``; any other failure to build (NVRTC
    or the CUDA toolkit missing or unusable) is a `BackendUnavailableError`, on which ``backend='auto'`` moves on
    to Triton.
    """
    key = (device_index, options, name)
    fn = _FUNCTIONS.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    with _LOCK, cupy.cuda.Device(device_index):
        mkey = (device_index, options)
        mod = _MODULES.get(mkey)
        try:
            if mod is None:
                extra = ("-lineinfo",) if os.environ.get("DFLOAT_CUDA_LINEINFO") == "1" else ()
                mod = cupy.RawModule(code=source(), options=options + extra)
            fn = mod.get_function(name)  # NVRTC runs here, on first use
            ptr = kernel_pointer(fn)  # under this device: a RawKernel's handle is per device
        except Exception as e:
            raise build_failure(
                e,
                "the CUDA decoder",
                "if it cannot find CUDA, set CUDA_PATH to the CUDA toolkit, or use backend='triton'",
            ) from e
        _MODULES[mkey] = mod
        _FUNCTIONS[key] = fn
        if ptr is not None:
            _POINTERS[key] = ptr
    return fn


def _function_pointer(device_index: int, name: str, options: tuple[str, ...] = NVRTC_OPTIONS) -> int | None:
    """The CUfunction handle of `_function`'s kernel (None where CuPy gave none: CuPy's own launch is used)."""
    _function(device_index, name, options)
    return _POINTERS.get((device_index, options, name))


def _device_tables(ct, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = ("gpu_tables", str(device))
    got = ct._cache.get(key)
    if got is None:
        got = tuple(torch.from_numpy(a.view(np.int32).reshape(-1)).to(device) for a in host_tables(ct))
        ct._cache[key] = got
    return got


def _cuda_device_tables(ct, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernel's tables (cuda_tables) on ``device``, as int32 arrays (16-byte aligned allocations)."""
    key = ("cuda_tables", str(device))
    got = ct._cache.get(key)
    if got is None:
        got = tuple(torch.from_numpy(a.view(np.int32).reshape(-1)).to(device) for a in cuda_tables(ct))
        ct._cache[key] = got
    return got


def _scratch_status(device: torch.device) -> torch.Tensor:
    """A status word nobody reads (decodes that do not check still need somewhere to report)."""
    t = _SCRATCH.get(device.index)
    if t is None:
        t = torch.zeros(2, dtype=torch.int32, device=device)
        _SCRATCH[device.index] = t
    return t


def _plan_for(ct, n_tables: int, device: torch.device) -> LaunchPlan:
    key = ("cuda_plan", str(device))
    p = ct._cache.get(key)
    if p is None:
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", SMEM_DEFAULT)
        per_sm = getattr(props, "shared_memory_per_multiprocessor", None)
        p = plan(
            ct.bytes_per_window,
            ct.windows_per_block,
            ct.n_blocks,
            n_tables,
            smem_optin=optin,
            smem_per_sm=per_sm,
        )
        ct._cache[key] = p
    return p


_STREAMS: dict[tuple[int, int], object] = {}


def _stream(cupy, ptr: int, device_index: int):
    """A CuPy view of torch's stream (cached: kernels launch on it, CuPy never owns it)."""
    s = _STREAMS.get((ptr, device_index))
    if s is None:
        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream in favour of Stream.from_external
            warnings.simplefilter("ignore", DeprecationWarning)
            s = cupy.cuda.ExternalStream(ptr, device_index)
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        _STREAMS[(ptr, device_index)] = s
    return s


def launch_args(ct, p: LaunchPlan, enc, sm, gaps, positions, tables, lut_sym, lut_info, out, status) -> tuple:
    """The kernels' parameters (DF_PARAMS in decode.cu), in order, as sized numpy scalars; tensors by data_ptr()."""
    vec = out.data_ptr() % 16 == 0 and sm.data_ptr() % 8 == 0
    return (
        np.uint64(enc.data_ptr()),
        np.int64(enc.numel()),
        np.uint64(sm.data_ptr()),
        np.uint64(gaps.data_ptr()),
        np.int64(gaps.numel()),
        np.uint64(positions.data_ptr()),
        np.int32(ct.n_blocks),
        np.uint64(tables.data_ptr()),
        np.int32(tables.numel() // 256),
        np.int32(p.n_tables_smem),
        np.uint64(lut_sym.data_ptr()),
        np.uint64(lut_info.data_ptr()),
        np.uint64(out.data_ptr()),
        np.int64(ct.numel),
        np.int32(ct.bytes_per_window),
        np.int32(ct.windows_per_block),
        np.int32(p.windows_per_thread),
        np.int32(p.stage_cap),
        np.int32(1 if vec else 0),
        np.uint64(status.data_ptr()),
    )


def explain(flags: int) -> str:
    why = []
    if flags & STATUS_BAD_POSITIONS:
        why.append("its output positions are out of order or out of range")
    if flags & STATUS_BAD_CODE:
        why.append("it holds a bit pattern that is no code")
    if flags & STATUS_BAD_COUNT:
        why.append("its codes disagree with the output positions")
    if flags & STATUS_BAD_GAP:
        why.append("window start offsets disagree with the codes")
    return "; ".join(why) or f"status {flags:#x}"


class UnitLaunch:
    """One unit's decode on one device, ready to go: its flat arrays, tables, kernel, plan and packed arguments.

    Built on the unit's first decode on a device and kept in its ``_cache``; later decodes only swap the output
    pointer (and the wide-store flag that depends on its alignment) and launch.
    """

    OUT, VEC, STATUS = 12, 18, 19  # indices of out, vec_out and status in DF_PARAMS

    def __init__(self, ct, arrays: tuple, device: torch.device) -> None:
        sources = (ct.encoded_exponent, ct.sign_mantissa, ct.gaps, ct.output_positions)
        # Weak references: a cached launch must not keep a unit's GPU arrays alive (cpu_offload copies a unit in
        # for each decode). The pointers stay valid while the sources live, which same_arrays() checks; copies
        # made here (sources that were not contiguous) are held.
        self.sources = tuple(weakref.ref(t) for t in sources)
        self.copies = tuple(a for a, t in zip(arrays, sources) if a.data_ptr() != t.data_ptr())
        tables, lut_sym, lut_info = _cuda_device_tables(ct, device)
        self.plan = _plan_for(ct, tables.numel() // 256, device)
        self.function = _function(device.index, self.plan.kernel)
        if self.plan.smem > SMEM_DEFAULT:
            self.function.max_dynamic_shared_size_bytes = self.plan.smem
        self.tables = (tables, lut_sym, lut_info)
        self.scratch = _scratch_status(device)
        enc, sm = arrays[0], arrays[1]
        self.sm_aligned = sm.data_ptr() % 8 == 0
        self.args = list(
            launch_args(ct, self.plan, *arrays, *self.tables, enc, self.scratch)
        )  # out: set per call
        self.out_ptr = -1
        self.lock = threading.Lock()
        lib = cuda_launch.driver()
        ptr = _function_pointer(device.index, self.plan.kernel)
        self.packed = None
        if lib is not None and ptr is not None:
            self.packed = cuda_launch.PackedLaunch(
                lib, ptr, device.index, self.plan.grid, self.plan.block, self.plan.smem, tuple(self.args)
            )

    def same_arrays(self, ct) -> bool:
        s = self.sources
        return (
            ct.encoded_exponent is s[0]()
            and ct.sign_mantissa is s[1]()
            and ct.gaps is s[2]()
            and ct.output_positions is s[3]()
        )

    def launch(self, out_ptr: int, stream: int, status: torch.Tensor | None = None) -> None:
        with self.lock:  # the packed arguments are shared: one thread at a time sets the output and launches
            if out_ptr != self.out_ptr:
                vec = np.int32(1 if out_ptr % 16 == 0 and self.sm_aligned else 0)
                self.args[self.OUT], self.args[self.VEC] = np.uint64(out_ptr), vec
                if self.packed is not None:
                    self.packed.set(self.OUT, out_ptr)
                    self.packed.set(self.VEC, int(vec))
                self.out_ptr = out_ptr
            if status is not None or self.packed is None:
                self._launch_cupy(stream, status)
            else:
                self.packed.launch(stream)  # the driver copies the arguments before it returns

    def _launch_cupy(self, stream: int, status: torch.Tensor | None) -> None:
        """CuPy's own launch: where the driver library is not at hand, and for checked decodes."""
        cupy = _cupy()
        args = list(self.args)
        if status is not None:
            args[self.STATUS] = np.uint64(status.data_ptr())
        device_index = self.scratch.device.index
        with cupy.cuda.Device(device_index), _stream(cupy, stream, device_index):
            self.function((self.plan.grid,), (self.plan.block,), tuple(args), shared_mem=self.plan.smem)


_LAUNCHES = "cuda_launch"  # ct._cache key: {device index: UnitLaunch}


def _raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # the same handle without building a Stream object
    _raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


def decode(ct, out: torch.Tensor, check: bool = False) -> None:
    """Decode coded unit ``ct`` into ``out`` (flat, contiguous BF16, ``ct.numel`` elements, on ct's CUDA device).

    Asynchronous on ``torch.cuda.current_stream()``. With ``check=True`` (or the environment variable
    ``DFLOAT_CHECK=1``) it waits for the kernel and raises `CorruptStreamError` naming the unit and the first bad
    block if the kernel flagged the stream.

    Repeated decodes of a unit take a short path (a few microseconds of host time): the unit's prepared launch,
    a check of ``out``, one driver call on torch's current stream.
    """
    idx = out.get_device()
    launches = ct._cache.get(_LAUNCHES)
    ul = launches.get(idx) if launches is not None else None
    if (
        ul is not None
        and not check
        and out.dtype is torch.bfloat16
        and out.numel() >= ct.numel
        and out.is_contiguous()
        and ul.same_arrays(ct)
        and torch.cuda.current_device() == idx
        and not wants_check(False)
    ):
        ul.launch(out.data_ptr(), _raw_stream(idx))
        return
    _decode_first(ct, out, check)


def _decode_first(ct, out: torch.Tensor, check: bool) -> None:
    """The full path: argument checks, building (or refreshing) the unit's launch, checked decodes."""
    device = out.device
    if device.type != "cuda":
        raise BackendUnavailableError(f"the cuda backend decodes into CUDA tensors only, not {device}")
    prepared = launch_arrays(ct, out)
    if prepared is None:
        return
    check = wants_check(check)
    with torch.cuda.device(device):
        launches = ct._cache.setdefault(_LAUNCHES, {})
        ul = launches.get(device.index)
        if ul is None or not ul.same_arrays(ct):
            ul = launches[device.index] = UnitLaunch(ct, prepared, device)
        status = new_status(device) if check else None
        ul.launch(out.data_ptr(), _raw_stream(device.index), status)
        if check:
            raise_if_flagged(ct, status, explain, "cuda")
