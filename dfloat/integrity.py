"""Whether a unit can be trusted before a decoder touches it: its structure, its code and its checksums.

A decoder writes where the output positions and window offsets tell it to, so every unit is checked once, before
its first decode (or while its file is read), and marked (`dfloat.format.mark_trusted`); later decodes cost one
lookup. Format 1.1 checksums: the CRC-32 of every stored array exactly as stored, and the CRC-32 of the unit's
metadata (members' names, shapes, offsets and CRCs, parameters, the array CRCs) as canonical JSON; members carry
the CRC-32 of their original bytes, compared after a format 1.0 unit's first decode. (Files also record the CRC-32
of their whole units JSON and of every plain tensor: `dfloat.storage` checks those while reading.)
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from dfloat.code_tables import code_of
from dfloat.errors import ChecksumError, CorruptStreamError, ShapeMismatchError
from dfloat.format import (
    CODE_CANONICAL,
    CODE_DF11_LUT,
    GAP_BITS,
    HUFFMAN_ARRAYS,
    MODE_HUFFMAN,
    MODE_RAW,
    CompressedTensor,
    mark_trusted,
    unit_label,
)

# ---- CRC-32 of bytes ---------------------------------------------------------------------------------------------


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


# ---- structure ---------------------------------------------------------------------------------------------------


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
    arrays = {**HUFFMAN_ARRAYS, "code": torch.uint8}
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


def check_code(ct: CompressedTensor, where: str | None = None) -> None:
    """The code of a coded unit (256 lengths or the official tables) must be a prefix code."""
    if not ct.is_coded:
        return
    try:
        code_of(ct)
    except CorruptStreamError as e:
        raise CorruptStreamError(f"{where or unit_label(ct)}: {e}") from None


def check_members(ct: CompressedTensor, flat: torch.Tensor) -> None:
    """Raise ChecksumError naming the first member whose decoded bytes (in ``flat``, the unit's decoded
    concatenation) differ from the original's."""
    for m in ct.members:
        if m.crc32 < 0:  # no checksum stored (official DFloat11 units)
            continue
        got = crc32_of(flat[m.offset : m.offset + m.numel])
        if got != m.crc32:
            raise ChecksumError(
                f"{unit_label(ct)}: member {m.name!r} (elements {m.offset}..{m.offset + m.numel}): checksum {got:08x} "
                f"!= stored {m.crc32:08x}; the compressed data is corrupt"
            )


# ---- checksums of a unit (format 1.1) ----------------------------------------------------------------------------


def meta_crc(meta: Mapping) -> int:
    """CRC-32 of a unit's metadata (without its own ``meta_crc32``) as canonical JSON."""
    core = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def array_crc(t: torch.Tensor) -> int:
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy()) & 0xFFFFFFFF if t.numel() else 0


def array_crcs(tensors: Mapping[str, torch.Tensor], workers: int | None = None) -> dict[str, int]:
    """CRC-32 of each tensor's stored bytes, in parallel threads (zlib releases the GIL on large buffers)."""
    big = [k for k, t in tensors.items() if t.numel() * t.element_size() >= 1 << 20]
    out = {k: array_crc(t) for k, t in tensors.items() if k not in big}
    if len(big) > 1 and (workers or os.cpu_count() or 1) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers or min(len(big), os.cpu_count() or 1)) as pool:
            out.update(zip(big, pool.map(lambda k: array_crc(tensors[k]), big)))
    else:
        out.update({k: array_crc(tensors[k]) for k in big})
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
