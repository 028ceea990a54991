"""The memory plan of a compressed model: what its weights cost on each device, decode buffers included.

Weight memory = compressed units + plain (uncoded) tensors + one decode buffer per device. The buffer holds the
largest unit that must be decoded whole (by default a transformer block). A unit that is one matrix used as an
embedding and/or a linear layer's weight (embeddings, lm_head) and is bigger than that is never decoded whole:
the embedding looks up rows by decoding only the blocks that hold them, the linear layer multiplies a row chunk
at a time (`dfloat.runtime.chunked`), so it needs only a chunk's room in the same buffer. A block unit whose
members live in several child modules (attention, MLP) is decoded a part at a time ("split decode"), so the
buffer holds its largest part.

The same plan is computed from a loaded model (`load_compressed` logs it), from a checkpoint's headers
(`dfloat inspect`), or from shapes alone with an estimated bits/weight (`benchmarks/memory_plan.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Room a chunk needs beyond its rows: the blocks at both ends hold elements of the neighbouring rows, and the
# chunk's first row is placed on a 128-byte boundary.
ALIGN_ELEMENTS = 64
_NUMBERED = re.compile(r"(^|\.)\d+(\.|$)")  # a numbered module in the name: model.layers.7, transformer.h.0
DEFAULT_CHUNK_NUMEL = 1 << 24  # when no unit must be decoded whole
CHUNK_ROW_MULTIPLE = 128  # chunks of many rows are a multiple of this (GEMM tile sizes)
# Fewest rows in a chunk: below this the per-chunk work (a decode call and a GEMM call) costs more than the rows'
# math; a chunk also holds at least as many weights as its overhang, so decoding it costs at most twice its rows.
MIN_CHUNK_ROWS = 128


@dataclass(frozen=True)
class UnitSize:
    """What the plan needs to know about one unit."""

    name: str
    numel: int
    stored_bytes: int
    coded: bool = True
    matrix: tuple[int, int] | None = None  # (rows, cols) when the unit is one 2-D matrix
    chunkable: bool = False  # one matrix used only as an embedding and/or an nn.Linear weight
    max_block_numel: int = 0  # most elements one block of windows holds (bounds a chunk's overhang)
    device: str = "cpu"
    decode_numel: int = 0  # buffer elements a whole-unit decode needs when less than numel (split decode)


@dataclass(frozen=True)
class Chunking:
    """How a big matrix is used piecewise: ``rows`` rows per chunk (the last one may be shorter)."""

    unit: str
    rows: int
    total_rows: int
    cols: int

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.rows, self.total_rows)) for r in range(0, self.total_rows, self.rows)]


@dataclass
class MemoryPlan:
    """Bytes of weight memory, per part and in all, against the BF16 model's weight bytes."""

    units: list[UnitSize]
    plain_bytes: int
    buffers: dict[str, int] = field(default_factory=dict)  # device -> decode buffer elements (BF16)
    chunked: dict[str, Chunking] = field(default_factory=dict)

    @property
    def compressed_bytes(self) -> int:
        return sum(u.stored_bytes for u in self.units)

    @property
    def buffer_bytes(self) -> int:
        return 2 * sum(self.buffers.values())

    @property
    def total_bytes(self) -> int:
        return self.compressed_bytes + self.plain_bytes + self.buffer_bytes

    @property
    def bf16_bytes(self) -> int:
        """The uncompressed model's weight bytes (units at 2 bytes per weight, plain tensors as they are)."""
        return 2 * sum(u.numel for u in self.units) + self.plain_bytes

    @property
    def pct_of_bf16(self) -> float:
        return 100.0 * self.total_bytes / max(1, self.bf16_bytes)

    def as_dict(self) -> dict:
        return {
            "compressed_bytes": self.compressed_bytes,
            "plain_bytes": self.plain_bytes,
            "decode_buffer_bytes": self.buffer_bytes,
            "decode_buffers": {d: {"elements": n, "bytes": 2 * n} for d, n in self.buffers.items()},
            "total_bytes": self.total_bytes,
            "bf16_bytes": self.bf16_bytes,
            "pct_of_bf16": round(self.pct_of_bf16, 2),
            "chunked": {
                c.unit: {"rows_per_chunk": c.rows, "chunks": len(c.chunks), "shape": [c.total_rows, c.cols]}
                for c in self.chunked.values()
            },
        }

    def summary(self) -> str:
        mib = 2.0**20
        chunks = ", ".join(
            f"{c.unit} in {len(c.chunks)} chunks of {c.rows} rows" for c in self.chunked.values()
        )
        return (
            f"weight memory {self.total_bytes / mib:,.1f} MiB = {self.pct_of_bf16:.2f}% of BF16 "
            f"({self.bf16_bytes / mib:,.1f} MiB): compressed {self.compressed_bytes / mib:,.1f} MiB, "
            f"plain {self.plain_bytes / mib:,.1f} MiB, decode buffer(s) {self.buffer_bytes / mib:,.1f} MiB "
            f"({', '.join(f'{d}: {n:,} elements' for d, n in self.buffers.items()) or 'none'})"
            + (f"; used piecewise: {chunks}" if chunks else "")
        )


