"""The compression unit as the format defines it (the spec is docs/FORMAT.md): version, constants, stored dtypes,
`Member` and `CompressedTensor`.

A unit is one code shared by one or more BF16 tensors ("members") flattened and concatenated in order. Coded units
follow the official DFloat11 stream semantics with the window size and windows per block as parameters; units that
are not worth coding are kept raw with their dtype. Checking a unit is `dfloat.integrity`'s job; reading and
writing files is `dfloat.storage`'s.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from dfloat.errors import CorruptStreamError, ShapeMismatchError

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
HUFFMAN_ARRAYS = {
    "encoded_exponent": torch.uint8,
    "sign_mantissa": torch.uint8,
    "gaps": torch.uint8,
    "output_positions": torch.int64,
}
STORED_ARRAYS = (*HUFFMAN_ARRAYS, "code_lengths", "luts", "raw")


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
        out = {k: getattr(self, k) for k in HUFFMAN_ARRAYS}
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
        names = (*HUFFMAN_ARRAYS, "code", "raw")
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

    def __repr__(self) -> str:
        names = ", ".join(m.name for m in self.members[:3]) + (", ..." if len(self.members) > 3 else "")
        return (
            f"CompressedTensor(mode={self.mode}, members=[{names}], numel={self.numel}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f}, device={self.device})"
        )

    # ---- metadata ------------------------------------------------------------------------------------------
    def metadata(self, with_meta_crc: bool = True) -> dict:
        """The unit's entry in a file header (docs/FORMAT.md); without ``meta_crc32``, what that checksum covers."""
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


def unit_label(ct: CompressedTensor) -> str:
    """How errors name an in-memory unit: by its first member."""
    return f"unit {ct.members[0].name!r}" if ct.members else "unit"


# ---- the checked mark ------------------------------------------------------------------------------------------
# `dfloat.integrity` checks a unit once, before its first decode, and marks it. The mark belongs to the object (not
# to the shared ``_cache``), so a copy made with `dataclasses.replace` is checked again on its first decode. It is
# kept with the type because the type's faithful copies (`to`, `pin_memory`) carry it over.

_TRUSTED: weakref.WeakSet = weakref.WeakSet()  # unit objects already checked (by identity)


def is_trusted(ct: CompressedTensor) -> bool:
    return ct in _TRUSTED


def mark_trusted(ct: CompressedTensor) -> CompressedTensor:
    _TRUSTED.add(ct)
    return ct
