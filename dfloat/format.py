"""The in-memory compression unit and its safetensors form (the spec is docs/FORMAT.md).

A unit is one code shared by one or more BF16 tensors ("members") flattened and concatenated in order. Coded units
follow the official DFloat11 stream semantics with the window size and windows per block as parameters; units that
are not worth coding are kept raw with their dtype.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dfloat.errors import (
    ChecksumError,
    CorruptStreamError,
    DFloatError,
    FormatVersionError,
    OutputWriteError,
    ShapeMismatchError,
)

FORMAT_NAME = "dfloat"
FORMAT_VERSION = "1.1"  # major.minor: a reader accepts any minor of its major; a newer major is refused
INTEGRITY_MINOR = 1  # from 1.1 on, files carry checksums of every stored array and of the unit metadata

MODE_HUFFMAN = "huffman"
MODE_RAW = "raw"
CODE_CANONICAL = "canonical"  # 256 code lengths (ours)
CODE_DF11_LUT = "df11-lut"  # the official release's lookup tables (non-canonical code)

DEFAULT_BYTES_PER_WINDOW = 32
DEFAULT_WINDOWS_PER_BLOCK = 256
DEFAULT_MAX_CODE_LENGTH = 24
GAP_BITS = 5

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Arrays of a coded unit, in file order, with their stored dtype.
_HUFFMAN_ARRAYS = {
    "encoded_exponent": torch.uint8,
    "sign_mantissa": torch.uint8,
    "gaps": torch.uint8,
    "output_positions": torch.int64,
}
_STORED_ARRAYS = (*_HUFFMAN_ARRAYS, "code_lengths", "luts", "raw")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ShapeMismatchError(f"dtype {dtype} cannot be stored") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CorruptStreamError(f"unknown stored dtype {name!r}") from None


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, m) for m in mat]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B) (zlib's crc32_combine), so halves can be summed in parallel."""
    if len2 <= 0:
        return crc1
    op = [0xEDB88320] + [1 << i for i in range(31)]  # the operator that appends one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # ... one zero byte
    while len2:  # append len2 zero bytes to crc1, by binary powers of the one-byte operator
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        op = _gf2_square(op)
        len2 >>= 1
    return (crc1 ^ crc2) & 0xFFFFFFFF


_PARALLEL_CRC_BYTES = 8 << 20


