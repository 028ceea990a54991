"""Units in the official DFloat11 layout (../shared/reference/df11-official-layout.md), read into our own form.

The official stream semantics equal ours with 8-byte windows and 512 windows per block; only the code is stored
differently (lookup tables for a non-canonical code instead of 256 canonical lengths). Reading turns those tables
back into (code, length) pairs, which then feed the same decode tables as our own units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dfloat.errors import CorruptStreamError, DFloatError
from dfloat.format import CODE_DF11_LUT, MODE_HUFFMAN, CompressedTensor, Member, check_structure

OFFICIAL_BYTES_PER_THREAD = 8
OFFICIAL_THREADS_PER_BLOCK = 512
FIRST_POINTER = 240  # table entries >= 240 point at table 256 - entry; exponents >= 240 cannot be symbols
UNKNOWN_CRC = -1  # official checkpoints store no checksums

OFFICIAL_ARRAYS = ("encoded_exponent", "sign_mantissa", "luts", "gaps", "output_positions", "split_positions")


def luts_from_code(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The official LUT rows for a prefix code: one 256-entry table per distinct 0/8/16/24-bit prefix (sorted by
    prefix length), pointers as 256 - table, unhit entries filled forward, and a last row of code lengths."""
    codes = np.asarray(codes, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths).tolist()
    if any(s >= FIRST_POINTER for s in used):
        raise DFloatError(
            "exponents >= 240 cannot be written in the official layout (they collide with pointers)"
        )
    if lengths.max(initial=0) > 32:
        raise DFloatError("the official layout holds codes of at most 32 bits")
    prefixes = {(0, 0)}
    for s in used:
        for p in range(8, int(lengths[s]), 8):
            prefixes.add((p, int(codes[s]) >> (int(lengths[s]) - p)))
    order = sorted(prefixes)
    if len(order) > 256 - FIRST_POINTER:
        raise DFloatError(f"the code needs {len(order)} tables; the official layout holds at most 16")
    index = {pf: i for i, pf in enumerate(order)}
    tables = np.full((len(order), 256), -1, dtype=np.int64)
    for p, v in order[1:]:
        tables[index[(p - 8, v >> 8)], v & 0xFF] = 256 - index[(p, v)]
    for s in used:
        length, code = int(lengths[s]), int(codes[s])
        p = 8 * ((length - 1) // 8)
        rest = length - p
        lo = (code & ((1 << rest) - 1)) << (8 - rest)
        tables[index[(p, code >> rest)], lo : lo + (1 << (8 - rest))] = s
    for t in tables:  # fill forward, as the official writer does
        last = 0
        for j in range(256):
            if t[j] < 0:
                t[j] = last
            last = t[j]
    return np.concatenate([tables, lengths[None, :]]).astype(np.uint8)


def codes_from_luts(luts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recover (codes, lengths) from official LUT rows: a symbol's code is where its block first starts."""
    luts = np.asarray(luts, dtype=np.int64)
    if luts.ndim != 2 or luts.shape[1] != 256 or luts.shape[0] < 2:
        raise CorruptStreamError(f"official LUTs must have shape (k+1, 256), got {tuple(luts.shape)}")
    tables, lengths = luts[:-1], luts[-1]
    if (lengths > 32).any():
        raise CorruptStreamError("official LUTs give a code longer than 32 bits")
    prefix = {0: (0, 0)}
    for t in range(tables.shape[0]):  # parents come before children (tables are sorted by prefix length)
        if t not in prefix:
            continue
        p, v = prefix[t]
        for j in range(256):
            x = int(tables[t, j])
            child = 256 - x
            if x >= FIRST_POINTER and child not in prefix and child < tables.shape[0]:
                prefix[child] = (p + 8, (v << 8) | j)
    codes = np.zeros(256, dtype=np.uint32)
    found = np.zeros(256, dtype=bool)
    for t, (p, v) in sorted(prefix.items()):
        for s in np.unique(tables[t]).tolist():
            length = int(lengths[s]) if s < FIRST_POINTER else 0
            rest = length - p
            if found[s] or not 1 <= rest <= 8:
                continue
            hits = np.flatnonzero(tables[t] == s)
            j, width = int(hits[0]), 1 << (8 - rest)
            if j % width == 0 and (tables[t, j : j + width] == s).all():
                codes[s] = (v << rest) | (j >> (8 - rest))
                found[s] = True
    missing = [s for s in np.flatnonzero(lengths).tolist() if not found[s]]
    if missing:
        raise CorruptStreamError(f"official LUTs hold no code for exponents {missing[:8]}")
    return codes, lengths.astype(np.uint8)


def to_official_unit(ct: CompressedTensor) -> dict[str, torch.Tensor]:
    """Re-encode a unit in the official layout (8-byte windows, 512 per block, LUTs). For tests and interop.

    Unlike the official writer it appends no end-of-stream code: readers stop at the stored number of weights.
    """
    from dfloat.codec import decompress_tensor, encode_words

    words = decompress_tensor(ct, device="cpu").reshape(-1).view(torch.int16).numpy().view(np.uint16)
    coded = encode_words(words, ct.members, OFFICIAL_BYTES_PER_THREAD, OFFICIAL_THREADS_PER_BLOCK, 32)
    from dfloat.codec import code_of

    luts = luts_from_code(*code_of(coded))
    pos = coded.output_positions.numpy().astype(np.uint32)
    return {
        "encoded_exponent": coded.encoded_exponent,
        "sign_mantissa": coded.sign_mantissa,
        "luts": torch.from_numpy(luts),
        "gaps": coded.gaps,
        "output_positions": torch.from_numpy(pos.view(np.uint8).copy()),
        "split_positions": torch.tensor([m.offset for m in ct.members[1:]], dtype=torch.int64),
    }


def from_official_unit(
    arrays: Mapping[str, torch.Tensor],
    members: Sequence[tuple[str, tuple[int, ...]]],
    bytes_per_thread: int = OFFICIAL_BYTES_PER_THREAD,
    threads_per_block: int = OFFICIAL_THREADS_PER_BLOCK,
    where: str = "official unit",
) -> CompressedTensor:
    """A CompressedTensor over an official unit's arrays; ``members`` are the module weights' names and shapes in
    the unit's order (the official files do not store them)."""
    missing = [k for k in OFFICIAL_ARRAYS[:5] if k not in arrays]
    if missing:
        raise CorruptStreamError(f"{where}: missing {', '.join(missing)}")
    pos_bytes = arrays["output_positions"].detach().cpu().contiguous().view(torch.uint8).numpy()
    if pos_bytes.size % 4:
        raise CorruptStreamError(f"{where}: output_positions is not a whole number of uint32 values")
    positions = torch.from_numpy(pos_bytes.view(np.uint32).astype(np.int64))
    numel = int(arrays["sign_mantissa"].numel())
    offsets, out, total = [], [], 0
    for name, shape in members:
        shape = tuple(int(s) for s in shape)
        out.append(Member(name, shape, total, UNKNOWN_CRC))
        offsets.append(total)
        total += int(np.prod(shape, dtype=np.int64))
    if total != numel:
        raise CorruptStreamError(f"{where}: the module's weights hold {total} elements, the unit {numel}")
    if "split_positions" in arrays:
        split = arrays["split_positions"].detach().cpu().reshape(-1).tolist()
        if split and split != offsets[1:] and split != offsets:
            raise CorruptStreamError(
                f"{where}: split_positions {split[:4]}... disagree with the weights' sizes"
            )
    ct = CompressedTensor(
        mode=MODE_HUFFMAN,
        members=tuple(out),
        numel=numel,
        encoded_exponent=arrays["encoded_exponent"].reshape(-1),
        sign_mantissa=arrays["sign_mantissa"].reshape(-1),
        gaps=arrays["gaps"].reshape(-1),
        output_positions=positions,
        code=arrays["luts"].to(torch.uint8),
        code_kind=CODE_DF11_LUT,
        bytes_per_window=bytes_per_thread,
        windows_per_block=threads_per_block,
        max_code_length=32,
    )
    check_structure(ct, where)
    return ct