def in_block(unit: str) -> bool:
    """A unit inside a numbered module (a transformer block, or one of its matrices with ``unit="matrix"``): it
    is decoded whole, and the largest such unit sets the buffer's size. Only units outside blocks (embeddings,
    lm_head) are used piecewise."""
    return _NUMBERED.search(unit) is not None


def chunk_rows(budget: int, cols: int, overhang: int) -> int:
    """Rows per chunk so that rows * cols plus the overhang of the blocks at both ends fits ``budget`` elements,
    but never fewer than `min_chunk_rows` (the buffer then grows past the budget: a tiny budget would otherwise
    give chunks of a row or two, each paying a decode and a GEMM call, and the blocks around it, for one row)."""
    cols = max(1, cols)
    least = min_chunk_rows(cols, overhang)
    fit = (budget - overhang) // cols
    if fit < least:
        return least + (-least) % CHUNK_ROW_MULTIPLE if least >= 2 * CHUNK_ROW_MULTIPLE else least
    rounded = fit - fit % CHUNK_ROW_MULTIPLE
    return rounded if fit >= 2 * CHUNK_ROW_MULTIPLE and rounded >= least else fit


def min_chunk_rows(cols: int, overhang: int) -> int:
    """`MIN_CHUNK_ROWS`, or more when a chunk of that many rows holds fewer weights than its overhang."""
    return max(MIN_CHUNK_ROWS, -(-overhang // max(1, cols)))


def chunk_overhang(max_block_numel: int) -> int:
    """Elements a chunk may need beyond its own: part of a block at each end, plus the alignment shift."""
    return 2 * max_block_numel + ALIGN_ELEMENTS


def plan_memory(
    units: Iterable[UnitSize], plain_bytes: int, chunk_numel: int | None = None, chunking: bool = True
) -> MemoryPlan:
    """The decode buffer per device and which units are used piecewise.

    Args:
        units: every unit (raw units count as stored bytes only: they are loaded as plain tensors).
        plain_bytes: bytes of tensors stored uncoded outside units.
        chunk_numel: chunkable units with more elements than this are used piecewise, in chunks that fit it
            (default: the largest unit on the device that must be decoded whole).
        chunking: False decodes every unit whole (the buffer then holds the largest unit).
    """
    units = list(units)
    plan = MemoryPlan(units, plain_bytes)
    by_device: dict[str, list[UnitSize]] = {}
    for u in units:
        if u.coded:
            by_device.setdefault(u.device, []).append(u)
    for device, group in by_device.items():
        piecewise = [
            u for u in group if chunking and u.chunkable and u.matrix is not None and not in_block(u.name)
        ]
        whole = max([u.decode_numel or u.numel for u in group if u not in piecewise], default=0)
        budget = chunk_numel if chunk_numel is not None else (whole or DEFAULT_CHUNK_NUMEL)
        need = whole
        for u in piecewise:
            if u.numel <= budget:
                need = max(need, u.numel)
                continue
            rows, cols = u.matrix
            overhang = chunk_overhang(u.max_block_numel)
            per_chunk = chunk_rows(budget, cols, overhang)
            if per_chunk >= rows:
                need = max(need, u.numel)
                continue
            plan.chunked[u.name] = Chunking(u.name, per_chunk, rows, cols)
            need = max(need, min(u.numel, per_chunk * cols + overhang))
        plan.buffers[device] = need
    return plan


def max_block_numel(output_positions) -> int:
    """Most elements any block of a unit holds (from its output positions)."""
    import numpy as np

    pos = np.asarray(output_positions, dtype=np.int64)
    return int(np.diff(pos).max()) if pos.size > 1 else 0


def worst_block_numel(bytes_per_window: int, windows_per_block: int) -> int:
    """A bound when the positions are not known: every code is at least one bit long."""
    return 8 * bytes_per_window * windows_per_block


def split_parts(names: Sequence[str]) -> list[list[int]] | None:
    """Split decode: a unit's members grouped by the child module of their deepest common module (the ``self_attn``
    and ``mlp`` of a decoder layer), in order of first appearance; None when that gives fewer than two groups, a
    member sits on the common module or on one of its children (``q_proj`` of an attention module: the owner's
    forward may read it), or the common module is a list (numbered children)."""
    paths = [n.split(".")[:-1] for n in names]
    depth = 0
    for level in zip(*paths):
        if len(set(level)) != 1:
            break
        depth += 1
    if depth == 0 or any(len(p) <= depth + 1 for p in paths):
        return None  # a member on the owner itself, or a child is the weight's own module (its owner may read it)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p[depth], []).append(i)
    if len(groups) < 2 or any(child.isdigit() for child in groups):
        return None
    return list(groups.values())


def part_layout(output_positions, spans) -> tuple[list[tuple[int, int, int]], int]:
    """Where a split-decode part goes in the buffer. ``spans``: the element ranges ``[start, stop)`` of its
    members. Returns runs ``(b0, b1, base)``: blocks ``[b0, b1)`` are decoded to buffer element ``base``, with
    ``base`` congruent to the unit position of block ``b0`` (so every member keeps the alignment it has in a
    whole-unit decode); runs that touch or share a block are one run. And the buffer elements the part needs."""
    import numpy as np

    pos = np.asarray(output_positions, dtype=np.int64)
    runs: list[list[int]] = []
    for start, stop in sorted(spans):
        b0 = int(np.searchsorted(pos, start, side="right") - 1)
        b1 = int(np.searchsorted(pos, stop - 1, side="right"))
        if runs and b0 <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], b1)
        else:
            runs.append([b0, b1])
    out, end = [], 0
    for b0, b1 in runs:
        base = end + (int(pos[b0]) - end) % ALIGN_ELEMENTS
        out.append((b0, b1, base))
        end = base + int(pos[b1] - pos[b0])
    return out, end