def crc32_of(t: torch.Tensor) -> int:
    """Checksum of a tensor's bytes in memory order (little-endian), what `verify` compares against.

    Large tensors are checksummed in two halves on two threads (zlib releases the GIL) and combined."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return 0
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    if data.size < _PARALLEL_CRC_BYTES or (os.cpu_count() or 1) < 2:
        return zlib.crc32(data) & 0xFFFFFFFF
    from concurrent.futures import ThreadPoolExecutor

    half = data.size // 2
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(zlib.crc32, (data[:half], data[half:]))
    return crc32_combine(a, b, data.size - half)


@dataclass(frozen=True)
class Member:
    """One original tensor inside a unit: where its elements start in the concatenation, and its checksum."""

    name: str
    shape: tuple[int, ...]
    offset: int
    crc32: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """One compression unit. Construct with `dfloat.compress_tensor` / `compress_tensors`, not by hand.

    Huffman units hold the exponent stream, one raw sign|mantissa byte per weight, one 5-bit start offset per
    window (packed MSB-first), the first output index of each block of windows (plus the total), and the code
    (256 canonical code lengths, or the official LUT rows). Raw units hold the flat tensor in its own dtype.
    """

    mode: str
    members: tuple[Member, ...]
    numel: int
    dtype: torch.dtype = torch.bfloat16
    encoded_exponent: torch.Tensor | None = None
    sign_mantissa: torch.Tensor | None = None
    gaps: torch.Tensor | None = None
    output_positions: torch.Tensor | None = None
    code: torch.Tensor | None = None
    code_kind: str = CODE_CANONICAL
    bytes_per_window: int = DEFAULT_BYTES_PER_WINDOW
    windows_per_block: int = DEFAULT_WINDOWS_PER_BLOCK
    max_code_length: int = DEFAULT_MAX_CODE_LENGTH
    raw: torch.Tensor | None = None
    array_crc32: Mapping[str, int] | None = None  # CRC-32 of each stored array as stored (format 1.1)
    meta_crc32: int = -1  # CRC-32 of the unit's metadata (format 1.1); -1: none
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def is_coded(self) -> bool:
        return self.mode == MODE_HUFFMAN

    @property
    def n_blocks(self) -> int:
        return 0 if self.output_positions is None else self.output_positions.numel() - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The member's shape for a one-member unit; the flat length otherwise."""
        return self.members[0].shape if len(self.members) == 1 else (self.numel,)

    @property
    def device(self) -> torch.device:
        t = self.raw if self.raw is not None else self.sign_mantissa
        return t.device if t is not None else torch.device("cpu")

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        if not self.is_coded:
            return {"raw": self.raw}
        out = {k: getattr(self, k) for k in _HUFFMAN_ARRAYS}
        out["code_lengths" if self.code_kind == CODE_CANONICAL else "luts"] = self.code
        return out

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, offsets, positions, the code itself, raw parts."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def original_nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    # ---- behaviour -----------------------------------------------------------------------------------------
    def _map_arrays(self, fn) -> CompressedTensor:
        names = (*_HUFFMAN_ARRAYS, "code", "raw")
        moved = {k: fn(getattr(self, k)) for k in names if getattr(self, k) is not None}
        # Decode tables are cached under device-qualified keys, so copies on other devices share them. A faithful
        # copy of a checked unit is checked too (the verdict is per object: `dataclasses.replace` starts afresh).
        copy = replace(self, **moved, _cache=self._cache)
        if is_trusted(self):
            mark_trusted(copy)
        return copy

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedTensor:
        """A copy whose arrays live on ``device`` (sharing the decode-table cache)."""
        return self._map_arrays(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CompressedTensor:
        """A copy in page-locked host memory, for asynchronous copies to a GPU."""
        return self._map_arrays(lambda t: t.pin_memory())

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of each member inside a decoded flat buffer."""
        if flat.numel() < self.numel:
            raise ShapeMismatchError(
                f"buffer of {flat.numel()} elements is smaller than the unit ({self.numel})"
            )
        return {m.name: flat[m.offset : m.offset + m.numel].view(m.shape) for m in self.members}

    def verify(self, flat: torch.Tensor) -> None:
        """Raise ChecksumError naming the first member whose decoded bytes differ from the original's."""
        for m in self.members:
            if m.crc32 < 0:  # no checksum stored (official DFloat11 units)
                continue
            got = crc32_of(flat[m.offset : m.offset + m.numel])
            if got != m.crc32:
                raise ChecksumError(
                    f"{unit_label(self)}: member {m.name!r} (elements {m.offset}..{m.offset + m.numel}): checksum {got:08x} "
                    f"!= stored {m.crc32:08x}; the compressed data is corrupt"
                )

    def __repr__(self) -> str:
        names = ", ".join(m.name for m in self.members[:3]) + (", ..." if len(self.members) > 3 else "")
        return (
            f"CompressedTensor(mode={self.mode}, members=[{names}], numel={self.numel}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f}, device={self.device})"
        )

    # ---- metadata ------------------------------------------------------------------------------------------
    def metadata(self, with_meta_crc: bool = True) -> dict:
        meta = {
            "mode": self.mode,
            "numel": self.numel,
            "dtype": dtype_name(self.dtype),
            "members": [
                {"name": m.name, "shape": list(m.shape), "offset": m.offset, "crc32": m.crc32}
                for m in self.members
            ],
        }
        if self.is_coded:
            meta.update(
                code_kind=self.code_kind,
                bytes_per_window=self.bytes_per_window,
                windows_per_block=self.windows_per_block,
                max_code_length=self.max_code_length,
            )
        if self.array_crc32 is not None:
            meta["array_crc32"] = dict(self.array_crc32)
            if with_meta_crc:
                meta["meta_crc32"] = self.meta_crc32
        return meta

    @classmethod
    def from_parts(
        cls, meta: Mapping, arrays: Mapping[str, torch.Tensor], where: str = "unit"
    ) -> CompressedTensor:
        """Rebuild a unit from its metadata and stored arrays, checking everything a decoder relies on."""
        try:
            members = tuple(
                Member(str(m["name"]), tuple(int(s) for s in m["shape"]), int(m["offset"]), int(m["crc32"]))
                for m in meta["members"]
            )
            numel = int(meta["numel"])
            mode = meta["mode"]
            dtype = dtype_from_name(meta["dtype"])
            crcs = meta.get("array_crc32")
            if crcs is not None:
                crcs = {str(k): int(v) for k, v in crcs.items()}
            sums = {"array_crc32": crcs, "meta_crc32": int(meta.get("meta_crc32", -1))}
            if mode == MODE_HUFFMAN:
                kind = meta.get("code_kind", CODE_CANONICAL)
                params = {
                    "code_kind": kind,
                    "bytes_per_window": int(meta["bytes_per_window"]),
                    "windows_per_block": int(meta["windows_per_block"]),
                    "max_code_length": int(meta["max_code_length"]),
                }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptStreamError(f"{where}: metadata is incomplete or malformed ({e!r})") from None
        if mode == MODE_RAW:
            raw = _need(arrays, "raw", where)
            ct = cls(mode=MODE_RAW, members=members, numel=numel, dtype=dtype, raw=raw.reshape(-1), **sums)
        elif mode == MODE_HUFFMAN:
            parts = {k: _need(arrays, k, where) for k in _HUFFMAN_ARRAYS}
            code = _need(arrays, "code_lengths" if kind == CODE_CANONICAL else "luts", where)
            ct = cls(
                mode=MODE_HUFFMAN,
                members=members,
                numel=numel,
                dtype=torch.bfloat16,
                code=code,
                **params,
                **sums,
                **{k: v.reshape(-1) for k, v in parts.items()},
            )
        else:
            raise CorruptStreamError(f"{where}: unknown unit mode {mode!r}")
        check_structure(ct, where)
        if (
            ct.is_coded
        ):  # the code itself (256 lengths or the official tables): a prefix code, or an error here
            from dfloat.codec import code_of

            try:
                code_of(ct)
            except CorruptStreamError as e:
                raise CorruptStreamError(f"{where}: {e}") from None
        return ct


def _need(arrays: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in arrays:
        raise CorruptStreamError(f"{where}: stored array {key!r} is missing")
    return arrays[key]


def unit_label(ct: CompressedTensor) -> str:
    """How errors name an in-memory unit: by its first member."""
    return f"unit {ct.members[0].name!r}" if ct.members else "unit"


def check_structure(ct: CompressedTensor, where: str | None = None) -> None:
    """Reject any unit whose sizes, dtypes or offsets a decoder could not trust, before a decoder touches memory.

    Runs on load and on the first decode of every object (costs O(blocks)); afterwards no decoder can write
    outside ``out[:numel]`` whatever the stream holds."""
    where = where or unit_label(ct)
    if not isinstance(ct.numel, int | np.integer) or ct.numel < 0:
        raise ShapeMismatchError(f"{where}: numel must be a non-negative int, got {ct.numel!r}")
    end = 0
    for m in ct.members:
        if m.offset != end or any(s < 0 for s in m.shape):
            raise ShapeMismatchError(f"{where}: member {m.name!r} has offset {m.offset}, expected {end}")
        end += m.numel
    if end != ct.numel:
        raise ShapeMismatchError(f"{where}: members hold {end} elements but the unit says {ct.numel}")
    if ct.mode == MODE_RAW:
        raw = ct.raw
        if (
            not isinstance(raw, torch.Tensor)
            or raw.dtype != ct.dtype
            or raw.numel() != ct.numel
            or raw.dim() != 1
            or not raw.is_contiguous()
        ):
            got = f"{raw.dtype}{list(raw.shape)}" if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ShapeMismatchError(
                f"{where}: raw data is {got}, expected contiguous {ct.dtype}[{ct.numel}]"
            )
        return
    if ct.mode != MODE_HUFFMAN:
        raise CorruptStreamError(f"{where}: unknown unit mode {ct.mode!r}")
    if ct.dtype != torch.bfloat16:
        raise CorruptStreamError(f"{where}: a coded unit decodes to BF16, not {ct.dtype}")
    arrays = {**_HUFFMAN_ARRAYS, "code": torch.uint8}
    device = None
    for k, dt in arrays.items():
        t = getattr(ct, k)
        if not isinstance(t, torch.Tensor):
            raise CorruptStreamError(f"{where}: {k} is missing (got {type(t).__name__})")
        if t.dtype != dt:
            raise CorruptStreamError(f"{where}: {k} has dtype {t.dtype}, expected {dt}")
        if (t.dim() != 1 and k != "code") or not t.is_contiguous():
            raise CorruptStreamError(
                f"{where}: {k} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}"
            )
        if device is not None and t.device != device:
            raise CorruptStreamError(f"{where}: {k} is on {t.device}, the other arrays on {device}")
        device = t.device
    if ct.code_kind not in (CODE_CANONICAL, CODE_DF11_LUT):
        raise CorruptStreamError(f"{where}: unknown code kind {ct.code_kind!r}")
    if ct.code_kind == CODE_CANONICAL and ct.code.numel() != 256:
        raise CorruptStreamError(f"{where}: code_lengths holds {ct.code.numel()} values, expected 256")
    if ct.code_kind == CODE_DF11_LUT and (
        ct.code.dim() != 2 or ct.code.shape[0] < 2 or ct.code.shape[1] != 256
    ):
        raise CorruptStreamError(
            f"{where}: official LUTs must have shape (k+1, 256), got {tuple(ct.code.shape)}"
        )
    if (
        ct.bytes_per_window < 4
        or ct.windows_per_block < 1
        or not 1 <= ct.max_code_length <= 32
        or 8 * ct.bytes_per_window < ct.max_code_length
    ):
        raise CorruptStreamError(
            f"{where}: bad parameters window={ct.bytes_per_window} "
            f"block={ct.windows_per_block} max_code_length={ct.max_code_length}"
        )
    if ct.sign_mantissa.numel() != ct.numel:
        raise CorruptStreamError(
            f"{where}: {ct.sign_mantissa.numel()} sign/mantissa bytes for {ct.numel} weights"
        )
    n_windows = -(-ct.encoded_exponent.numel() // ct.bytes_per_window)
    n_blocks = -(-n_windows // ct.windows_per_block)
    if ct.output_positions.numel() != n_blocks + 1:
        raise CorruptStreamError(
            f"{where}: {ct.output_positions.numel()} output positions for {n_blocks} blocks "
            f"(stream of {ct.encoded_exponent.numel()} bytes): truncated or mismatched"
        )
    if ct.gaps.numel() * 8 < n_windows * GAP_BITS:
        raise CorruptStreamError(
            f"{where}: {ct.gaps.numel()} gap bytes cannot hold {n_windows} window offsets"
        )
    pos = ct.output_positions.cpu()
    if pos.numel() and (int(pos[0]) != 0 or int(pos[-1]) != ct.numel or bool((pos[1:] < pos[:-1]).any())):
        raise CorruptStreamError(
            f"{where}: output positions are not a non-decreasing run from 0 to {ct.numel}"
        )


# ---- integrity (format 1.1) -----------------------------------------------------------------------------------
# A unit's checksums: the CRC-32 of every stored array exactly as stored, and the CRC-32 of its metadata (members'
# names, shapes, offsets and CRCs, parameters, the array CRCs) as canonical JSON. Files also record the CRC-32 of
# the whole units JSON and of every plain tensor, so a dropped or renamed unit or tensor is caught too.
# Whether an object has been checked is an attribute of that object (not of the shared ``_cache``), so a copy
# made with `dataclasses.replace` is checked again on its first decode.

_TRUSTED: weakref.WeakSet = weakref.WeakSet()  # unit objects already checked (by identity)


def is_trusted(ct: CompressedTensor) -> bool:
    return ct in _TRUSTED


def mark_trusted(ct: CompressedTensor) -> CompressedTensor:
    _TRUSTED.add(ct)
    return ct


def meta_crc(meta: Mapping) -> int:
    """CRC-32 of a unit's metadata (without its own ``meta_crc32``) as canonical JSON."""
    core = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def _array_crc(t: torch.Tensor) -> int:
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy()) & 0xFFFFFFFF if t.numel() else 0


def array_crcs(tensors: Mapping[str, torch.Tensor], workers: int | None = None) -> dict[str, int]:
    """CRC-32 of each tensor's stored bytes, in parallel threads (zlib releases the GIL on large buffers)."""
    big = [k for k, t in tensors.items() if t.numel() * t.element_size() >= 1 << 20]
    out = {k: _array_crc(t) for k, t in tensors.items() if k not in big}
    if len(big) > 1 and (workers or os.cpu_count() or 1) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers or min(len(big), os.cpu_count() or 1)) as pool:
            out.update(zip(big, pool.map(lambda k: _array_crc(tensors[k]), big)))
    else:
        out.update({k: _array_crc(tensors[k]) for k in big})
    return out


def seal(ct: CompressedTensor) -> CompressedTensor:
    """A copy of a freshly built unit carrying its checksums (format 1.1), marked as checked."""
    sealed = replace(ct, array_crc32=array_crcs(ct.stored_tensors()), meta_crc32=-1, _cache=ct._cache)
    sealed = replace(sealed, meta_crc32=meta_crc(sealed.metadata(with_meta_crc=False)), _cache=ct._cache)
    return mark_trusted(sealed)


def check_checksums(
    ct: CompressedTensor,
    where: str | None = None,
    crcs: Mapping[str, int] | None = None,
    file_meta: Mapping | None = None,
) -> bool:
    """Compare a unit's stored arrays and metadata with its checksums; True when it had checksums to compare.

    ``crcs`` are array CRCs already computed (while reading a file); otherwise they are computed here.
    ``file_meta`` is the unit's metadata as read (keys of newer minor versions included)."""
    if ct.array_crc32 is None:
        return False
    where = where or unit_label(ct)
    stored = ct.stored_tensors()
    expected = dict(ct.array_crc32)
    if set(expected) != set(stored):
        raise ChecksumError(
            f"{where}: checksums are stored for arrays {sorted(expected)}, the unit holds {sorted(stored)}"
        )
    got_meta = meta_crc(file_meta if file_meta is not None else ct.metadata(with_meta_crc=False))
    if got_meta != ct.meta_crc32:
        raise ChecksumError(
            f"{where}: metadata (member names, shapes, offsets, parameters) checksum {got_meta:08x} != stored "
            f"{ct.meta_crc32 & 0xFFFFFFFF:08x}; the unit's metadata is damaged"
        )
    got = dict(crcs) if crcs is not None else array_crcs(stored)
    for k in stored:
        if got.get(k) != expected[k]:
            raise ChecksumError(
                f"{where}: array {k!r} checksum {got.get(k, 0):08x} != stored {expected[k]:08x}; "
                "the compressed data is damaged"
            )
    return True


def check_unit(ct: CompressedTensor, where: str | None = None) -> bool:
    """Structure and checksums of an unchecked unit before its first decode.

    Returns True when the decoded output must still be compared with the member CRCs (a format 1.0 unit with
    member CRCs but no array checksums); otherwise the unit is marked checked."""
    check_structure(ct, where)
    if check_checksums(ct, where) or not any(m.crc32 >= 0 for m in ct.members):
        mark_trusted(ct)  # checked, or an official unit that carries nothing to check against
        return False
    return True


# ---- files ---------------------------------------------------------------------------------------------------


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (temp files start private)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def parse_json(text: str | bytes, where: str, error: type[DFloatError] = CorruptStreamError):
    """JSON from a file or header, or ``error`` naming ``where``: malformed, too deeply nested or not UTF-8 text
    is one clear error, never a traceback from the decoder."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to be read; the file is damaged") from None


def write_failure(path: str | os.PathLike, e: Exception) -> OutputWriteError:
    """A failed write (disk full, permissions) as one error naming the file; safetensors reports OS errors as
    ``SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")``."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
    return OutputWriteError(f"{path}: cannot be written: {reason}")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so a reader never sees half a file.

    Raises:
        OutputWriteError: the file could not be written (disk full, no permission); no temporary file is left.
    """
    from safetensors import SafetensorError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after writing: a writer may have replaced the (private) temp file
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputWriteError):
            raise
        raise write_failure(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unit_tensors(name: str, ct: CompressedTensor) -> dict[str, torch.Tensor]:
    """The safetensors entries of one unit: ``{name}.{array}``."""
    return {f"{name}.{k}": t.detach().cpu().contiguous() for k, t in ct.stored_tensors().items()}


def format_metadata(
    units: Mapping[str, CompressedTensor],
    extra: Mapping[str, str] | None = None,
    plain_crc32: Mapping[str, int] | None = None,
) -> dict[str, str]:
    units_json = json.dumps({n: ct.metadata() for n, ct in units.items()}, separators=(",", ":"))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "units": units_json,
        "units_crc32": str(zlib.crc32(units_json.encode()) & 0xFFFFFFFF),
        "tensors_crc32": json.dumps(dict(plain_crc32 or {}), separators=(",", ":")),
    }
    meta.update(extra or {})
    return meta


def save_compressed_tensors(
    units: Mapping[str, CompressedTensor] | CompressedTensor,
    path: str | os.PathLike,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write units (and optional plain tensors) to one safetensors file, atomically.

    Args:
        units: ``{unit_name: CompressedTensor}``, or one CompressedTensor (stored as unit "tensor").
        path: the ``.safetensors`` file to write.
        extra_tensors: uncompressed tensors stored under their own names beside the units.
        metadata: extra string metadata for the file header.
    """
    from safetensors.torch import save_file

    if isinstance(units, CompressedTensor):
        units = {"tensor": units}
    units = {n: ct if ct.array_crc32 is not None else seal(ct) for n, ct in units.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, ct in units.items():
        tensors.update(unit_tensors(name, ct))
    for name, t in (extra_tensors or {}).items():
        if name in tensors:
            raise ShapeMismatchError(f"tensor name {name!r} collides with a unit array")
        tensors[name] = t.detach().cpu().contiguous()
    plain_crc32 = array_crcs({n: tensors[n] for n in extra_tensors or {}})
    file_meta = format_metadata(units, metadata, plain_crc32)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=file_meta))


def check_version(meta: Mapping[str, str] | None, where: str) -> dict:
    if not meta or meta.get("format") != FORMAT_NAME:
        raise FormatVersionError(f"{where}: not a dfloat file (no 'format: dfloat' in its header)")
    version = str(meta.get("format_version", ""))
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise FormatVersionError(
            f"{where}: written with dfloat format {version}, this dfloat reads "
            f"{FORMAT_VERSION.split('.')[0]}.x; upgrade dfloat to read it"
        )
    if "units" not in meta:
        raise CorruptStreamError(f"{where}: unit metadata is unreadable (no 'units' entry in the header)")
    return parse_json(meta["units"], f"{where}: unit metadata")


def _file_checks(meta: Mapping[str, str], where: str) -> tuple[bool, dict[str, int] | None]:
    """(whether the file must carry checksums, the plain tensors' CRCs); checks the units JSON's own CRC."""
    try:
        minor = int(str(meta.get("format_version", "1.0")).split(".")[1])
    except (IndexError, ValueError):
        minor = 0
    required = minor >= INTEGRITY_MINOR
    if "units_crc32" not in meta:
        if required:
            raise ChecksumError(
                f"{where}: format {meta.get('format_version')} file without 'units_crc32'; damaged"
            )
        return False, None
    try:
        want = int(meta["units_crc32"])
        listed = parse_json(meta.get("tensors_crc32", "{}"), f"{where}: tensors_crc32", ChecksumError)
        plain = {str(k): int(v) for k, v in listed.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ChecksumError(
            f"{where}: unreadable checksums in the header ({e}); the file is damaged"
        ) from None
    got = zlib.crc32(meta["units"].encode()) & 0xFFFFFFFF
    if got != want:
        raise ChecksumError(
            f"{where}: the unit list (names, members, parameters) has checksum {got:08x} != stored {want:08x}; "
            "the file header is damaged"
        )
    return True, plain


def load_compressed_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """Read a file written by `save_compressed_tensors`.

    Args:
        verify: check every stored array and the unit metadata against their checksums while reading (format
            1.1; CRC-32 on parallel threads). Units of older files are checked on their first decode instead.
            ``False`` skips both, for files verified once.
    Returns:
        ``(units, extra_tensors)``.
    Raises:
        FormatVersionError: not a dfloat file, or a newer incompatible format version.
        ChecksumError: ``verify`` and a stored array, the metadata or a plain tensor does not match its checksum.
        CorruptStreamError / ShapeMismatchError: arrays missing or inconsistent with the metadata.
    """
    from safetensors import SafetensorError, safe_open

    where = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    read_on = "cpu" if verify else str(device)
    try:
        with safe_open(str(path), framework="pt", device=read_on) as f:
            header = f.metadata()
            units_meta = check_version(header, where)
            has_sums, plain_crcs = _file_checks(header, where) if verify else (False, None)
            crcs: dict[str, int] = {}
            if has_sums:  # checksum each array on a worker thread while the next one is read
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
                    arrays, futures = {}, {}
                    for k in f.keys():
                        arrays[k] = f.get_tensor(k)
                        futures[k] = pool.submit(_array_crc, arrays[k])
                    crcs = {k: fut.result() for k, fut in futures.items()}
            else:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CorruptStreamError(f"{where}: not a readable safetensors file ({e})") from None
    if not isinstance(units_meta, dict):
        raise CorruptStreamError(f"{where}: unit metadata is not a JSON object")
    units = {}
    for name, meta in units_meta.items():
        keys = {k: f"{name}.{k}" for k in _STORED_ARRAYS if f"{name}.{k}" in arrays}
        parts = {k: arrays.pop(key) for k, key in keys.items()}
        unit_where = f"{where}: unit {name!r}"
        if has_sums and isinstance(meta, dict) and isinstance(meta.get("array_crc32"), dict):
            for k, key in keys.items():  # damaged bytes are named as such, before any structural complaint
                want = meta["array_crc32"].get(k)
                if want != crcs[key]:
                    shown = f"{want:08x}" if isinstance(want, int) else repr(want)
                    raise ChecksumError(
                        f"{unit_where}: array {k!r} checksum {crcs[key]:08x} != stored {shown}; "
                        "the compressed data is damaged"
                    )
        ct = CompressedTensor.from_parts(meta, parts, where=unit_where)
        if not verify:
            mark_trusted(ct)
        elif has_sums:
            if ct.array_crc32 is None:
                raise ChecksumError(f"{unit_where}: no checksums stored in a file that has them; damaged")
            check_checksums(ct, unit_where, {k: crcs[key] for k, key in keys.items()}, file_meta=meta)
            mark_trusted(ct)
        units[name] = ct
    if has_sums:
        if set(plain_crcs) != set(arrays):
            extra = sorted(set(arrays) - set(plain_crcs))[:3]
            lost = sorted(set(plain_crcs) - set(arrays))[:3]
            raise ChecksumError(
                f"{where}: the tensors in the file do not match the ones it lists "
                f"(unlisted: {extra}, missing: {lost}); the file is damaged"
            )
        for k, want in plain_crcs.items():
            if crcs[k] != want:
                raise ChecksumError(
                    f"{where}: tensor {k!r} checksum {crcs[k]:08x} != stored {want:08x}; the file is damaged"
                )
    if read_on != str(device) and torch.device(device).type != "cpu":
        units = {n: ct.to(device) for n, ct in units.items()}
        arrays = {k: t.to(device) for k, t in arrays.items()}
    return units, arrays
