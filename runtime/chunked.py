"""Big matrices used piecewise, so the decode buffer need not hold them: lm_head in row chunks, embedding rows.

A unit that is one matrix used as an ``nn.Linear`` weight (lm_head) and/or an ``nn.Embedding`` weight (tied or
not) and is bigger than the decode buffer's budget is split into row chunks (`dfloat.runtime.memory.plan_memory`).
Each chunk has a fixed place in the device's decode buffer, computed once: it decodes the blocks of windows that
hold the chunk's rows (`dfloat.blocks`) so that its first row lands on a 128-byte boundary, and the chunk's weight
is a fixed view of the buffer (stable addresses, as CUDA graphs need).

- Linear: decode a chunk, ``F.linear`` with it, write the result into its columns of one output, next chunk.
  Each output element is the same dot product as with the whole matrix; that this gives bit-identical results is
  a property of the backend's GEMM (it may pick another kernel for a smaller N, or for more input rows: Intel
  AVX-512 CPUs do from 33 rows). So it is used unchecked only where tested (``TESTED_EXACT``: CUDA); elsewhere,
  the CPU included, a self-check at load (one input row, a random matrix of the unit's shape) decides whether the
  unit is chunked at all, and the first call with each number of input rows compares the chunks with the whole
  matrix decoded (`ChunkedUnit.linear`); where they differ, calls of that size decode the matrix whole.
- Autograd: when the output needs a gradient (the input or bias requires grad and grad mode is on, in train or
  eval mode), the backward pass needs the weight and must get the whole-matrix math, so the matrix is decoded
  whole into a tensor of its own that autograd keeps (the chunks would be overwritten by the next one).
- Embedding: decode only the blocks that hold the rows looked up, gather them into a small matrix and let the
  module's own forward (scaled embeddings too) look up the remapped ids. Exact by construction. While a CUDA graph
  is being captured (no host reads allowed) it scans the chunks instead: every chunk decoded, rows selected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dfloat.blocks import block_range, blocks_covering, decompress_blocks, host_positions
from dfloat.errors import ShapeMismatchError
from dfloat.format import CompressedTensor
from dfloat.runtime.decode_hooks import decode_copy
from dfloat.runtime.memory import ALIGN_ELEMENTS, Chunking

log = logging.getLogger(__name__)

# Where a row-chunked F.linear was shown bit-identical to the whole matrix for every input size. Not the CPU:
# Intel AVX-512 CPUs give other bits from 33 input rows on (issue 19), so CPUs are checked like other devices.
TESTED_EXACT = {
    "cuda": "H100 (cuBLAS), 128256 x 2048, chunks of 4096-65536 rows, 1/16/512 input rows "
    "(shared/reference/h100-measurements.md); the GPU test re-checks it on the GPU at hand",
}
_SELF_CHECKED: dict[tuple, bool] = {}
SCAN_RUNS = 8  # more separate block runs than this in one chunk: decode the chunk's span in one go
LOAD_CHECK_ROWS = (1,)  # input rows the load-time self-check tries (a decode step); others: at first use
_TILE_ROWS = 1021  # the self-check's random matrix repeats a random tile of this many rows (cheap to make)


def tested_exact(device: torch.device) -> bool:
    """Whether ``device`` is on the tested list (no checks at load or run time)."""
    return device.type == "cuda" and torch.version.hip is None


def chunked_linear_is_exact(device: torch.device, rows: int, cols: int, chunk: int) -> bool:
    """At load: whether to chunk this matrix at all on ``device``. The tested list, else a self-check with
    `LOAD_CHECK_ROWS` input rows (each other input size is checked at its first call, `ChunkedUnit.linear`)."""
    return tested_exact(device) or self_check(device, rows, cols, chunk, LOAD_CHECK_ROWS)


def self_check(device: torch.device, rows: int, cols: int, chunk: int, inputs=(1, 16)) -> bool:
    """Compare F.linear with a random ``rows x cols`` BF16 matrix against its row chunks, for each number of
    input rows in ``inputs`` (allocates the matrix once, transiently; cached per shape and CPU thread count,
    which the CPU's GEMM may split its work by)."""
    key = (str(device), rows, cols, chunk, tuple(inputs), torch.get_num_threads())
    if key not in _SELF_CHECKED:
        w = random_matrix(rows, cols, device)
        ok = True
        for m in inputs:
            x = random_matrix(m, cols, device, seed=m)
            whole = F.linear(x, w)
            parts = torch.cat([F.linear(x, w[r : r + chunk]) for r in range(0, rows, chunk)], dim=-1)
            ok = ok and same_bits(whole, parts)
        _SELF_CHECKED[key] = ok
        del w
    return _SELF_CHECKED[key]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaNs included: an input row that is NaN must not fail the check when both give NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
    return torch.equal(a.view(as_int), b.view(as_int)) if as_int else torch.equal(a, b)


def random_matrix(rows: int, cols: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A BF16 matrix of weight-like random values (a random tile repeated down the rows: as cheap to make as a
    copy, and every row still differs from its neighbours)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tile = (torch.randn(min(rows, _TILE_ROWS), cols, generator=g) * 0.05).to(torch.bfloat16)
    reps = -(-rows // tile.shape[0])
    return tile.repeat(reps, 1)[:rows].to(device)


def checked_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    verdicts: dict,
    name: str,
    whole: Callable[[], torch.Tensor],
    chunked: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a matrix ``W`` held in row chunks: ``chunked(x, bias)`` where that gives the
    bits of ``F.linear(x, whole(), bias)``, else the whole matrix. Unchecked on the tested list; elsewhere the
    first call with each input size compares the two (on ``x`` and on random rows of its shape) and ``verdicts``
    remembers the answer. While a CUDA graph is captured (no host reads) an unchecked size takes the whole matrix.
    """
    if tested_exact(x.device) or x.numel() == 0:
        return chunked(x, bias)
    key = (x.numel() // max(1, x.shape[-1]), x.is_contiguous(), bias is not None, torch.get_num_threads())
    ok = verdicts.get(key)
    if ok is None:
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return F.linear(x, whole(), bias)  # no host reads while capturing: check after capture
        w = whole()
        want = F.linear(x, w, bias)
        probe = random_matrix(key[0], x.shape[-1], x.device, seed=key[0]).to(x.dtype).view(x.shape)
        ok = same_bits(chunked(x, bias), want) and same_bits(chunked(probe, bias), F.linear(probe, w, bias))
        verdicts[key] = ok
        if not ok:
            log.warning(
                "unit %r: the row-chunked matmul is not bit-identical to the whole matrix on %s for %d input "
                "rows (%d threads): decoding it whole for calls of that size",
                name,
                x.device,
                key[0],
                key[3],
            )
        return want
    return chunked(x, bias) if ok else F.linear(x, whole(), bias)


@dataclass
class _Chunk:
    rows: tuple[int, int]  # [r0, r1)
    blocks: tuple[int, int]  # [b0, b1): the blocks holding the rows
    offset: int  # buffer element where block b0's first element goes
    row0: int  # buffer element of row r0
    sub: CompressedTensor | None = None  # the blocks as a sub-unit, for decoders that are not the CPU's


@dataclass
class ChunkedUnit:
    """One big matrix unit with its chunks' fixed places in the device's decode buffer."""

    name: str
    ct: CompressedTensor  # on the execution device, or pinned on the host (cpu_offload)
    buffer: object  # the device's DecodeBuffer
    plan: Chunking
    chunks: list[_Chunk] = field(default_factory=list)
    scan: bool = False  # embedding lookups by scanning every chunk (what CUDA-graph capture uses)
    # Run-time check (devices not on the tested list): input shape key -> chunks equal the whole matrix.
    exact: dict[tuple, bool] = field(default_factory=dict)

    @classmethod
    def build(cls, name: str, ct: CompressedTensor, buffer, plan: Chunking) -> ChunkedUnit:
        pos = host_positions(ct)
        unit = cls(name, ct, buffer, plan)
        for r0, r1 in plan.chunks:
            b0, b1 = (int(b[0]) for b in blocks_covering(ct, [r0 * plan.cols], [r1 * plan.cols]))
            lead = r0 * plan.cols - int(pos[b0])  # elements of block b0 before row r0
            offset = (-lead) % ALIGN_ELEMENTS
            need = offset + int(pos[b1] - pos[b0])
            if need > buffer.numel:
                raise ShapeMismatchError(
                    f"unit {name!r}: chunk of rows {r0}..{r1} needs {need} buffer elements, the buffer has "
                    f"{buffer.numel}"
                )
            unit.chunks.append(_Chunk((r0, r1), (b0, b1), offset, offset + lead))
        if buffer.device.type != "cpu":
            for c in unit.chunks:  # made once, so that decoding a chunk reads no host memory (CUDA graphs)
                c.sub = block_range(ct, *c.blocks)
        return unit

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def _decode(self, b0: int, b1: int, out: torch.Tensor, chunk: _Chunk | None = None) -> None:
        backend = self.buffer.backend
        if self.ct.device == out.device and out.device.type == "cpu" and backend in (None, "auto", "cpu"):
            decompress_blocks(self.ct, b0, b1, out, backend)
            return
        from dfloat.kernels import registry

        whole_chunk = chunk is not None and (b0, b1) == chunk.blocks and chunk.sub is not None
        sub = chunk.sub if whole_chunk else block_range(self.ct, b0, b1)
        if sub.device != out.device:  # cpu_offload: bring only these blocks over
            sub = sub.to(out.device, non_blocking=True)
        registry.decode_into(sub, out[: sub.numel], backend)

    def weight(self, i: int) -> torch.Tensor:
        """Decode chunk ``i`` into its place in the buffer; its rows as a fixed view of the buffer."""
        c = self.chunks[i]
        buf = self.buffer.scratch()
        self._decode(*c.blocks, buf[c.offset :], chunk=c)
        if torch.is_grad_enabled() and not buf.is_inference():
            # The decoders write without telling autograd: mark the buffer changed, so a view saved for a backward
            # pass by a caller this module did not foresee makes autograd raise instead of using later rows.
            torch.autograd.graph.increment_version(buf)
        return self.view(i, buf)

    def whole(self) -> torch.Tensor:
        """The whole matrix, decoded into a tensor of its own (autograd may keep it; nothing overwrites it)."""
        flat = decode_copy(self.ct, self.device, self.buffer.backend)
        return flat[: self.plan.total_rows * self.plan.cols].view(self.plan.total_rows, self.plan.cols)

    def view(self, i: int, buf: torch.Tensor) -> torch.Tensor:
        c = self.chunks[i]
        r0, r1 = c.rows
        return buf[c.row0 : c.row0 + (r1 - r0) * self.plan.cols].view(r1 - r0, self.plan.cols)

    # ---- linear ----------------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, W, bias)`` with the bits of the whole matrix: chunk by chunk where that is exact, else
        (and whenever autograd will keep the weight for a backward pass) with ``W`` decoded whole."""
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, self.whole(), bias)
        return checked_linear(x, bias, self.exact, self.name, self.whole, self._chunked)

    def _chunked(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = None
        for i, c in enumerate(self.chunks):
            r0, r1 = c.rows
            y = F.linear(x, self.weight(i), None if bias is None else bias[r0:r1])
            if out is None:
                out = y.new_empty(*y.shape[:-1], self.plan.total_rows)
            out[..., r0:r1] = y
        return out

    # ---- embedding -------------------------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, local ids): a small matrix holding the rows looked up, and ``ids`` remapped into it."""
        capturing = ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing or self.scan:
            return self._lookup_scan(ids)
        return self._lookup_partial(ids)

    def _lookup_partial(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        host = ids.detach().reshape(-1).cpu().numpy().astype(np.int64)
        rows, cols = self.plan.total_rows, self.plan.cols
        uniq, inverse = np.unique(host, return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= rows):
            bad = int(uniq[0] if uniq[0] < 0 else uniq[-1])
            raise IndexError(f"embedding {self.name!r}: index {bad} is out of range for {rows} rows")
        out = torch.empty(uniq.size, cols, dtype=torch.bfloat16, device=self.device)
        which = np.searchsorted([c.rows[1] for c in self.chunks], uniq, side="right")
        for i in np.unique(which):
            i = int(i)
            c = self.chunks[i]
            sel = np.flatnonzero(which == i)
            b0s, b1s = blocks_covering(self.ct, uniq[sel] * cols, uniq[sel] * cols + cols)
            new_run = np.concatenate([[True], b0s[1:] >= np.maximum.accumulate(b1s)[:-1]])
            starts = np.flatnonzero(new_run)
            run_b0, run_b1 = b0s[starts], np.maximum.reduceat(b1s, starts)
            if starts.size > SCAN_RUNS:  # many scattered rows: one decode of their whole span
                run_b0, run_b1 = run_b0[:1], run_b1[-1:]
            buf = self.buffer.scratch()
            pos = host_positions(self.ct)
            base = c.offset - int(pos[c.blocks[0]])
            for b0, b1 in zip(run_b0.tolist(), run_b1.tolist()):
                self._decode(b0, b1, buf[base + int(pos[b0]) :], chunk=c)
            local = torch.from_numpy(uniq[sel] - c.rows[0]).to(self.device)
            out[torch.from_numpy(sel).to(self.device)] = self.view(i, buf).index_select(0, local)
        return out, torch.from_numpy(inverse.reshape(ids.shape)).to(ids.device)

    def _lookup_scan(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = ids.reshape(-1)
        out = torch.zeros(flat.numel(), self.plan.cols, dtype=torch.bfloat16, device=self.device)
        for i, c in enumerate(self.chunks):
            r0, r1 = c.rows
            local = flat - r0
            inside = (local >= 0) & (local < r1 - r0)
            got = F.embedding(local.clamp(0, r1 - r0 - 1), self.weight(i))
            out = torch.where(inside.unsqueeze(-1), got, out)
        return out, torch.arange(flat.numel(), device=ids.device).view(ids.shape)


def install_linear(module: torch.nn.Linear, unit: ChunkedUnit) -> None:
    """Make ``module`` multiply by the chunks of ``unit`` (its weight stays a placeholder of the full shape)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return unit.linear(x, module.bias)

    module.forward = forward
    module._dfloat_chunked = unit


def install_embedding(module: torch.nn.Embedding, unit: ChunkedUnit) -> None:
    """Look up ``module``'s rows by decoding only the blocks that hold them.

    A pre-hook swaps the weight for the rows looked up and remaps the ids; a forward hook puts the placeholder
    back. ``padding_idx`` is cleared: it only changes gradients, and these weights are frozen."""
    placeholder = module._parameters["weight"]
    module.padding_idx = None

    def pre(mod, args, kwargs):
        ids = args[0] if args else kwargs.pop("input")
        rows, local = unit.lookup(ids)
        mod._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        return (local, *args[1:]), kwargs

    def post(mod, args, output):
        mod._parameters["weight"] = placeholder

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post)
    module._dfloat_chunked = unit


def can_chunk(places: list[tuple[torch.nn.Module, str]]) -> bool:
    """Every place is the weight of a plain nn.Linear or of an embedding without max_norm (which would renorm)."""
    for module, attr in places:
        if attr != "weight":
            return False
        if type(module) is torch.nn.Linear:
            continue
        if isinstance(module, torch.nn.Embedding) and module.max_norm is None and not module.sparse:
            continue
        return False
    return True
