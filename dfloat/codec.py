"""compress_tensor / decompress_tensor: the tensor-level public API over the encoder and the decoder backends."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dfloat import huffman
from dfloat.errors import DFloatError, ShapeMismatchError, UnsupportedDtypeError
from dfloat.format import (
    CODE_CANONICAL,
    DEFAULT_BYTES_PER_WINDOW,
    DEFAULT_MAX_CODE_LENGTH,
    DEFAULT_WINDOWS_PER_BLOCK,
    MODE_HUFFMAN,
    MODE_RAW,
    CompressedTensor,
    Member,
    is_trusted,
    mark_trusted,
)
from dfloat.integrity import check_members, check_unit, crc32_of, seal

log = logging.getLogger(__name__)

DEFAULT_MIN_NUMEL = 4096  # below this the code, offsets and positions cost more than they save


def _as_words(t: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bfloat16:
        raise UnsupportedDtypeError(
            f"tensor {name!r}: dtype is {t.dtype}, but dfloat codes BF16 only; casting {t.dtype} to BF16 would change the "
            "values, so it is not lossless (store such tensors raw with dfloat.store_raw)"
        )
    return t.detach().cpu().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)


def _members(tensors: Mapping[str, torch.Tensor]) -> tuple[Member, ...]:
    out, offset = [], 0
    for name, t in tensors.items():
        out.append(Member(name, tuple(t.shape), offset, crc32_of(t)))
        offset += t.numel()
    return tuple(out)


def store_raw(tensors: Mapping[str, torch.Tensor] | torch.Tensor, name: str = "tensor") -> CompressedTensor:
    """A raw unit (any dtype, kept as is) for tensors that are not BF16 or not worth coding."""
    if isinstance(tensors, torch.Tensor):
        tensors = {name: tensors}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise ShapeMismatchError(f"a raw unit holds one dtype, got {sorted(map(str, dtypes))}")
    flat = (
        torch.cat([t.detach().cpu().contiguous().reshape(-1) for t in tensors.values()])
        if tensors
        else torch.empty(0, dtype=torch.bfloat16)
    )
    return seal(
        CompressedTensor(
            mode=MODE_RAW, members=_members(tensors), numel=flat.numel(), dtype=flat.dtype, raw=flat
        )
    )


def compress_tensors(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    bytes_per_window: int = DEFAULT_BYTES_PER_WINDOW,
    windows_per_block: int = DEFAULT_WINDOWS_PER_BLOCK,
    max_code_length: int = DEFAULT_MAX_CODE_LENGTH,
    allow_raw: bool = True,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> CompressedTensor:
    """Code several BF16 tensors as one unit with one shared Huffman code.

    Args:
        tensors: ``{name: tensor}`` (or a sequence, named "0", "1", ...); flattened and concatenated in order.
        bytes_per_window: encoded bytes per decoder thread window (>= 4; larger costs fewer offset bits).
        windows_per_block: windows per block; each block stores the index of its first output.
        max_code_length: longest code allowed (<= 32); the code is optimal under this limit.
        allow_raw: store the unit raw when it is tiny (< ``min_numel`` weights) or coding would not shrink it.
    Returns:
        A CompressedTensor (``mode`` "huffman", or "raw" when ``allow_raw`` chose raw).
    Raises:
        UnsupportedDtypeError: a tensor is not BF16.
    Example:
        >>> ct = dfloat.compress_tensors({"q": q_weight, "k": k_weight})
        >>> views = ct.split(dfloat.decompress_tensor(ct))
    """
    if not isinstance(tensors, Mapping):
        tensors = {str(i): t for i, t in enumerate(tensors)}
    words = [_as_words(t, name) for name, t in tensors.items()]
    if bytes_per_window < 4 or bytes_per_window * 8 < max_code_length or windows_per_block < 1:
        raise DFloatError(
            f"bad parameters: bytes_per_window={bytes_per_window} (>= 4 and >= max_code_length/8), "
            f"windows_per_block={windows_per_block} (>= 1)"
        )
    members = _members(tensors)
    numel = sum(w.size for w in words)
    if allow_raw and numel < min_numel:
        return store_raw(tensors)
    flat = words[0] if len(words) == 1 else (np.concatenate(words) if words else np.empty(0, np.uint16))
    unit = encode_words(flat, members, bytes_per_window, windows_per_block, max_code_length)
    if allow_raw and unit.nbytes >= 2 * numel:
        log.debug(
            "unit %s would not shrink (%d >= %d bytes): stored raw",
            members[0].name if members else "",
            unit.nbytes,
            2 * numel,
        )
        return store_raw(tensors)
    return seal(unit)


def compress_tensor(t: torch.Tensor, **options) -> CompressedTensor:
    """Compress one BF16 tensor losslessly (a one-member unit); options as in `compress_tensors`.

    Example:
        >>> ct = dfloat.compress_tensor(w)
        >>> torch.equal(dfloat.decompress_tensor(ct).view(torch.int16), w.view(torch.int16))
        True
    """
    name = options.pop("name", "tensor")
    return compress_tensors({name: t}, **options)


def encode_words(
    words: np.ndarray,
    members: tuple[Member, ...],
    bytes_per_window: int,
    windows_per_block: int,
    max_code_length: int,
) -> CompressedTensor:
    from dfloat import encoder
    from dfloat._numba import get_num_threads

    n = words.size
    n_chunks = max(1, min(4 * get_num_threads(), n // (1 << 16)))
    hist = encoder.chunk_histograms(words, n_chunks) if n else np.zeros((1, 256), np.int64)
    lengths = huffman.code_lengths(hist.sum(axis=0), max_code_length)
    len64 = lengths.astype(np.int64)
    bits = hist @ len64
    starts = np.concatenate([[0], np.cumsum(bits)[:-1]]).astype(np.int64)
    n_bytes = -(-int(bits.sum()) // 8)
    n_windows = -(-n_bytes // bytes_per_window)
    n_blocks = -(-n_windows // windows_per_block)
    out = np.zeros(n_bytes, np.uint8)
    sm = np.empty(n, np.uint8)
    first_symbol = np.full(n_blocks * windows_per_block, n, np.int64)
    gap = np.zeros(n_blocks * windows_per_block, np.uint8)
    if n:
        codes = huffman.canonical_codes(lengths).astype(np.int64)
        encoder.pack(words, codes, len64, starts, out, sm, 8 * bytes_per_window, first_symbol, gap)
    positions = np.empty(n_blocks + 1, np.int64)
    positions[:-1] = first_symbol[::windows_per_block][:n_blocks]
    positions[-1] = n
    return CompressedTensor(
        mode=MODE_HUFFMAN,
        members=members,
        numel=n,
        encoded_exponent=torch.from_numpy(out),
        sign_mantissa=torch.from_numpy(sm),
        gaps=torch.from_numpy(encoder.pack_gaps(gap)),
        output_positions=torch.from_numpy(positions),
        code=torch.from_numpy(lengths),
        code_kind=CODE_CANONICAL,
        bytes_per_window=bytes_per_window,
        windows_per_block=windows_per_block,
        max_code_length=max_code_length,
    )


def canonical_device(device: torch.device | str) -> torch.device:
    """ "cuda" -> "cuda:<current>", so devices compare equal to the ones tensors report."""
    if isinstance(device, torch.device) and (device.index is not None or device.type != "cuda"):
        return device  # already canonical: the common case, on every decode
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def decompress_tensor(
    c: CompressedTensor,
    device: torch.device | str | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
    check: bool = False,
) -> torch.Tensor:
    """Decode a unit to BF16, bit-exact.

    Args:
        c: the unit.
        device: where to decode (default: where the unit's arrays are). Arrays are moved there first.
        backend: "cpu", "triton" or "cuda"; None picks the fastest one available for the device.
        out: a caller's buffer (the unit's dtype, at least ``c.numel`` elements, on ``device``) to decode into.
        check: on a GPU, wait for the kernel and raise CorruptStreamError on a corrupt stream (off by default so
            decoding never synchronizes; the CPU decoder always checks).
    Returns:
        The member's tensor for a one-member unit, else the flat concatenation (see `CompressedTensor.split`).
    Raises:
        BackendUnavailableError: the named backend cannot run here (the message says what to install).
        ChecksumError: the unit's arrays or metadata do not match its checksums (checked on the first decode of
            each object; units from `compress_tensor` or a verified file are checked already).
        CorruptStreamError / ShapeMismatchError: the unit's structure is inconsistent, or the stream is corrupt.
    """
    from dfloat.kernels import registry

    # The first decode of an object checks its structure and checksums; later ones cost one weak-set lookup.
    check_output = False if is_trusted(c) else check_unit(c)
    unit = c
    device = canonical_device(device) if device is not None else c.device
    if c.device != device:
        c = c.to(device)
    if out is None:
        out = torch.empty(c.numel, dtype=c.dtype, device=device)
    elif out.dtype != c.dtype or out.device != device or out.numel() < c.numel or not out.is_contiguous():
        raise ShapeMismatchError(
            f"out must be a contiguous {c.dtype} tensor of >= {c.numel} elements on {device}, "
            f"got {out.dtype}[{out.numel()}] on {out.device}"
        )
    # views cost microseconds each: make none when out is already the flat buffer of exactly numel
    flat = out if out.dim() == 1 and out.numel() == c.numel else out.reshape(-1)[: c.numel]
    if c.is_coded:
        registry.decode_into(c, flat, backend, check=check or check_output)
    else:
        flat.copy_(c.raw)
    if check_output:  # a format 1.0 unit: its member CRCs over the first output
        check_members(c, flat)
        mark_trusted(unit)
        mark_trusted(c)
    if len(c.members) != 1 or flat.shape == c.shape:
        return flat
    return flat.view(c.shape)
