"""The GEMV layout: one BF16 matrix coded so that a fused kernel can multiply straight from the code.

The layout is specified in docs/FORMAT.md section 9 and at the top of kernels/cuda/gemv.cu. In short: a thread
block owns a tile of whole rows, each thread owns groups of 4 columns and decodes its own stream of short codes
(at most 12 bits, one table lookup each), the streams of a warp are interleaved word by word, and one word offset
per warp is the whole index. The encoder's two loops over lanes are numba (compiled on first use); the rest is
vectorised numpy, and the reference decoder steps through code positions with every lane at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from dfloat.errors import CorruptStreamError, ShapeMismatchError, UnsupportedDtypeError
from dfloat.huffman import canonical_codes, code_lengths

LAYOUT_NAME = "gemv"
MAX_PEEK = 12  # longest code: the lookup table has 2^12 pairs of u32 (32 KiB) and two codes fit a refill
ROWS_PER_TILE_CHOICES = (8, 4, 2)
MIN_TILES = 200  # about 1.5 waves of blocks on a 132-SM H100
_CHUNK_WEIGHTS = 1 << 22  # tiles are encoded in chunks of about this many weights (bounded memory)


def default_threads(k: int) -> int:
    """The widest block (128, 64 or 32 threads) whose column groups pad K by at most 3%, else the least padding."""
    padded = {t: math.ceil(k / (4 * t)) * 4 * t for t in (128, 64, 32)}
    for t in (128, 64, 32):
        if padded[t] <= 1.03 * k:
            return t
    return min(padded, key=lambda t: (padded[t], -t))


def default_rows_per_tile(n_rows: int) -> int:
    """The largest tile (fewer, longer streams: less padding) that still gives enough blocks to fill the GPU."""
    for r in ROWS_PER_TILE_CHOICES:
        if math.ceil(n_rows / r) >= MIN_TILES:
            return r
    return ROWS_PER_TILE_CHOICES[-1]


@dataclass(frozen=True, eq=False)
class GemvMatrix:
    """A coded N x K BF16 matrix in the GEMV layout (arrays as int32/int64 tensors holding the u32 words)."""

    shape: tuple[int, int]
    rows_per_tile: int
    threads: int
    code_lengths: torch.Tensor  # uint8[256]
    enc: torch.Tensor  # int32 words (u32 bit patterns)
    warp_offsets: torch.Tensor  # int64[n_tiles * n_warps + 1]
    sm: torch.Tensor  # int32 words, 4 sign|mantissa bytes each
    lut: torch.Tensor  # int32[2 << peek]: (exponent << 23, code length) pairs
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_warps(self) -> int:
        return self.threads // 32

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.shape[0] / self.rows_per_tile)

    @property
    def groups(self) -> int:
        return math.ceil(self.shape[1] / (4 * self.threads))

    @property
    def peek(self) -> int:
        return int(self.lut.numel()).bit_length() - 2

    @property
    def device(self) -> torch.device:
        return self.enc.device

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.code_lengths, self.enc, self.warp_offsets, self.sm)
        )

    @property
    def bits_per_weight(self) -> float:
        n = self.shape[0] * self.shape[1]
        return 8.0 * self.nbytes / n if n else 0.0

    def to(self, device: torch.device | str) -> GemvMatrix:
        names = ("code_lengths", "enc", "warp_offsets", "sm", "lut")
        return replace(self, **{k: getattr(self, k).to(device) for k in names}, _cache={})

    def __repr__(self) -> str:
        return (
            f"GemvMatrix(shape={self.shape}, rows_per_tile={self.rows_per_tile}, threads={self.threads}, "
            f"peek={self.peek}, bits_per_weight={self.bits_per_weight:.3f}, device={self.device})"
        )


def _lane_order(a: np.ndarray, n_tiles: int, r: int, g: int, t: int) -> np.ndarray:
    """[tiles * R, G * T * 4] -> [tiles * T, G * R * 4]: each lane's weights in its decode order."""
    return a.reshape(n_tiles, r, g, t, 4).transpose(0, 3, 2, 1, 4).reshape(n_tiles * t, g * r * 4)


