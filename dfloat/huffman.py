"""Length-limited canonical Huffman codes over the 256 exponent values, and the decode tables built from them.

Code lengths come from package-merge, which is optimal under the length limit (no frequency bending). Codes are
canonical: sorted by (length, symbol), consecutive integers, so 256 code lengths define the whole code. The decode
tables are a general prefix-code structure (8-bit multi-level lookup) so that the non-canonical codes of official
DFloat11 checkpoints decode through the very same tables; those checkpoints store their code as lookup tables
(`luts_from_code` / `codes_from_luts` convert between the two forms).
"""

from __future__ import annotations

import numpy as np

from dfloat.errors import CorruptStreamError, DFloatError

NUM_SYMBOLS = 256
MAX_SUPPORTED_CODE_LENGTH = 32  # a 5-bit window start offset can only point at codes of at most 32 bits
FIRST_POINTER = 240  # official LUT entries >= 240 point at table 256 - entry: exponents >= 240 are no symbols


def code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Optimal code lengths under ``max_length`` (package-merge) for 256 symbol counts.

    One used symbol gets length 1 (a code must have at least one bit); unused symbols get 0.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (NUM_SYMBOLS,) or (counts < 0).any():
        raise DFloatError(f"expected 256 non-negative symbol counts, got shape {counts.shape}")
    if not 1 <= max_length <= MAX_SUPPORTED_CODE_LENGTH:
        raise DFloatError(f"max_code_length must be in 1..{MAX_SUPPORTED_CODE_LENGTH}, got {max_length}")
    used = np.flatnonzero(counts)
    lengths = np.zeros(NUM_SYMBOLS, dtype=np.uint8)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    if used.size > (1 << max_length):
        raise DFloatError(f"{used.size} symbols cannot be coded with codes of at most {max_length} bits")

    # Package-merge: each item is (weight, per-symbol multiplicity vector over the used symbols).
    order = used[np.argsort(counts[used], kind="stable")]
    k = order.size
    leaf_w = counts[order]
    leaf_v = np.eye(k, dtype=np.int32)
    w, v = leaf_w, leaf_v
    for _ in range(max_length - 1):
        pairs = w.size // 2
        pw = w[: 2 * pairs : 2] + w[1 : 2 * pairs : 2]
        pv = v[: 2 * pairs : 2] + v[1 : 2 * pairs : 2]
        merged_w = np.concatenate([leaf_w, pw])
        merged_v = np.concatenate([leaf_v, pv])
        idx = np.argsort(merged_w, kind="stable")  # leaves first among equal weights: deterministic
        w, v = merged_w[idx], merged_v[idx]
    chosen = v[: 2 * k - 2].sum(axis=0)
    lengths[order] = chosen.astype(np.uint8)
    assert kraft_sum(lengths) == 1.0
    return lengths


def kraft_sum(lengths: np.ndarray) -> float:
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths[lengths > 0]
    return float(np.sum(2.0 ** (-used.astype(np.float64))))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint32, right-aligned) for 256 code lengths; 0 where the length is 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (NUM_SYMBOLS,) or lengths.min() < 0 or lengths.max() > MAX_SUPPORTED_CODE_LENGTH:
        raise CorruptStreamError(f"code lengths must be 256 values in 0..32, got {lengths.tolist()[:8]}...")
    if kraft_sum(lengths) > 1.0:
        raise CorruptStreamError("code lengths violate the Kraft inequality (not a prefix code)")
    codes = np.zeros(NUM_SYMBOLS, dtype=np.uint32)
    code = 0
    prev_len = 0
    for sym in sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev_len
        prev_len = int(lengths[sym])
        codes[sym] = code
        code += 1
    return codes


def build_decode_tables(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Multi-level 8-bit lookup tables (int32, shape (k, 256)) for any prefix code of at most 32 bits.

    Entry meaning, for the next 8 bits of the stream at this level:
      > 0: a leaf, ``(total_code_length << 8) | symbol``;
      < 0: the code continues in table ``-entry`` with the following 8 bits;
      = 0: no code has this prefix (a corrupt stream, or the padding after an official end-of-stream code).
    """
    codes = np.asarray(codes, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    tables: list[np.ndarray] = [np.zeros(256, dtype=np.int32)]
    children: dict[tuple[int, int], int] = {}
    for sym in np.flatnonzero(lengths).tolist():
        length, code = int(lengths[sym]), int(codes[sym])
        if code >> length:
            raise CorruptStreamError(f"code of symbol {sym} does not fit in {length} bits")
        table, depth = 0, 0
        while length - 8 * depth > 8:
            prefix = code >> (length - 8 * (depth + 1))
            byte = prefix & 0xFF
            key = (depth + 1, prefix)
            if key not in children:
                if tables[table][byte] != 0:
                    raise CorruptStreamError(f"code of symbol {sym} extends another code: not a prefix code")
                children[key] = len(tables)
                tables[table][byte] = -len(tables)
                tables.append(np.zeros(256, dtype=np.int32))
            table, depth = children[key], depth + 1
        rest = length - 8 * depth
        lo = (code & ((1 << rest) - 1)) << (8 - rest)
        hi = lo + (1 << (8 - rest))
        if tables[table][lo:hi].any():
            raise CorruptStreamError(f"code of symbol {sym} collides with another code: not a prefix code")
        tables[table][lo:hi] = (length << 8) | sym
    return np.stack(tables)


# ---- the official DFloat11 form of a code: lookup tables ------------------------------------------------------


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