def split_decode_numel(
    members: Sequence[tuple[str, int, int]], output_positions=None, max_block: int = 0
) -> int:
    """Buffer elements the largest part of a split-decoded unit needs (0: the unit is not split, or no part is
    smaller than the whole unit). ``members`` are (name, offset, numel); without output positions (shapes only) a
    part is bounded by its elements plus a block of windows at each end and the alignment shift."""
    parts = split_parts([m[0] for m in members])
    if parts is None:
        return 0
    total = max(m[1] + m[2] for m in members)
    need = 0
    for part in parts:
        if output_positions is None:  # a part's members assumed contiguous
            need = max(need, sum(members[i][2] for i in part) + chunk_overhang(max_block))
        else:
            spans = [(members[i][1], members[i][1] + members[i][2]) for i in part]
            need = max(need, part_layout(output_positions, spans)[1])
    return need if need < total else 0


def units_from_checkpoint(
    units_meta: Mapping[str, dict],
    arrays_nbytes: Mapping[str, int],
    positions: Mapping[str, object],
    split: bool = True,
) -> list[UnitSize]:
    """UnitSize rows from a checkpoint's unit metadata (``dfloat inspect``): one-matrix units count as chunkable
    (the checkpoint alone does not say which module uses them; embeddings and lm_head are the ones that are)."""
    out = []
    for name, meta in units_meta.items():
        members = meta["members"]
        coded = meta["mode"] == "huffman"
        shape = tuple(members[0]["shape"]) if len(members) == 1 else ()
        matrix = (shape[0], math.prod(shape[1:])) if len(shape) == 2 else None
        block = (
            max_block_numel(positions[name])
            if name in positions
            else worst_block_numel(meta.get("bytes_per_window", 32), meta.get("windows_per_block", 256))
        )
        split_numel = 0
        if split and coded and name in positions:
            split_numel = split_decode_numel(
                [(m["name"], int(m["offset"]), math.prod(m["shape"])) for m in members], positions[name]
            )
        out.append(
            UnitSize(
                name,
                int(meta["numel"]),
                int(arrays_nbytes[name]),
                coded,
                matrix,
                matrix is not None,
                block,
                decode_numel=split_numel,
            )
        )
    return out