def lookup_table(lengths: np.ndarray) -> np.ndarray:
    """uint32[2^peek, 2]: for the next `peek` bits, (exponent << 23, code length) of the canonical code."""
    lengths = np.asarray(lengths, dtype=np.int64)
    peek = max(int(lengths.max()), 1)
    codes = canonical_codes(lengths).astype(np.int64)
    lut = np.zeros((1 << peek, 2), dtype=np.uint32)
    for sym in np.flatnonzero(lengths).tolist():  # at most 256 symbols
        n = int(lengths[sym])
        lo = int(codes[sym]) << (peek - n)
        lut[lo : lo + (1 << (peek - n))] = (sym << 23, n)
    return lut


_PACKERS: tuple | None = None


def _packers():
    """The two compiled loops of `encode` (numba, compiled on first use and cached on disk)."""
    global _PACKERS
    if _PACKERS is None:
        from dfloat._numba import njit, prange

        @njit(parallel=True, cache=True, nogil=True)
        def lane_bits(lane_exps, lengths):  # pragma: no cover - compiled
            out = np.empty(lane_exps.shape[0], np.int64)
            for i in prange(lane_exps.shape[0]):
                total = 0
                for c in range(lane_exps.shape[1]):
                    total += lengths[lane_exps[i, c]]
                out[i] = total
            return out

        @njit(parallel=True, cache=True, nogil=True)
        def pack_lanes(lane_exps, codes, lengths, woff, enc):  # pragma: no cover - compiled
            for i in prange(lane_exps.shape[0]):
                at = woff[i // 32] + i % 32  # word 0 of this lane; its word q is at + 32 q
                acc = np.uint64(0)
                n = 0
                for c in range(lane_exps.shape[1]):
                    e = lane_exps[i, c]
                    ln = lengths[e]
                    acc = (acc << np.uint64(ln)) | np.uint64(codes[e])
                    n += ln
                    if n >= 32:
                        n -= 32
                        enc[at] = np.uint32((acc >> np.uint64(n)) & np.uint64(0xFFFFFFFF))
                        at += 32
                if n > 0:
                    enc[at] = np.uint32((acc << np.uint64(32 - n)) & np.uint64(0xFFFFFFFF))

        _PACKERS = (lane_bits, pack_lanes)
    return _PACKERS


def encode(
    weight: torch.Tensor, rows_per_tile: int | None = None, threads: int | None = None, name: str = "weight"
) -> GemvMatrix:
    """Code a 2-D BF16 matrix in the GEMV layout (lossless; `decode` gives back the same bits).

    Raises UnsupportedDtypeError for non-BF16 input and ShapeMismatchError for anything but a non-empty matrix
    or a thread count that is not a multiple of 32 up to 256.
    """
    if weight.dtype != torch.bfloat16:
        raise UnsupportedDtypeError(f"{name}: the GEMV layout codes BF16 matrices, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ShapeMismatchError(
            f"{name}: the GEMV layout needs a non-empty 2-D matrix, got {tuple(weight.shape)}"
        )
    threads = threads or default_threads(weight.shape[1])
    if threads % 32 or not 32 <= threads <= 256:
        raise ShapeMismatchError(f"{name}: threads must be a multiple of 32 in 32..256, got {threads}")
    n, k = weight.shape
    r = rows_per_tile or default_rows_per_tile(n)
    if r not in ROWS_PER_TILE_CHOICES and r != 1:
        raise ShapeMismatchError(f"{name}: rows_per_tile must be one of 1, 2, 4, 8, got {r}")
    t, nw = threads, threads // 32
    g = math.ceil(k / (4 * t))
    n_tiles = math.ceil(n / r)
    bits = weight.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)

    # The code: over the exponents of the weights and of the zero padding the kernel decodes too.
    exps = ((bits >> 7) & 0xFF).astype(np.uint8)
    counts = np.bincount(exps.reshape(-1), minlength=256).astype(np.int64)
    pad = n_tiles * r * g * 4 * t - n * k
    counts[0] += pad
    lengths = code_lengths(counts, MAX_PEEK)
    codes32 = canonical_codes(lengths).astype(np.uint32)
    lut = lookup_table(lengths)
    lane_bits, pack_lanes = _packers()

    tiles_per_chunk = max(1, _CHUNK_WEIGHTS // (r * g * 4 * t))
    enc_parts, sm_parts, warp_words = [], [], []
    for first in range(0, n_tiles, tiles_per_chunk):
        nt = min(tiles_per_chunk, n_tiles - first)
        padded = np.zeros((nt * r, g * 4 * t), dtype=np.uint16)
        rows = bits[first * r : (first + nt) * r]
        padded[: rows.shape[0], :k] = rows
        sm_bytes = (((padded >> 8) & 0x80) | (padded & 0x7F)).astype(np.uint8)
        sm_parts.append(
            sm_bytes.reshape(nt, r, g, t, 4).transpose(0, 2, 1, 3, 4).copy().reshape(-1).view(np.uint32)
        )
        lane_exps = _lane_order(((padded >> 7) & 0xFF).astype(np.uint8), nt, r, g, t)
        bits_per_lane = lane_bits(lane_exps, lengths)
        lane_words = (bits_per_lane + 31) // 32
        ww = lane_words.reshape(nt * nw, 32).max(axis=1)  # each warp: its longest lane
        woff = np.concatenate([[0], np.cumsum(ww * 32)]).astype(np.int64)
        enc = np.zeros(int(woff[-1]), dtype=np.uint32)
        pack_lanes(lane_exps, codes32, lengths, woff, enc)
        enc_parts.append(enc)
        warp_words.append(ww * 32)
    ww_all = np.concatenate(warp_words)
    warp_offsets = np.concatenate([[0], np.cumsum(ww_all)]).astype(np.int64)
    return GemvMatrix(
        shape=(n, k),
        rows_per_tile=r,
        threads=t,
        code_lengths=torch.from_numpy(lengths.astype(np.uint8)),
        enc=torch.from_numpy(np.concatenate(enc_parts).view(np.int32)),
        warp_offsets=torch.from_numpy(warp_offsets),
        sm=torch.from_numpy(np.concatenate(sm_parts).view(np.int32)),
        lut=torch.from_numpy(lut.reshape(-1).view(np.int32)),
    )


def decode(gm: GemvMatrix) -> torch.Tensor:
    """The matrix back as BF16 on the CPU (the layout's reference decoder: every lane advanced at once)."""
    n, k = gm.shape
    r, t, g, nw = gm.rows_per_tile, gm.threads, gm.groups, gm.n_warps
    n_tiles, peek = gm.n_tiles, gm.peek
    enc = gm.enc.cpu().numpy().view(np.uint32).astype(np.uint64)
    woff = gm.warp_offsets.cpu().numpy()
    lut = gm.lut.cpu().numpy().view(np.uint32).reshape(-1, 2)
    if woff.shape != (n_tiles * nw + 1,) or woff[0] != 0 or woff[-1] != enc.size or (np.diff(woff) < 0).any():
        raise CorruptStreamError(f"GEMV matrix {gm.shape}: warp offsets do not match the stream")
    lanes = n_tiles * t
    lane = np.arange(lanes)
    base = woff[lane // 32] + lane % 32
    limit = woff[lane // 32 + 1]
    padded_enc = np.concatenate([enc, np.zeros(2, np.uint64)])

    def word(q: np.ndarray) -> np.ndarray:
        at = base + 32 * q
        return padded_enc[np.where(at < limit, at, enc.size)]

    pos = np.zeros(lanes, dtype=np.int64)
    exps = np.empty((lanes, g * r * 4), dtype=np.uint16)
    mask = (1 << peek) - 1
    for c in range(g * r * 4):  # one step per code position, all lanes at once
        q, off = pos >> 5, pos & 31
        window = ((word(q) << np.uint64(32)) | word(q + 1)) >> (np.uint64(64 - peek) - off.astype(np.uint64))
        e = lut[(window & np.uint64(mask)).astype(np.int64)]
        exps[:, c] = e[:, 0] >> 23
        pos += e[:, 1]
    exps = exps.reshape(n_tiles, t, g, r, 4).transpose(0, 3, 2, 1, 4).reshape(n_tiles * r, g * 4 * t)
    sm = gm.sm.cpu().numpy().view(np.uint8).reshape(n_tiles, g, r, t, 4).transpose(0, 2, 1, 3, 4)
    sm = sm.reshape(n_tiles * r, g * 4 * t).astype(np.uint16)
    words = ((sm & 0x80) << 8) | (exps << 7) | (sm & 0x7F)
    return torch.from_numpy(np.ascontiguousarray(words[:n, :k]).view(np.int16)).view(torch.bfloat16)
