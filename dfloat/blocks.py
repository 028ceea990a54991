"""Decoding part of a unit: only the blocks of windows that hold the elements wanted.

Block ``b`` of a coded unit holds elements ``[output_positions[b], output_positions[b+1])``, so the blocks that
hold any element range are found by a binary search, and they can be decoded without the rest of the stream.
Two routes give the same bits:

- the CPU decoder decodes a block range in place (`dfloat.kernels.cpu.decode_range`);
- any decoder can decode `block_range(ct, b0, b1)`: a sub-unit made of those blocks (slices of the stream, the
  sign/mantissa bytes and the window offsets, plus rebased output positions) that is itself a valid unit.

The runtime uses this to look up embedding rows and to multiply by a big matrix a row chunk at a time
(`dfloat.runtime.chunked`) with a decode buffer much smaller than the matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from dfloat.errors import ShapeMismatchError
from dfloat.format import GAP_BITS, MODE_HUFFMAN, CompressedTensor, Member

# A code is at most 32 bits, so a code that starts in a block's last window ends at most 4 bytes past the block.
_LOOKAHEAD_BYTES = 4


def host_positions(ct: CompressedTensor) -> np.ndarray:
    """The unit's output positions as a host array (cached: a GPU unit copies them once)."""
    pos = ct._cache.get("host_positions")
    if pos is None:
        pos = ct._cache["host_positions"] = ct.output_positions.detach().cpu().numpy().astype(np.int64)
    return pos


def blocks_covering(ct: CompressedTensor, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """For element ranges ``[start, stop)`` (ints or arrays, non-empty ranges), the block ranges ``[b0, b1)`` that
    hold them."""
    pos = host_positions(ct)
    start = np.asarray(start, np.int64)
    stop = np.asarray(stop, np.int64)
    if np.any(start < 0) or np.any(stop > ct.numel) or np.any(stop <= start):
        raise ShapeMismatchError(f"element range outside unit of {ct.numel} elements (or empty)")
    b0 = np.searchsorted(pos, start, side="right") - 1
    b1 = np.searchsorted(pos, stop - 1, side="right")
    return b0, b1


class _SubUnitCache(dict):
    """A sub-unit's cache: decode tables (keys naming a "table") depend on the code alone and are read from and
    written to the parent unit's cache; everything else (launch plans depend on the block count) stays its own."""

    def __init__(self, parent: dict):
        super().__init__()
        self._parent = parent

    @staticmethod
    def _shared(key) -> bool:
        first = key[0] if isinstance(key, tuple) and key else key
        return isinstance(first, str) and "table" in first

    def get(self, key, default=None):
        return self._parent.get(key, default) if self._shared(key) else super().get(key, default)

    def __getitem__(self, key):
        return self._parent[key] if self._shared(key) else super().__getitem__(key)

    def __setitem__(self, key, value):
        if self._shared(key):
            self._parent[key] = value
        else:
            super().__setitem__(key, value)

    def __contains__(self, key):
        return key in self._parent if self._shared(key) else super().__contains__(key)


def _slice_gaps(gaps: torch.Tensor, first_window: int, n_windows: int) -> torch.Tensor:
    """The packed 5-bit window offsets of windows ``[first_window, first_window + n_windows)``, packed from bit 0.
    A plain slice when the first offset starts on a byte; else shifted by a few bits (vectorized, any device)."""
    bit = GAP_BITS * first_window
    n_bytes = -(-GAP_BITS * n_windows // 8)
    byte, shift = divmod(bit, 8)
    if shift == 0:
        return gaps[byte : byte + n_bytes]
    src = gaps[byte : byte + n_bytes + 1].to(torch.int32)
    if src.numel() < n_bytes + 1:
        src = torch.cat([src, src.new_zeros(n_bytes + 1 - src.numel())])
    return (((src[:-1] << shift) | (src[1:] >> (8 - shift))) & 0xFF).to(torch.uint8)


def block_range(ct: CompressedTensor, first_block: int, last_block: int) -> CompressedTensor:
    """A valid coded unit holding blocks ``[first_block, last_block)`` of ``ct``: its element 0 is element
    ``output_positions[first_block]`` of ``ct``. The stream, sign/mantissa and (mostly) window offsets are views of
    ``ct``'s arrays, not copies; it shares ``ct``'s decode tables.

    Unless the range reaches the end of the stream, the sub-stream keeps the 4 bytes after the range (the rest of
    a code that starts in the range's last window); they make one more, empty block.
    """
    if not ct.is_coded:
        raise ShapeMismatchError("block_range needs a coded unit")
    if not 0 <= first_block < last_block <= ct.n_blocks:
        raise ShapeMismatchError(
            f"blocks [{first_block}, {last_block}) outside the unit's {ct.n_blocks} blocks"
        )
    pos = host_positions(ct)
    wpb, bpw = ct.windows_per_block, ct.bytes_per_window
    n_enc = ct.encoded_exponent.numel()
    first_byte = first_block * wpb * bpw
    end_byte = last_block * wpb * bpw
    n_blocks = last_block - first_block
    sub_pos = pos[first_block : last_block + 1] - pos[first_block]
    if end_byte < n_enc:  # not the end of the stream: keep the lookahead bytes, as one more (empty) block
        end_byte = min(n_enc, end_byte + _LOOKAHEAD_BYTES)
        sub_pos = np.append(sub_pos, sub_pos[-1])
        n_blocks += 1
    else:
        end_byte = n_enc
    n_windows = -(-(end_byte - first_byte) // bpw)
    numel = int(sub_pos[-1])
    label = ct.members[0].name if ct.members else "unit"
    return CompressedTensor(
        mode=MODE_HUFFMAN,
        members=(Member(f"{label}[blocks {first_block}:{last_block}]", (numel,), 0, -1),),
        numel=numel,
        encoded_exponent=ct.encoded_exponent[first_byte:end_byte],
        sign_mantissa=ct.sign_mantissa[pos[first_block] : pos[last_block]],
        gaps=_slice_gaps(ct.gaps, first_block * wpb, n_windows),
        output_positions=torch.from_numpy(sub_pos).to(ct.output_positions.device, non_blocking=True),
        code=ct.code,
        code_kind=ct.code_kind,
        bytes_per_window=bpw,
        windows_per_block=wpb,
        max_code_length=ct.max_code_length,
        _cache=_SubUnitCache(ct._cache),
    )


def decompress_blocks(
    ct: CompressedTensor, first_block: int, last_block: int, out: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Decode blocks ``[first_block, last_block)`` of ``ct`` into the front of ``out`` (flat, contiguous BF16, on
    ``ct``'s device) and return that part of ``out``: elements ``output_positions[first_block]`` to
    ``output_positions[last_block]`` of the unit. The CPU decodes the range in place; other backends decode the
    sub-unit `block_range` gives."""
    pos = host_positions(ct)
    n = int(pos[last_block] - pos[first_block])
    if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < n or out.device != ct.device:
        raise ShapeMismatchError(
            f"out must be a contiguous bfloat16 tensor of >= {n} elements on {ct.device}, "
            f"got {out.dtype}[{out.numel()}] on {out.device}"
        )
    flat = out.reshape(-1)[:n]
    if n == 0:
        return flat
    if flat.device.type == "cpu" and backend in (None, "auto", "cpu"):
        from dfloat.kernels import cpu

        cpu.decode_range(ct, first_block, last_block, flat)
    else:
        from dfloat.kernels import registry

        registry.decode_into(block_range(ct, first_block, last_block), flat, backend)
    return flat