def plan_checkpoint(
    folder, chunk_numel: int | None = None, chunking: bool = True, split: bool = True
) -> MemoryPlan:
    """The memory plan of a compressed folder on one device, from its shard headers and output positions only
    (nothing is decoded or moved to a GPU). One-matrix units outside blocks count as used piecewise, as
    embeddings and lm_head are when loaded; block units as split-decoded (``split``, as `load_compressed`)."""
    from safetensors import safe_open

    from dfloat.runtime.checkpoint import CompressedCheckpoint
    from dfloat.storage import check_version

    sizes = {
        "BF16": 2,
        "F16": 2,
        "F32": 4,
        "F64": 8,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "U8": 1,
        "I8": 1,
        "BOOL": 1,
    }
    units: list[UnitSize] = []
    plain = 0
    for path in CompressedCheckpoint.open(folder).shard_files:
        with safe_open(str(path), framework="pt") as f:
            meta = check_version(f.metadata(), str(path))
            nbytes: dict[str, int] = dict.fromkeys(meta, 0)
            for key in f.keys():  # one pass over the keys: a unit's arrays are "{unit}.{array}"
                s = f.get_slice(key)
                size = math.prod(s.get_shape()) * sizes.get(s.get_dtype(), 1)
                unit, _, array = key.rpartition(".")
                if unit in nbytes and array in _UNIT_ARRAYS:
                    nbytes[unit] += size
                else:
                    plain += size
            positions = {
                name: f.get_tensor(f"{name}.output_positions").numpy()
                for name in meta
                if meta[name]["mode"] == "huffman"
            }
            units += units_from_checkpoint(meta, nbytes, positions, split)
    coded = [u for u in units if u.coded]
    plain += sum(u.stored_bytes for u in units if not u.coded)  # raw units load as plain tensors
    plan = plan_memory(coded, plain, chunk_numel, chunking)
    plan.buffers = {"device": max(plan.buffers.values())} if plan.buffers else {}
    return plan


_UNIT_ARRAYS = (
    "encoded_exponent",
    "sign_mantissa",
    "gaps",
    "output_positions",
    "code_lengths",
    "luts",
    "raw",
)


@dataclass
class PipelinePlan:
    """The weight memory of a diffusers pipeline: each compressed component's plan (its own decode buffer), and
    the bytes of each component stored as it is (a VAE in float32; tokenizers and schedulers hold none)."""

    plans: dict[str, MemoryPlan]
    copied: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """Every component on one device."""
        return sum(p.total_bytes for p in self.plans.values()) + sum(self.copied.values())

    @property
    def bf16_bytes(self) -> int:
        return sum(p.bf16_bytes for p in self.plans.values()) + sum(self.copied.values())

    @property
    def pct_of_bf16(self) -> float:
        return 100.0 * self.total_bytes / max(1, self.bf16_bytes)

    @property
    def offload_peak_bytes(self) -> int:
        """With ``enable_model_cpu_offload`` one component at a time is on the accelerator: the largest one."""
        sizes = [p.total_bytes for p in self.plans.values()] + list(self.copied.values())
        return max(sizes, default=0)

    @property
    def offload_peak_bf16_bytes(self) -> int:
        sizes = [p.bf16_bytes for p in self.plans.values()] + list(self.copied.values())
        return max(sizes, default=0)

    def as_dict(self) -> dict:
        return {
            "components": {n: p.as_dict() for n, p in self.plans.items()},
            "copied_bytes": dict(self.copied),
            "total_bytes": self.total_bytes,
            "bf16_bytes": self.bf16_bytes,
            "pct_of_bf16": round(self.pct_of_bf16, 2),
            "offload_peak_bytes": self.offload_peak_bytes,
            "offload_peak_bf16_bytes": self.offload_peak_bf16_bytes,
        }

    def summary(self) -> str:
        mib = 2.0**20
        return (
            f"pipeline weight memory {self.total_bytes / mib:,.1f} MiB = {self.pct_of_bf16:.2f}% of BF16 "
            f"({self.bf16_bytes / mib:,.1f} MiB) with every component on one device; with model CPU offload the "
            f"largest component needs {self.offload_peak_bytes / mib:,.1f} MiB "
            f"(BF16: {self.offload_peak_bf16_bytes / mib:,.1f} MiB)"
        )
